"""VQA evaluation job: a VLM on VQA-RAD's test split under several conditions, with 95% CIs.

Conditions (each a resumable JSONL of per-question predictions under `out_dir`, with a `.source.json`
naming the model that wrote it, so another model never resumes it):
- `image`        the real image (the model as it is used)
- `blank`/`noise` the image replaced by a black image / uniform noise (visual reliance check:
                 closed accuracy that does not fall towards the blind baseline means the model
                 ignores the image, as LLaVA-Med's users found)
- `blind`        no image tokens at all, same model (question-only input to the image-trained model)
- `blind_trained` the question-only baseline proper: the same LM LoRA-tuned on the same training
                 questions without images (`configs/vqa_rad_blind.yaml`), given as a second model
- `image+vcd`    the real image with visual contrastive decoding (the mitigation switch)
Baselines computed without a model: majority answer per answer type from the training split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from medai.io.vqa_rad import VQAItem, load_vqa_rad, majority_answers
from medai.pipelines.metrics import closed_correct, extract_closed_answer, mean_ci, mean_difference_ci, token_scores

log = logging.getLogger(__name__)

# condition name -> (image_mode, mitigation)
CONDITIONS: dict[str, tuple[str, str]] = {
    "image": ("image", "none"),
    "blank": ("blank", "none"),
    "noise": ("noise", "none"),
    "blind": ("none", "none"),
    "image+vcd": ("image", "vcd"),
    "blind_trained": ("none", "none"),  # answered by the separately trained question-only model
}

# Published VQA-RAD test results (official split). MEVF figures from the authors' repository
# (aioz-ai/MICCAI19-MedVQA README, same as Nguyen et al. MICCAI 2019). The LLaVA-Med figures are
# from Li et al. NeurIPS 2023 Table 4 as we recall them; the PDF could not be opened offline here.
PUBLISHED = [
    {"method": "MEVF+BAN (Nguyen et al., MICCAI 2019)", "closed": 75.1, "open": 43.9, "note": "accuracy, %"},
    {"method": "MEVF+SAN (Nguyen et al., MICCAI 2019)", "closed": 74.1, "open": 40.7, "note": "accuracy, %"},
    {"method": "LLaVA-Med, from LLaVA, fine-tuned (Li et al., NeurIPS 2023, Table 4; unverified here)",
     "closed": 84.19, "open": 61.52, "note": "closed accuracy / open recall, %"},
]


@dataclass
class VQAEvalConfig:
    """What to evaluate: data root, conditions, item limit, batching and generation bounds."""

    data_root: Path
    out_dir: Path
    conditions: list[str] = field(default_factory=lambda: [c for c in CONDITIONS if c != "blind_trained"])
    limit: int | None = None  # first N test items (in file order), for quick runs
    batch_size: int = 8
    max_new_tokens: int = 12
    # A safety net only: a time-cut answer is scored as given, so keep this far above a batch's need.
    max_time_s: float = 900.0
    n_boot: int = 2000
    # Who answers (e.g. a run folder and checkpoint): written beside each predictions file, so that
    # resuming into the same `out_dir` with another model is refused instead of silently mixed.
    model_source: str = ""
    blind_source: str = ""


def load_vqa_model(model: str, run: Path | None = None, checkpoint: str = "best") -> Any:
    """A trained VQA run's model (its `checkpoint`), else a registered medai VLM or a local HF VLM folder, in eval mode."""
    if run is not None:
        from medai.pipelines.evaluate import load_run

        return load_run(run, checkpoint)[3].eval()
    from medai.models.vlm import load_vlm

    loaded = load_vlm(model)
    return loaded.eval() if hasattr(loaded, "eval") else loaded


def load_answering_model(model: str, run: Path | None = None, checkpoint: str = "best", *,
                         allow_untrained: bool = False) -> tuple[Any, str]:
    """The VLM that answers a user's question and a line naming its weights; untrained heads refused unless allowed."""
    from medai.models.vlm import UntrainedModelError

    vlm = load_vqa_model(model, run, checkpoint)
    if run is not None:
        from medai.pipelines.checkpointing import run_weights

        provenance = f"{run} ({checkpoint} checkpoint {run_weights(run, checkpoint)})"
    else:
        provenance = f"{model} ({getattr(vlm, 'weights_source', None) or 'registry build'})"
    untrained = list(getattr(vlm, "untrained_parts", []))
    if untrained and not allow_untrained:
        raise UntrainedModelError(
            f"{model}: its {', '.join(untrained)} was never trained, so its answers would not come from the image. "
            "Pass a trained VQA run (--run RUN_DIR; `make vqa-rad` trains one) or --allow-untrained to see the "
            "untrained output, marked as such")
    if untrained:
        provenance += f" [UNTRAINED {', '.join(untrained)}: not an answer from a trained model]"
    return vlm, provenance


