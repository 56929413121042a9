"""The EHR experiment, one command: pretrain + multitask fine-tune each sequence model through the
engine, fit the bag-of-codes baselines on the same split, report AUROC / AUPRC with bootstrap CIs per
task, and explain one test prediction by integrated gradients mapped back to the patient's events.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medai.pipelines.ehr_baselines import run_code_count_baselines
from medai.pipelines.ehr_data import PreparedEHR, prepare_ehr, task_counts
from medai.pipelines.tasks.ehr import EHRTaskOptions, multitask_metrics
from medai.transforms.ehr import TaskSample

log = logging.getLogger(__name__)


@dataclass
class NeuralModelSpec:
    """A registered sequence model to pretrain and fine-tune."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageSpec:
    """Optimisation settings of one stage (pretraining or fine-tuning)."""

    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    limit_train_batches: int | None = None
    warmup_ratio: float = 0.05


@dataclass
class EHRExperimentConfig:
    """`medai ehr experiment CONFIG`: data, models, stages, and where results go."""

    data_path: Path
    options: dict[str, Any] = field(default_factory=dict)
    models: list[NeuralModelSpec] = field(default_factory=lambda: [
        NeuralModelSpec("ehrmamba_small"), NeuralModelSpec("ehr_transformer_small")])
    pretrain: StageSpec = field(default_factory=StageSpec)
    finetune: StageSpec = field(default_factory=lambda: StageSpec(epochs=4))
    baselines: bool = True
    n_boot: int = 1000
    seed: int = 0
    output_dir: Path = Path("runs/ehr")


def load_experiment_config(path: str | Path, overrides: Sequence[str] = ()) -> EHRExperimentConfig:
    """Load an EHR experiment YAML strictly; `${MEDAI_DATA}` stands for the shared data root."""
    from medai.config import from_dict, load_config
    from medai.io.data import data_root

    cfg = load_config(EHRExperimentConfig, path, overrides)
    cfg.data_path = Path(str(cfg.data_path).replace("${MEDAI_DATA}", str(data_root())))
    from_dict(EHRTaskOptions, cfg.options, source=path, prefix="options")  # fail early on a typo
    return cfg


def _train_config(cfg: EHRExperimentConfig, task: str, spec: NeuralModelSpec, stage: StageSpec, run_name: str,
                  pretrained: str | None, monitor: str, mode: str, options: dict[str, Any]):
    from medai.pipelines.train_config import (DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig,
                                              TrainerConfig)

    return TrainConfig(
        task=task,
        model=ModelConfig(name=spec.name, pretrained=pretrained, kwargs=dict(spec.kwargs)),
        data=DataConfig(path=cfg.data_path, batch_size=stage.batch_size, options=dict(options)),
        optim=OptimConfig(lr=stage.lr, weight_decay=stage.weight_decay),
        schedule=ScheduleConfig(name="cosine", warmup_ratio=stage.warmup_ratio),
        trainer=TrainerConfig(epochs=stage.epochs, limit_train_batches=stage.limit_train_batches, monitor=monitor,
                              monitor_mode=mode, n_boot=cfg.n_boot, log_every_steps=5),
        seed=cfg.seed, output_dir=cfg.output_dir, run_name=run_name,
    )


