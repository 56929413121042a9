"""Metrics from well-kept libraries (scikit-learn, torchmetrics, MONAI) with bootstrap CIs.

Nothing here is hand-rolled beyond the bootstrap loop: each point metric is one library call.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

MetricFn = Callable[[np.ndarray, np.ndarray], float]



def _positive_scores(prob: np.ndarray) -> np.ndarray:
    return prob[:, 1] if prob.ndim == 2 and prob.shape[1] == 2 else prob.reshape(len(prob), -1)[:, -1]


def classification_metric_fns(task: str, num_classes: int) -> dict[str, MetricFn]:
    """Return {name: fn(target, prob)} for a task ('binary', 'multiclass', 'ordinal', 'multilabel')."""
    from sklearn import metrics as skm

    if task == "multilabel":
        return {
            "auroc": lambda y, p: float(skm.roc_auc_score(y, p, average="macro")),
            "auprc": lambda y, p: float(skm.average_precision_score(y, p, average="macro")),
            "accuracy": lambda y, p: float(((p >= 0.5) == y).mean()),
            "f1": lambda y, p: float(skm.f1_score(y, p >= 0.5, average="macro", zero_division=0)),
        }
    labels = list(range(num_classes))

    def auroc(y: np.ndarray, p: np.ndarray) -> float:
        if task == "binary":
            return float(skm.roc_auc_score(y, _positive_scores(p)))
        return float(skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels))

    def auprc(y: np.ndarray, p: np.ndarray) -> float:
        if task == "binary":
            return float(skm.average_precision_score(y, _positive_scores(p)))
        onehot = np.eye(num_classes)[y]
        return float(skm.average_precision_score(onehot, p, average="macro"))

    return {
        "auroc": auroc,
        "auprc": auprc,
        "accuracy": lambda y, p: float(skm.accuracy_score(y, p.argmax(1))),
        "balanced_accuracy": lambda y, p: float(skm.balanced_accuracy_score(y, p.argmax(1))),
        "f1": lambda y, p: float(
            skm.f1_score(y, p.argmax(1), average="binary" if task == "binary" else "macro", zero_division=0)
        ),
        "ece": lambda y, p: expected_calibration_error(y, p),
    }


def expected_calibration_error(target: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error (torchmetrics' CalibrationError, L1, 15 bins)."""
    import torch
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    p = torch.as_tensor(prob, dtype=torch.float32)
    t = torch.as_tensor(target, dtype=torch.long)
    if p.shape[1] == 2:
        return float(binary_calibration_error(p[:, 1], t, n_bins=n_bins))
    return float(multiclass_calibration_error(p, t, num_classes=p.shape[1], n_bins=n_bins))


def classification_metrics(target: np.ndarray, prob: np.ndarray, task: str) -> dict[str, float]:
    """Point metrics of one set of predictions (NaN where a metric is undefined, e.g. one class)."""
    target = _squeeze_target(target, task)
    out = {}
    for name, fn in classification_metric_fns(task, prob.shape[1]).items():
        try:
            out[name] = fn(target, prob)
        except ValueError as exc:  # e.g. AUROC with a single class present
            log.debug("metric %s undefined: %s", name, exc)
            out[name] = float("nan")
    return out


def _squeeze_target(target: np.ndarray, task: str) -> np.ndarray:
    if task != "multilabel" and target.ndim == 2:
        return target[:, 0]
    return target


Predictions = dict[str, np.ndarray]
MetricsFn = Callable[[Predictions], dict[str, float]]


def _subset(preds: Predictions, idx: np.ndarray) -> Predictions:
    return {k: v[idx] for k, v in preds.items()}


def bootstrap_ci(
    metrics_fn: MetricsFn, preds: Predictions, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap over items of every metric: {metric: {value, low, high, n_boot_valid}}.

    `metrics_fn` maps a predictions dict (arrays aligned on items) to named metrics; resamples
    where a metric is undefined (e.g. one class only) are left out and counted.
    """
    rng = np.random.default_rng(seed)
    n = len(next(iter(preds.values())))
    point = metrics_fn(preds)
    draws: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(n_boot):
        values = metrics_fn(_subset(preds, rng.integers(0, n, n)))
        for name, value in values.items():
            if name in draws and value is not None and np.isfinite(value):
                draws[name].append(value)
    out = {}
    for name, value in point.items():
        arr = np.asarray(draws[name])
        low, high = np.quantile(arr, [alpha / 2, 1 - alpha / 2]) if len(arr) else (np.nan, np.nan)
        out[name] = {"value": float(value), "low": float(low), "high": float(high), "n_boot_valid": int(len(arr))}
    return out


def paired_bootstrap(
    metrics_fn: MetricsFn, preds_a: Predictions, preds_b: Predictions, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Paired bootstrap of metric(a) - metric(b) on the same items: difference, 95% CI, two-sided p."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(preds_a.values())))
    point_a, point_b = metrics_fn(preds_a), metrics_fn(preds_b)
    diffs: dict[str, list[float]] = {name: [] for name in point_a}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        a, b = metrics_fn(_subset(preds_a, idx)), metrics_fn(_subset(preds_b, idx))
        for name in diffs:
            d = a[name] - b[name]
            if np.isfinite(d):
                diffs[name].append(d)
    out = {}
    for name in point_a:
        arr = np.asarray(diffs[name])
        if len(arr):
            low, high = np.quantile(arr, [0.025, 0.975])
            # how often the resampled difference falls on the other side of zero, both tails
            p_value = float(min(1.0, 2 * min((arr <= 0).mean(), (arr >= 0).mean())))
        else:
            low = high = p_value = float("nan")
        out[name] = {"a": float(point_a[name]), "b": float(point_b[name]),
                     "difference": float(point_a[name] - point_b[name]),
                     "low": float(low), "high": float(high), "p_value": p_value}
    return out


def segmentation_metrics(
    pred: np.ndarray, target: np.ndarray, num_classes: int, spacing_mm: tuple[float, ...] | None = None
) -> dict[str, list[float]]:
    """Per-label Dice and HD95 (mm when spacing is given) of label maps (N, *spatial), via MONAI."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_dice
    from monai.networks.utils import one_hot

    p = one_hot(torch.as_tensor(pred)[:, None].long(), num_classes)
    t = one_hot(torch.as_tensor(target)[:, None].long(), num_classes)
    dice = compute_dice(p, t, include_background=False, ignore_empty=True)
    hd95 = compute_hausdorff_distance(
        p, t, include_background=False, percentile=95, spacing=list(spacing_mm) if spacing_mm else None
    )
    return {"dice": dice.numpy().tolist(), "hd95": hd95.numpy().tolist()}


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-4 and mean ROUGE-L F1 (torchmetrics), and exact-match accuracy (normalised)."""
    from torchmetrics.functional.text import bleu_score, rouge_score

    bleu = float(bleu_score(predictions, [[r] for r in references]))
    rouge = rouge_score(predictions, references, rouge_keys="rougeL")
    from medai.io.vqa_rad import normalize_answer

    exact = float(np.mean([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]))
    return {"bleu": bleu, "rougeL_f1": float(rouge["rougeL_fmeasure"]), "exact_match": exact}
