"""`medai vlm ...`: ask a question about an image, evaluate on VQA-RAD, draft a grounded report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

app = typer.Typer(help="Vision-language head: ask, evaluate on VQA-RAD, draft grounded reports.",
                      no_args_is_help=True)
console = Console()
CHECKPOINT_HELP = "Which checkpoint of --run and --blind-run: best (by the run's monitor) or last."


def _source(model: str, run: Optional[Path], checkpoint: str) -> str:
    """Name the answering model for the evaluation's resume check: a run's checkpoint file and its time, or a model."""
    if run is None:
        return model
    from medai.pipelines.checkpointing import run_weights

    weights = run_weights(run, checkpoint).resolve()  # load_run has checked it exists
    return f"{weights} @ {weights.stat().st_mtime_ns}"


def _with_blind(model: str, run: Optional[Path], blind_run: Optional[Path], condition: list[str],
                checkpoint: str = "best") -> tuple[Any, Any, list[str]]:
    """The evaluated model, the question-only model (if a run is given) and the conditions, 'blind_trained' added."""
    from medai.pipelines.vqa import load_vqa_model

    conditions = list(condition) + (["blind_trained"] if blind_run and "blind_trained" not in condition else [])
    blind = load_vqa_model(model, blind_run, checkpoint) if blind_run is not None else None
    return load_vqa_model(model, run, checkpoint), blind, conditions


@app.command("ask")
def ask(
    image: Path = typer.Argument(..., exists=True, dir_okay=False, help="Image file (PNG/JPEG; a DICOM frame exported as an image)."),
    question: str = typer.Argument(..., help="Question in English."),
    model: str = typer.Option("vlm_lite0_smollm2", help="Registered VLM name or a local HF VLM folder."),
    run: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="A `medai finetune` run folder of the VQA task."),
    max_new_tokens: int = typer.Option(64, help="Upper bound on generated tokens."),
    mitigation: str = typer.Option("none", help="none or vcd (visual contrastive decoding)."),
    checkpoint: str = typer.Option("best", help=CHECKPOINT_HELP),
    allow_untrained: bool = typer.Option(False, "--allow-untrained",
                                         help="Answer even with untrained parts (the output says so)."),
) -> None:
    """Stream the model's answer to a question about an image, after a line naming the weights that answer."""
    from medai.pipelines.vqa import load_answering_model, read_question_image

    picture = read_question_image(image)  # before the model load: a bad file costs no 15 s
    vlm, provenance = load_answering_model(model, run, checkpoint, allow_untrained=allow_untrained)
    console.print(f"[dim]model: {provenance}[/]")
    for piece in vlm.stream(picture, question, max_new_tokens=max_new_tokens, mitigation=mitigation):
        console.print(piece, end="")
    console.print()


@app.command("eval")
def evaluate(
    out: Path = typer.Option(Path("runs/vqa_rad_eval"), help="Output folder (resumes predictions found there)."),
    model: str = typer.Option("vlm_lite0_smollm2", help="Registered VLM name."),
    run: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="A `medai finetune` run folder of the VQA task."),
    limit: Optional[int] = typer.Option(None, help="Only the first N test questions (file order)."),
    blind_run: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="The question-only run (configs/vqa_rad_blind.yaml): "
                                             "adds the condition 'blind_trained'."),
    condition: list[str] = typer.Option(["image", "blank", "noise", "blind", "image+vcd"], help="Repeatable."),
    max_new_tokens: int = typer.Option(12),
    batch_size: int = typer.Option(8),
    checkpoint: str = typer.Option("best", help=CHECKPOINT_HELP),
) -> None:
    """VQA-RAD test: closed accuracy, open exact/recall/F1 with 95% CIs, visual reliance and VCD effect."""
    from medai.io.data import dataset_path
    from medai.pipelines.vqa import VQAEvalConfig, evaluate_vqa_rad, format_summary

    vlm, blind, conditions = _with_blind(model, run, blind_run, condition, checkpoint)
    cfg = VQAEvalConfig(dataset_path("vqa_rad"), out, conditions, limit, batch_size, max_new_tokens,
                        model_source=_source(model, run, checkpoint),
                        blind_source=_source(model, blind_run, checkpoint) if blind_run else "")
    results = evaluate_vqa_rad(vlm, cfg, blind_model=blind)
    console.print(format_summary(results))
    console.print(f"written: {out / 'summary.json'}, {out / 'summary.md'}")


@app.command("templated")
def templated(
    out: Path = typer.Option(Path("runs/vqa_templated_eval"), help="Output folder for summary.json / summary.md."),
    model: str = typer.Option("vlm_lite0_smollm2", help="Registered VLM name."),
    run: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="A `medai finetune` run folder of the VQA task."),
    blind_run: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="The question-only run: adds the condition 'blind_trained'."),
    per_source: int = typer.Option(40, help="Questions per source (BreastMNIST, hippocampus, DICOM, slides)."),
    condition: list[str] = typer.Option(["image", "blank", "blind"], help="Repeatable."),
    max_new_tokens: int = typer.Option(6),
    checkpoint: str = typer.Option("best", help=CHECKPOINT_HELP),
) -> None:
    """Templated questions with exact answers from the shared labelled data: accuracy with 95% CIs."""
    from medai.io.data import data_root
    from medai.pipelines.templated_vqa import templated_question_set
    from medai.pipelines.vqa import evaluate_templated, format_templated

    questions = templated_question_set(data_root(), per_source)
    vlm, blind, conditions = _with_blind(model, run, blind_run, condition, checkpoint)
    results = evaluate_templated(vlm, questions, conditions, max_new_tokens=max_new_tokens, blind_model=blind,
                                 out_dir=out)
    console.print(format_templated(results))


@app.command("report")
def report(
    findings: Path = typer.Argument(..., exists=True, dir_okay=False, help="Findings JSON: {study, modality, findings: [...]} (see pipelines/report.py)."),
    out: Path = typer.Option(Path("runs/report"), help="Output folder for report.txt, report.json, report_sr.dcm."),
    drafter: str = typer.Option("lm", help="lm (the VLM's language model) or template (deterministic)."),
    model: str = typer.Option("vlm_lite0_smollm2", help="Registered VLM name (drafter=lm)."),
    dicom: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="A source DICOM instance of the study: also write an SR."),
) -> None:
    """Draft a report from structured findings; every finding sentence is checked and flagged if unsupported."""
    from medai.pipelines.report import draft_report, load_findings, write_report
    from medai.pipelines.vqa import load_vqa_model

    study = load_findings(findings)
    vlm = load_vqa_model(model, None) if drafter == "lm" else None
    result = draft_report(study, vlm, drafter)  # type: ignore[arg-type]
    write_report(result, out, dicom)
    console.print(result.to_text())
    console.print(f"{len(result.flagged)} flagged sentence(s); written to {out}")