def run_ehr_experiment(cfg: EHRExperimentConfig) -> dict[str, Any]:
    """Pretrain + multitask fine-tune each model through the engine, fit the bag-of-codes baselines on
    the same split, and write report.json / report.md (AUROC, AUPRC with 95% bootstrap CIs per task)
    plus an integrated-gradients explanation of one test prediction. Reruns resume finished stages."""
    import time

    import torch

    from medai.models import create_model
    from medai.pipelines.checkpointing import run_weights
    from medai.pipelines.finetune import finetune, write_json
    from medai.config import from_dict
    from medai.pipelines.metrics import bootstrap_ci, paired_bootstrap

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(cfg.options, prepared_dir=str(out / "prepared"))
    task_options = from_dict(EHRTaskOptions, options)
    prepared = prepare_ehr([cfg.data_path, *task_options.extra_sources], task_options, out_dir=out / "prepared")
    metrics_fn = lambda p: multitask_metrics(p, prepared.layout)  # noqa: E731
    results: dict[str, Any] = {"counts": task_counts(prepared), "layout": {k: list(v) for k, v in prepared.layout.items()},
                               "dx_groups": prepared.dx_groups, "vocab_size": len(prepared.tokenizer), "models": {}}
    test_preds: dict[str, dict[str, np.ndarray]] = {}
    finetuned: dict[str, Path] = {}
    for spec in cfg.models:
        t0 = time.time()
        pre = finetune(_train_config(cfg, "ehr_pretrain", spec, cfg.pretrain, f"{spec.name}/pretrain", None,
                                     "val_nll", "min", options))
        weights = run_weights(pre.run_dir)
        fine = finetune(_train_config(cfg, "ehr_multitask", spec, cfg.finetune, f"{spec.name}/multitask",
                                      str(weights), "val_mean_auroc", "max", options))
        test_preds[spec.name] = dict(np.load(fine.run_dir / "predictions_test.npz"))
        finetuned[spec.name] = fine.run_dir
        pre_test = json.loads((pre.run_dir / "eval_test.json").read_text())["metrics"] if (pre.run_dir / "eval_test.json").is_file() else {}
        model = create_model(spec.name, **{"vocab_size": len(prepared.tokenizer), "num_labels": prepared.num_labels,
                                           **spec.kwargs})
        results["models"][spec.name] = {
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "pretrain_run": str(pre.run_dir), "finetune_run": str(fine.run_dir),
            "pretrain_test": {k: v["value"] for k, v in pre_test.items()},
            "best_val_mean_auroc": fine.best_metric, "best_epoch": fine.best_epoch,
            "wall_s": round(time.time() - t0, 1),
            "test": fine.test_report["metrics"] if fine.test_report else
            bootstrap_ci(metrics_fn, test_preds[spec.name], n_boot=cfg.n_boot, seed=cfg.seed),
        }
    if cfg.baselines:
        t0 = time.time()
        for name, preds in run_code_count_baselines(prepared, seed=cfg.seed).items():
            test_preds[name] = preds
            results["models"][name] = {"test": bootstrap_ci(metrics_fn, preds, n_boot=cfg.n_boot, seed=cfg.seed),
                                       "wall_s": round(time.time() - t0, 1)}
    names = list(test_preds)
    reference = names[0] if names else None
    if reference:
        results["paired_vs_" + reference] = {
            other: {k: v for k, v in paired_bootstrap(metrics_fn, test_preds[reference], test_preds[other],
                                                      n_boot=cfg.n_boot, seed=cfg.seed).items() if k.startswith("mean_")}
            for other in names[1:]
            if np.array_equal(test_preds[reference]["task_index"], test_preds[other]["task_index"])
        }
    if cfg.models:
        spec = cfg.models[0]
        model = create_model(spec.name, pretrained=str(run_weights(finetuned[spec.name])),
                             vocab_size=len(prepared.tokenizer), num_labels=prepared.num_labels, **spec.kwargs)
        results["explanation"] = write_explanation(model, prepared, test_preds[spec.name], out)
        del model
        torch.set_grad_enabled(True)
    write_json(out / "report.json", results)
    (out / "report.md").write_text(report_markdown(results, prepared))
    return results


def write_explanation(model, prepared: PreparedEHR, preds: dict[str, np.ndarray], out: Path, top: int = 15) -> dict:
    """Explain the test sample with the highest predicted in-hospital mortality (else the first task)."""
    import polars as pl

    tests = prepared.samples_of("test")
    task = "mortality_inhospital" if "mortality_inhospital" in prepared.layout else next(iter(prepared.layout))
    k = list(prepared.layout).index(task)
    start, _ = prepared.layout[task]
    idx = [i for i, s in enumerate(tests) if s.task == task]
    best = max(idx, key=lambda i: preds["probs"][i, start])
    rows = explain_sample(model, prepared, tests[best])
    frame = pl.DataFrame([{k2: (str(v) if k2 == "time" else v) for k2, v in r.items()} for r in rows])
    frame.write_csv(out / "explanation.csv")
    ranked = sorted((r for r in rows if "code" in r), key=lambda r: -abs(r["attribution"]))[:top]
    lines = [f"Sample: task {task}, prediction time {tests[best].cutoff:%Y-%m-%d %H:%M} UTC (shifted MIMIC date), "
             f"predicted risk {preds['probs'][best, start]:.3f}, label {tests[best].labels[0]:.0f}, task index {k}.",
             "", "| time (UTC) | kind | code | value | attribution |", "|---|---|---|---|---|"]
    for r in ranked:
        value = "" if r.get("value") is None else f"{r['value']:g} {r.get('unit') or ''}".strip()
        lines.append(f"| {r['time']:%Y-%m-%d %H:%M} | {r['kind']} | {r['system']}/{r['code']} | {value} | {r['attribution']:+.4f} |")
    (out / "explanation.md").write_text("\n".join(lines) + "\n")
    return {"task": task, "patient_index_in_test": best, "top_events": len(ranked), "file": str(out / "explanation.md")}