def read_question_image(path: str | Path, min_side_px: int = 16) -> Any:
    """Open a user's image for a question (RGB); refuse an unreadable, tiny or uniform one naming the file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from medai.errors import InputFileError

    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputFileError(path, f"not an image PIL can read ({type(exc).__name__}); export DICOM frames as PNG") from None
    if min(image.size) < min_side_px:
        raise InputFileError(path, f"image is {image.size[0]}x{image.size[1]} px: too small to show anything "
                                   f"(at least {min_side_px} px a side)")
    if np.ptp(np.asarray(image)) == 0:
        raise InputFileError(path, "image is one uniform colour: there is nothing in it to answer about")
    return image


def _read_done(path: Path) -> dict[str, dict[str, Any]]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["qid"]] = rec
    return done


def check_source(path: Path, source: dict[str, Any]) -> None:
    """Record who answers into `path`; refuse to resume predictions that another model or bound produced."""
    sidecar = path.with_name(path.stem + ".source.json")
    if sidecar.is_file():
        saved = json.loads(sidecar.read_text())
        if saved != source:
            raise ValueError(f"{path} holds predictions of {saved}, not of {source}: "
                             "evaluate into another --out folder, or delete that file to answer again")
    elif path.is_file() and path.stat().st_size:
        log.warning("%s has no record of the model that wrote it; resuming it as is", path)
    sidecar.write_text(json.dumps(source, indent=1))


def run_condition(model: Any, items: Sequence[VQAItem], condition: str, path: Path, batch_size: int,
                  max_new_tokens: int, max_time_s: float = 900.0, source: str = "") -> list[dict[str, Any]]:
    """Answer every item under one condition, appending to `path` (resumes where it stopped)."""
    from PIL import Image
    from tqdm import tqdm

    from medai.models.vlm import VLMInputError

    image_mode, mitigation = CONDITIONS[condition]
    check_source(path, {"model": source, "max_new_tokens": max_new_tokens})
    done = _read_done(path)
    todo = [it for it in items if it.qid not in done]
    # VCD runs a second branch with its own cache per row; keep it to one row at a time.
    step = 1 if mitigation == "vcd" else batch_size
    with path.open("a") as sink, tqdm(total=len(items), initial=len(items) - len(todo), desc=condition, unit="q") as bar:
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            try:
                images = [Image.open(it.image_path).convert("RGB") for it in chunk] if image_mode != "none" else None
                gens = model.generate_answers(images, [it.question for it in chunk], image_mode=image_mode,
                                              mitigation=mitigation, max_new_tokens=max_new_tokens,
                                              max_time_s=max_time_s)
                records = [{"qid": it.qid, "prediction": g.text, "stopped_by": g.stopped_by} for it, g in zip(chunk, gens)]
            except (VLMInputError, OSError) as exc:  # a bad item is recorded, the job goes on
                log.warning("%s: %d item(s) failed: %s", condition, len(chunk), exc)
                records = [{"qid": it.qid, "prediction": "", "error": str(exc)} for it in chunk]
            for rec in records:
                sink.write(json.dumps(rec) + "\n")
                done[rec["qid"]] = rec
            sink.flush()
            bar.update(len(chunk))
    return [done[it.qid] for it in items]


def score(items: Sequence[VQAItem], predictions: Sequence[str]) -> dict[str, list[float]]:
    """Return per-item scores: closed correctness, open exact/recall/F1 (lists aligned with items)."""
    out: dict[str, list[float]] = {"closed_acc": [], "open_exact": [], "open_recall": [], "open_f1": []}
    for it, pred in zip(items, predictions):
        if it.is_closed:
            out["closed_acc"].append(float(closed_correct(pred, it.answer_norm)))
        else:
            s = token_scores(pred, it.answer)
            out["open_exact"].append(s["exact"])
            out["open_recall"].append(s["recall"])
            out["open_f1"].append(s["f1"])
    return out


def yes_no_profile(items: Sequence[VQAItem], predictions: Sequence[str]) -> dict[str, float]:
    """On closed questions whose reference is yes or no: how often the reply is 'yes', and accuracy per reference.

    A model that reads the image moves its yes-rate with the image; one that learnt the prior says
    the same word whatever it is shown (accuracy high on one reference, low on the other).
    """
    replies = {"yes": [], "no": []}
    for it, pred in zip(items, predictions):
        if it.is_closed and it.answer_norm in replies:
            replies[it.answer_norm].append(extract_closed_answer(pred, it.answer_norm))
    n = len(replies["yes"]) + len(replies["no"])
    said_yes = sum(r == "yes" for rs in replies.values() for r in rs)
    acc = {ref: 100 * sum(r == ref for r in rs) / len(rs) if rs else float("nan") for ref, rs in replies.items()}
    return {"n": n, "yes_rate": 100 * said_yes / n if n else float("nan"),
            "acc_when_yes": acc["yes"], "acc_when_no": acc["no"]}


def summarise(per_item: dict[str, list[float]], n_boot: int) -> dict[str, dict[str, float]]:
    """Return {metric: {value, ci_low, ci_high, n}} in percent."""
    result = {}
    for metric, values in per_item.items():
        est, lo, hi = mean_ci(values, n_boot=n_boot)
        result[metric] = {"value": 100 * est, "ci_low": 100 * lo, "ci_high": 100 * hi, "n": len(values)}
    return result


def check_conditions(conditions: Sequence[str], blind_model: Any | None) -> None:
    """Refuse unknown conditions, and 'blind_trained' without its model, before any model time is spent."""
    for condition in conditions:
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition '{condition}' (known: {', '.join(CONDITIONS)})")
        if condition == "blind_trained" and blind_model is None:
            raise ValueError("condition 'blind_trained' needs the question-only model (medai vlm eval --blind-run RUN)")


def evaluate_vqa_rad(model: Any, cfg: VQAEvalConfig, blind_model: Any | None = None) -> dict[str, Any]:
    """Run all conditions on the test split and return (and write) the summary with CIs.

    `blind_model` (a question-only model of the same LM) answers the `blind_trained` condition.
    """
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    train = load_vqa_rad(cfg.data_root, "train")
    test = load_vqa_rad(cfg.data_root, "test")
    if cfg.limit:
        test = test[: cfg.limit]
    majority = majority_answers(train)
    results: dict[str, Any] = {"n_test": len(test), "conditions": {}, "published": PUBLISHED,
                               "majority_answers": majority}
    check_conditions(cfg.conditions, blind_model)
    majority_preds = [majority[it.answer_type] for it in test]
    per_item = {"majority": score(test, majority_preds)}
    profiles = {"majority": yes_no_profile(test, majority_preds)}
    for condition in cfg.conditions:
        blind = condition == "blind_trained"
        records = run_condition(blind_model if blind else model, test, condition,
                                cfg.out_dir / f"predictions_{condition}.jsonl", cfg.batch_size, cfg.max_new_tokens,
                                cfg.max_time_s, cfg.blind_source if blind else cfg.model_source)
        per_item[condition] = score(test, [r["prediction"] for r in records])
        profiles[condition] = yes_no_profile(test, [r["prediction"] for r in records])
        results["conditions"][condition] = {"failed": sum("error" in r for r in records),
                                            "cut_by_time": sum(r.get("stopped_by") == "max_time" for r in records)}
    for name, values in per_item.items():
        results["conditions"].setdefault(name, {}).update(summarise(values, cfg.n_boot))
        results["conditions"][name]["yes_no"] = profiles[name]
    # Paired differences on the same questions: does the image help, and does VCD change anything?
    contrasts = {"image - blind_trained": ("image", "blind_trained"), "image - blind": ("image", "blind"),
                 "image - blank": ("image", "blank"),
                 "image - noise": ("image", "noise"), "image+vcd - image": ("image+vcd", "image"),
                 "image+vcd - blind_trained": ("image+vcd", "blind_trained"), "image - majority": ("image", "majority")}
    results["paired_closed_acc"] = {}
    for label, (a, b) in contrasts.items():
        if a in per_item and b in per_item:
            est, lo, hi = mean_difference_ci(per_item[a]["closed_acc"], per_item[b]["closed_acc"], cfg.n_boot)
            results["paired_closed_acc"][label] = {"value": 100 * est, "ci_low": 100 * lo, "ci_high": 100 * hi}
    (cfg.out_dir / "summary.json").write_text(json.dumps(results, indent=2, default=str))
    (cfg.out_dir / "summary.md").write_text(format_summary(results))
    return results


def format_summary(results: dict[str, Any]) -> str:
    """Return the summary as a Markdown table (percent, 95% bootstrap CIs)."""
    def cell(m: dict[str, float] | None) -> str:
        return "-" if not m or m.get("n", 1) == 0 else f"{m['value']:.1f} [{m['ci_low']:.1f}, {m['ci_high']:.1f}]"

    lines = [f"VQA-RAD test ({results['n_test']} questions), % with 95% bootstrap CIs", "",
             "| condition | closed acc | open exact | open recall | open F1 |", "|---|---|---|---|---|"]
    for name, m in results["conditions"].items():
        lines.append(f"| {name} | {cell(m.get('closed_acc'))} | {cell(m.get('open_exact'))} | "
                     f"{cell(m.get('open_recall'))} | {cell(m.get('open_f1'))} |")
    profiled = {name: m["yes_no"] for name, m in results["conditions"].items() if "yes_no" in m}
    if profiled:
        n = next(iter(profiled.values()))["n"]
        lines += ["", f"Closed questions answered yes or no ({n}): share of 'yes' replies and accuracy per reference, %",
                  "", "| condition | says yes | acc, reference yes | acc, reference no |", "|---|---|---|---|"]
        for name, p in profiled.items():
            lines.append(f"| {name} | {p['yes_rate']:.1f} | {p['acc_when_yes']:.1f} | {p['acc_when_no']:.1f} |")
    lines += ["", "| paired closed-acc difference | points [95% CI] |", "|---|---|"]
    for label, m in results.get("paired_closed_acc", {}).items():
        lines.append(f"| {label} | {m['value']:+.1f} [{m['ci_low']:+.1f}, {m['ci_high']:+.1f}] |")
    lines += ["", "| published | closed | open |", "|---|---|---|"]
    for p in results["published"]:
        lines.append(f"| {p['method']} | {p['closed']} | {p['open']} ({p['note']}) |")
    return "\n".join(lines) + "\n"


def config_dict(cfg: VQAEvalConfig) -> dict[str, Any]:
    """Return the evaluation config as plain values (written beside the results)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def evaluate_templated(model: Any, questions: Sequence[Any], conditions: Sequence[str] = ("image", "blank", "blind"),
                       batch_size: int = 8, max_new_tokens: int = 6, max_time_s: float = 900.0,
                       n_boot: int = 2000, blind_model: Any | None = None,
                       out_dir: str | Path | None = None) -> dict[str, Any]:
    """Exact-match accuracy (95% CI) on templated questions (medai.pipelines.templated_vqa) per condition and template.

    With `out_dir`, also writes summary.json and summary.md (format_templated) there.
    """
    from collections import Counter

    from tqdm import tqdm

    templates = sorted({q.template for q in questions})
    results: dict[str, Any] = {"n": len(questions), "templated": True, "conditions": {},
                               "n_per_template": dict(Counter(q.template for q in questions))}
    # Baseline without a model: each template's most frequent answer in this set (an upper bound on any
    # constant answer, since it peeks at the set's own answer distribution).
    majority = {t: Counter(q.answer for q in questions if q.template == t).most_common(1)[0][0] for t in templates}
    per_condition = {"majority": [float(closed_correct(majority[q.template], q.answer)) for q in questions]}
    check_conditions(conditions, blind_model)
    for condition in conditions:
        image_mode, mitigation = CONDITIONS[condition]
        answerer = blind_model if condition == "blind_trained" else model
        correct = []
        for start in tqdm(range(0, len(questions), batch_size), desc=f"templated {condition}", unit="batch"):
            chunk = questions[start : start + batch_size]
            images = [q.image for q in chunk] if image_mode != "none" else None
            # Templated images are real scans and slide tiles (BreastMNIST thumbnails are tiny, H&E is
            # colourful): skip the photo check.
            gens = answerer.generate_answers(images, [q.question for q in chunk], image_mode=image_mode,
                                             mitigation=mitigation, max_new_tokens=max_new_tokens,
                                             max_time_s=max_time_s, validate=False)
            correct += [float(closed_correct(g.text, q.answer)) for g, q in zip(gens, chunk)]
        per_condition[condition] = correct
    for condition, correct in per_condition.items():
        est, lo, hi = mean_ci(correct, n_boot=n_boot)
        entry = {"accuracy": 100 * est, "ci_low": 100 * lo, "ci_high": 100 * hi, "per_template": {}}
        for t in templates:
            values = [c for c, q in zip(correct, questions) if q.template == t]
            est, lo, hi = mean_ci(values, n_boot=n_boot)
            entry["per_template"][t] = {"accuracy": 100 * est, "ci_low": 100 * lo, "ci_high": 100 * hi}
        results["conditions"][condition] = entry
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(results, indent=2))
        (out_dir / "summary.md").write_text(format_templated(results))
    return results


def format_templated(results: dict[str, Any]) -> str:
    """Markdown table of templated-set accuracy (%, 95% CI) per condition, overall and per template."""
    templates = sorted(results["n_per_template"])
    lines = [f"Templated questions ({results['n']}; templated, not natural questions), exact-match accuracy %, "
             "95% bootstrap CIs", "",
             "| condition | all | " + " | ".join(f"{t} (n={results['n_per_template'][t]})" for t in templates) + " |",
             "|---|---|" + "---|" * len(templates)]
    cell = lambda m: f"{m['accuracy']:.1f} [{m['ci_low']:.1f}, {m['ci_high']:.1f}]"  # noqa: E731
    for name, m in results["conditions"].items():
        lines.append(f"| {name} | {cell(m)} | " + " | ".join(cell(m["per_template"][t]) for t in templates) + " |")
    return "\n".join(lines) + "\n"
