"""MIL benchmark: k-fold cross-validation of several MIL models on one bag set, through the shared engine.

`run_mil_benchmark(path)` (CLI: `medai mil benchmark PATH`) trains every (model, seed, fold) as
an ordinary `medai finetune` run (task `mil`), pools each (model, seed)'s out-of-fold test
predictions over all bags, and reports accuracy, AUROC, balanced accuracy and F1 with
percentile-bootstrap 95% CIs over bags, plus mean and SD across seeds. The seed also selects
the fold assignment, and every model sees the same folds for a given seed (identical splits).
Runs already finished are reused, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Small widths: the classic sets have 166/230-d features and a few dozen bags per fold.
DEFAULT_MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "abmil": {"hidden_features": 128, "attention_features": 64},
    "acmil": {"hidden_features": 128, "attention_features": 64},
    "acmil_aem": {"hidden_features": 128, "attention_features": 64},
    "abmil_aem": {"hidden_features": 128, "attention_features": 64},
    "transmil": {"dim": 64, "heads": 4, "landmarks": 32},
}
HEADLINE = ("accuracy", "auroc", "balanced_accuracy", "f1")


@dataclass
class BenchmarkSettings:
    """What to run: models, folds, seeds, epochs and optimiser settings."""

    models: tuple[str, ...] = ("abmil", "acmil", "acmil_aem", "transmil")
    folds: int = 10
    seeds: tuple[int, ...] = (0,)
    epochs: int = 20
    lr: float = 5e-4
    weight_decay: float = 1e-4
    standardize: bool = True
    val_fraction: float = 0.1
    max_instances: int | None = None
    data_options: dict[str, Any] = field(default_factory=dict)  # more MIL task options (e.g. MedMNIST-bags size)
    n_boot: int = 1000
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_MODEL_KWARGS))


def headline_metrics(preds: dict[str, np.ndarray], task_type: str) -> dict[str, float]:
    """Accuracy, AUROC, balanced accuracy and F1 only (the bootstrap recomputes them 1000 times)."""
    from medai.pipelines.metrics import classification_metric_fns

    if task_type == "binary":
        return _binary_headline(preds["target"].astype(int), preds["prob"][:, 1])
    fns = classification_metric_fns(task_type, preds["prob"].shape[1])
    out = {}
    for name in HEADLINE:
        try:
            out[name] = fns[name](preds["target"], preds["prob"])
        except ValueError:  # one class only in a resample
            out[name] = float("nan")
    return out


def _binary_headline(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Binary accuracy, AUROC (Mann-Whitney with mid-ranks), balanced accuracy and F1 in NumPy.

    Same values as scikit-learn's (checked in tests) at a fraction of its per-call overhead,
    which dominates a 1000-resample bootstrap of a few dozen bags.
    """
    from scipy.stats import rankdata

    pred = score >= 0.5
    pos, neg = y == 1, y == 0
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    tp, tn = int((pred & pos).sum()), int((~pred & neg).sum())
    fp, fn = int((pred & neg).sum()), int((~pred & pos).sum())
    nan = float("nan")
    auroc = nan
    if n_pos and n_neg:
        ranks = rankdata(score)
        auroc = float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    recalls = [tp / n_pos if n_pos else nan, tn / n_neg if n_neg else nan]
    return {
        "accuracy": (tp + tn) / len(y),
        "auroc": auroc,
        # sklearn averages the recall of the classes present
        "balanced_accuracy": float(np.nanmean(recalls)),
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0,
    }


def _fold_config(path: Path, model: str, seed: int, fold: int, s: BenchmarkSettings, runs_dir: Path):
    from medai.pipelines.train_config import DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, TrainerConfig

    options = {"folds": s.folds, "fold": fold, "split_seed": seed, "standardize": s.standardize,
               "val_fraction": s.val_fraction, "max_instances": s.max_instances, **s.data_options}
    return TrainConfig(
        task="mil",
        model=ModelConfig(name=model, kwargs=dict(s.model_kwargs.get(model, {}))),
        data=DataConfig(path=path, batch_size=1, options=options),
        optim=OptimConfig(name="adamw", lr=s.lr, weight_decay=s.weight_decay),
        schedule=ScheduleConfig(name="cosine"),
        trainer=TrainerConfig(epochs=s.epochs, clip_grad_norm=None, deterministic=False, n_boot=0,
                              log_every_steps=100),
        seed=seed,
        output_dir=runs_dir,
        run_name=f"{model}/seed{seed}/fold{fold}",
    )


def _reusable(run_dir: Path, cfg: Any, data_identity: list) -> bool:
    """True when a finished fold was trained exactly as asked; raise MedaiError naming what differs otherwise."""
    from medai.config import from_dict, read_yaml, to_dict
    from medai.errors import MedaiError
    from medai.pipelines.train_config import TrainConfig, config_diffs

    if not (run_dir / "predictions_test.npz").is_file():
        return False
    saved = to_dict(from_dict(TrainConfig, read_yaml(run_dir / "config.yaml"), source=run_dir / "config.yaml"))
    changed = config_diffs(saved, to_dict(cfg))
    identity_file = run_dir / "data_identity.json"
    if identity_file.is_file() and json.loads(identity_file.read_text()) != data_identity:
        changed.append("the bag file (size or time changed)")
    if changed:
        raise MedaiError(f"{run_dir} holds a fold trained with other settings ({', '.join(sorted(changed))}); "
                         "its results would be stale: use another output folder, or remove that one to retrain")
    return True