def report_markdown(results: dict[str, Any], prepared: PreparedEHR) -> str:
    """Per-task AUROC / AUPRC [95% CI] of every model, as a Markdown table."""
    def cell(metrics: dict, key: str) -> str:
        m = metrics.get(key)
        if not m or not np.isfinite(m["value"]):
            return "n/a"
        return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"

    lines = ["| task | test n (pos) | " + " | ".join(results["models"]) + " |",
             "|---|---|" + "---|" * len(results["models"])]
    counts = results["counts"]
    for task in [*prepared.layout, "mean"]:
        n = counts.get(task, {}).get("test", ["", ""])
        for metric in ("auroc", "auprc"):
            key = f"{task}_{metric}"
            lines.append(f"| {task} {metric.upper()} | {n[0]} ({n[1]}) | "
                         + " | ".join(cell(m["test"], key) for m in results["models"].values()) + " |")
    return "\n".join(lines) + "\n"


def explain_sample(model, prepared: PreparedEHR, sample: TaskSample, steps: int = 32, output: int | None = None
                   ) -> list[dict[str, Any]]:
    """Integrated gradients of one task logit w.r.t. the concept embeddings, per token, mapped to events.

    Baseline: the [PAD] embedding (zero vector) for every token; the attribution of a token is
    sum_d (x - x0)_d · mean_alpha dF/dx_d (Sundararajan et al. 2017). Returns one row per token
    (token, attribution, and the event's time/kind/system/code/value when the token is an event),
    in sequence order; completeness error is logged.
    """
    import torch

    from medai.transforms.ehr import pad_batch

    tl = prepared.timelines[sample.patient_id]
    tokenized = prepared.tokenizer.tokenize(tl, cutoff=sample.cutoff, task=sample.task)
    enc = prepared.tokenizer.encode(tokenized, prepared.options.max_length)
    batch = pad_batch([enc])
    start, _ = prepared.layout[sample.task]
    output = start if output is None else output
    model.eval()
    emb = model.embeddings.concept_embeddings(batch["input_ids"]).detach()
    baseline = torch.zeros_like(emb)
    alphas = torch.linspace(1.0 / steps, 1.0, steps)
    total = torch.zeros_like(emb)
    for a in alphas:
        x = (baseline + a * (emb - baseline)).requires_grad_(True)
        logit = model.classify(batch, concept_embeds=x)[0, output]
        (grad,) = torch.autograd.grad(logit, x)
        total += grad
    attributions = ((emb - baseline) * total / steps).sum(-1)[0]
    with torch.no_grad():
        f_x = model.classify(batch)[0, output]
        f_0 = model.classify(batch, concept_embeds=baseline)[0, output]
    log.info("integrated gradients: sum %.4f vs F(x)-F(0) %.4f", float(attributions.sum()), float(f_x - f_0))
    id_to_token = {i: t for t, i in prepared.tokenizer.vocab.items()}
    rows = []
    for pos, (tid, ev_idx) in enumerate(zip(enc["input_ids"].tolist(), enc["event_index"].tolist())):
        row: dict[str, Any] = {"position": pos, "token": id_to_token.get(tid, "?"), "attribution": float(attributions[pos])}
        if ev_idx >= 0:
            ev = tl.events[ev_idx]
            row.update(time=ev.time, kind=ev.kind, system=ev.system, code=ev.code, value=ev.numeric_value,
                       unit=ev.unit, text_value=ev.text_value)
        rows.append(row)
    return rows
