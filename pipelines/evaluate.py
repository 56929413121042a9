"""Evaluate a trained run on a split: metrics with bootstrap CIs, plots, and paired comparisons.

`medai evaluate RUN_DIR` reloads the run's resolved config and best checkpoint, predicts the
split, and writes `eval_<split>.json`, `eval_<split>.md`, `predictions_<split>.npz` and, for
classification, ROC / confusion-matrix / reliability PNGs. `--compare OTHER_RUN` adds a paired
bootstrap of every metric on the same items. `pipelines.finetune.finetune` calls `evaluate_run`
on a run it has just trained; nothing here imports the engine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medai.config import from_dict
from medai.errors import CheckpointError, MedaiError
from medai.pipelines.batching import EpochSampler, move_to
from medai.pipelines.lora import apply_lora
from medai.pipelines.metrics import bootstrap_ci, paired_bootstrap
from medai.pipelines.tasks import Task, TaskData, get_task
from medai.pipelines.train_config import TrainConfig

log = logging.getLogger(__name__)


def load_run(run_dir: Path, checkpoint: str = "best") -> tuple[Any, Task, TaskData, nn.Module]:
    """Rebuild a run's task, data and model with the checkpoint's weights."""
    from medai.config import read_yaml
    from medai.pipelines.checkpointing import load_model_state, run_weights

    cfg_path = run_dir / "config.yaml"
    cfg = from_dict(TrainConfig, read_yaml(cfg_path), source=cfg_path)
    task = get_task(cfg.task)
    if task.options_cls is not None:
        task.options = from_dict(task.options_cls, cfg.data.options, source=cfg_path, prefix="data.options")
    data = task.setup(cfg.data, cfg.seed)
    model = task.build_model(cfg.model, data.info)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora)
    weights = run_weights(run_dir, checkpoint)
    if not weights.is_file():
        raise CheckpointError(weights, f"run has no '{checkpoint}' checkpoint")
    load_model_state(model, weights)
    return cfg, task, data, model


@torch.no_grad()
def predict_split(task: Task, model: nn.Module, data: TaskData, split: str, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Run the task's predict over a whole split, in order."""
    from torch.utils.data import DataLoader

    if split not in data.datasets:
        raise MedaiError(f"no '{split}' split (have {sorted(data.datasets)})")
    dataset = data.datasets[split]
    device = next(model.parameters()).device
    model.eval()
    loader = DataLoader(dataset, batch_sampler=EpochSampler(len(dataset), batch_size, 0, shuffle=False),
                        collate_fn=data.collate_fn)
    outputs: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        for k, v in task.predict(model, move_to(batch, device)).items():
            outputs.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in outputs.items()}


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    n_boot: int = 1000,
    checkpoint: str = "best",
    task: Task | None = None,
    data: TaskData | None = None,
    model: nn.Module | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run on `split`, write the report files, and return the report.

    batch_size: None takes the run's own evaluation batch size (`data.eval_batch_size`, else
    `data.batch_size`), so the reported numbers are those of the batching the run validated with.
    """
    run_dir = Path(run_dir)
    if task is None or data is None or model is None:
        cfg, task, data, model = load_run(run_dir, checkpoint)
        batch_size = batch_size or cfg.data.eval_batch
    else:
        from medai.pipelines.checkpointing import load_model_state, run_weights

        load_model_state(model, run_weights(run_dir, checkpoint))
    preds = predict_split(task, model, data, split, batch_size or 64)
    np.savez_compressed(run_dir / f"predictions_{split}.npz", **preds)
    metrics = bootstrap_ci(task.metrics, preds, n_boot=n_boot)
    report = {
        "run_dir": str(run_dir),
        "split": split,
        "checkpoint": checkpoint,
        "n_items": int(len(next(iter(preds.values())))),
        "n_boot": n_boot,
        "metrics": metrics,
        "task": task.name,
        "info": {k: v for k, v in data.info.items() if k != "model_kwargs"},
    }
    plots = []
    if "prob" in preds and "target" in preds:
        plots = plot_classification(preds, data.info, run_dir, split)
        report["confusion_matrix"] = _confusion(preds)
    report["plots"] = [str(p.name) for p in plots]
    (run_dir / f"eval_{split}.json").write_text(json.dumps(report, indent=2, default=float))
    (run_dir / f"eval_{split}.md").write_text(markdown_summary(report))
    return report


def _confusion(preds: dict[str, np.ndarray]) -> list[list[int]] | None:
    from sklearn.metrics import confusion_matrix

    target, prob = preds["target"], preds["prob"]
    if target.ndim == 2 and target.shape[1] > 1:
        return None  # multi-label: one matrix per label would be needed
    y = target.reshape(-1)
    return confusion_matrix(y, prob.argmax(1), labels=list(range(prob.shape[1]))).tolist()


def markdown_summary(report: dict[str, Any]) -> str:
    """A short Markdown table of the metrics with their 95% CIs."""
    lines = [f"# Evaluation: {report['split']} split", "",
             f"Run: `{report['run_dir']}` (checkpoint `{report['checkpoint']}`), {report['n_items']} items, "
             f"{report['n_boot']} bootstrap resamples.", "", "| metric | value | 95% CI |", "|---|---|---|"]
    for name, m in report["metrics"].items():
        lines.append(f"| {name} | {m['value']:.4f} | {m['low']:.4f} – {m['high']:.4f} |")
    if report.get("confusion_matrix"):
        lines += ["", "Confusion matrix (rows: truth, columns: prediction):", ""]
        lines += ["    " + " ".join(f"{v:5d}" for v in row) for row in report["confusion_matrix"]]
    for plot in report.get("plots", []):
        lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


def plot_classification(preds: dict[str, np.ndarray], info: dict[str, Any], out: Path, split: str) -> list[Path]:
    """ROC curves, confusion matrix and reliability diagram as PNGs; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    target, prob = preds["target"], preds["prob"]
    if target.ndim == 2 and target.shape[1] > 1:
        return []
    y = target.reshape(-1)
    names = info.get("class_names") or [str(i) for i in range(prob.shape[1])]
    paths = []
    fig, ax = plt.subplots(figsize=(4.2, 4))
    classes = [1] if prob.shape[1] == 2 else range(prob.shape[1])
    for c in classes:
        if len(np.unique(y == c)) == 2:
            RocCurveDisplay.from_predictions(y == c, prob[:, c], name=f"{names[c]}", ax=ax)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title(f"ROC ({split})")
    paths.append(_save(fig, out / f"roc_{split}.png"))
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ConfusionMatrixDisplay.from_predictions(y, prob.argmax(1), labels=list(range(prob.shape[1])),
                                            display_labels=names, ax=ax, colorbar=False)
    ax.set_title(f"Confusion matrix ({split})")
    paths.append(_save(fig, out / f"confusion_{split}.png"))
    fig, ax = plt.subplots(figsize=(4.2, 4))
    top = prob.max(1)
    correct = (prob.argmax(1) == y).astype(int)
    frac, mean_conf = calibration_curve(correct, top, n_bins=10, strategy="uniform")
    ax.plot(mean_conf, frac, marker="o", label="model")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"Reliability ({split})")
    ax.legend()
    paths.append(_save(fig, out / f"reliability_{split}.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_runs(run_a: str | Path, run_b: str | Path, split: str = "test", n_boot: int = 1000) -> dict[str, Any]:
    """Paired bootstrap comparison of two runs' metrics on the same items of `split`."""
    run_a, run_b = Path(run_a), Path(run_b)
    preds = []
    for run in (run_a, run_b):
        path = run / f"predictions_{split}.npz"
        if not path.is_file():
            evaluate_run(run, split, n_boot=0)
        with np.load(path) as f:
            preds.append({k: f[k] for k in f.files})
    # Items are paired by their targets (classification) or their dataset index (segmentation).
    key = "target" if "target" in preds[0] else "index"
    if key not in preds[1] or not np.array_equal(preds[0][key], preds[1][key]):
        raise MedaiError(f"{run_a} and {run_b} were not evaluated on the same items of '{split}'")
    _, task, _, _ = load_run(run_a)
    result = {"a": str(run_a), "b": str(run_b), "split": split, "n_boot": n_boot,
              "metrics": paired_bootstrap(task.metrics, preds[0], preds[1], n_boot=n_boot)}
    (run_a / f"compare_{split}_{run_b.name}.json").write_text(json.dumps(result, indent=2, default=float))
    return result