def _fold_predictions(run_dir: Path, test_ids: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    preds = np.load(run_dir / "predictions_test.npz")
    ids = [test_ids[i] for i in preds["index"].ravel()]
    return ids, preds["prob"], preds["target"].ravel()


def run_mil_benchmark(path: str | Path, settings: BenchmarkSettings, output_dir: str | Path) -> dict[str, Any]:
    """Cross-validate every model over every seed; return and write {model: {seed: metrics with CIs}, summary}."""
    from medai.io.datasets import load_dataset
    from medai.io.datasets.bags import bag_splits
    from medai.pipelines.finetune import finetune
    from medai.pipelines.metrics import bootstrap_ci
    from medai.pipelines.tasks.mil import MILOptions
    from medai.utils import file_identity

    path, output_dir = Path(path), Path(output_dir)
    runs_dir = output_dir / "runs"
    data = load_dataset(path, kind="bags", **vars(MILOptions(**settings.data_options)))
    bags = data.items
    fixed_split = bool(data.splits)
    if fixed_split:  # the bags' own split (MedMNIST-bags: official image splits): one "fold", repeated over seeds
        settings = replace(settings, folds=1)
    labels = np.array([b.label for b in bags])
    ids = [b.bag_id for b in bags]
    task_type = "binary" if labels.max() <= 1 else "multiclass"
    # the bag set's files: a rerun on a changed file must not reuse folds trained on the old one
    identity = file_identity(path)
    results: dict[str, Any] = {"dataset": str(path), "n_bags": len(bags), "settings": settings.__dict__, "models": {},
                               "split": "fixed" if fixed_split else "cv",
                               "n_test_bags": len(data.splits.get("test", ()))}
    for model in settings.models:
        per_seed = {}
        for seed in settings.seeds:
            pooled_ids, pooled_prob, pooled_target = [], [], []
            for fold in range(settings.folds):
                split = bag_splits(data, settings.folds, fold, seed, settings.val_fraction)
                cfg = _fold_config(path, model, seed, fold, settings, runs_dir)
                run_dir = runs_dir / model / f"seed{seed}" / f"fold{fold}"
                if not _reusable(run_dir, cfg, identity):
                    log.info("training %s seed %d fold %d/%d", model, seed, fold + 1, settings.folds)
                    finetune(cfg)
                    (run_dir / "data_identity.json").write_text(json.dumps(identity))
                fold_ids, prob, target = _fold_predictions(run_dir, [ids[i] for i in split["test"]])
                pooled_ids += fold_ids
                pooled_prob.append(prob)
                pooled_target.append(target)
            preds = {"prob": np.concatenate(pooled_prob), "target": np.concatenate(pooled_target)}
            metrics = bootstrap_ci(lambda p: headline_metrics(p, task_type), preds, n_boot=settings.n_boot, seed=seed)
            per_seed[seed] = {k: metrics[k] for k in HEADLINE if k in metrics}
            log.info("%s seed %d: %s", model, seed, {k: round(v["value"], 3) for k, v in per_seed[seed].items()})
        summary = {}
        for metric in HEADLINE:
            values = np.array([per_seed[s][metric]["value"] for s in settings.seeds], dtype=float)
            summary[metric] = {"mean": float(np.nanmean(values)),
                               "sd": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0}
        results["models"][model] = {"per_seed": per_seed, "summary": summary}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (output_dir / "results.md").write_text(results_markdown(results))
    return results


def _split_label(results: dict[str, Any]) -> str:
    if results.get("split") == "fixed":
        return f"the bags' own train/val/test split, {results['n_test_bags']} test bags"
    return f"{results['settings']['folds']}-fold CV"


def _options_label(settings: dict[str, Any]) -> str:
    options = settings.get("data_options") or {}
    return (" [" + ", ".join(f"{k}={v}" for k, v in options.items()) + "]") if options else ""


def results_markdown(results: dict[str, Any]) -> str:
    """Format benchmark results as a markdown table (per seed with 95% CI, and mean ± SD across seeds)."""
    s = results["settings"]
    lines = [
        f"### {Path(results['dataset']).name}{_options_label(s)} ({results['n_bags']} bags; {_split_label(results)}, "
        f"seeds {list(s['seeds'])}, {s['epochs']} epochs)",
        "",
        "| model | seed | " + " | ".join(HEADLINE) + " |",
        "|---|---|" + "---|" * len(HEADLINE),
    ]
    for model, entry in results["models"].items():
        for seed, metrics in entry["per_seed"].items():
            cells = [f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]" for m in (metrics[k] for k in HEADLINE)]
            lines.append(f"| {model} | {seed} | " + " | ".join(cells) + " |")
        if len(entry["per_seed"]) > 1:
            cells = [f"{entry['summary'][k]['mean']:.3f} ± {entry['summary'][k]['sd']:.3f}" for k in HEADLINE]
            lines.append(f"| {model} | mean ± SD | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Test-split predictions per seed; [95% percentile-bootstrap CI over bags]." if results.get("split") == "fixed"
                 else "Out-of-fold predictions pooled over all bags per seed; [95% percentile-bootstrap CI over bags].")
    return "\n".join(lines) + "\n"
