"""Every metric medai reports, and the bootstrap that puts 95% CIs on them.

Classification and segmentation metrics are library calls (scikit-learn, torchmetrics, MONAI).
Answer and report text scoring follows the VQA-RAD literature: closed questions by exact match
after normalisation (for yes/no answers the first yes/no word of a free-text reply is the answer,
since generative models say "Yes, there is ..."), open questions by exact match and by token
recall (LLaVA-Med's "recall": the share of the reference's tokens found in the reply) and token F1;
sentence BLEU and ROUGE-L on the same normalised tokens. One percentile bootstrap over items
(`bootstrap_ci`) gives every CI; `mean_ci` is its form for a list of per-item scores.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Callable, Sequence

import numpy as np

from medai.io.vqa_rad import normalize_answer

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


def mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Return (mean, 2.5th, 97.5th percentile) of per-item scores, by `bootstrap_ci` over items."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return (float("nan"),) * 3
    ci = bootstrap_ci(lambda p: {"mean": float(np.mean(p["score"]))}, {"score": arr}, n_boot=n_boot, seed=seed)
    return ci["mean"]["value"], ci["mean"]["low"], ci["mean"]["high"]


def mean_difference_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float, float]:
    """Return mean(a - b) with a 95% CI, resampling items jointly (a and b scored on the same items)."""
    return mean_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), n_boot, seed)


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


_YES_NO = ("yes", "no")


def extract_closed_answer(prediction: str, reference_norm: str) -> str:
    """Return the normalised answer a reply gives to a closed question (first yes/no word when relevant)."""
    pred = normalize_answer(prediction)
    if reference_norm in _YES_NO:
        for word in pred.split():
            if word in _YES_NO:
                return word
    return pred


def closed_correct(prediction: str, reference_norm: str) -> bool:
    """True when a closed-question reply matches the normalised reference exactly."""
    return extract_closed_answer(prediction, reference_norm) == reference_norm


def token_scores(prediction: str, reference: str) -> dict[str, float]:
    """Return exact match, token recall, precision and F1 between normalised texts (0..1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    exact = float(pred == ref)
    if not pred or not ref:
        return {"exact": exact, "recall": float(not ref), "precision": float(not pred), "f1": exact}
    overlap = sum((Counter(pred) & Counter(ref)).values())
    recall, precision = overlap / len(ref), overlap / len(pred)
    f1 = 0.0 if overlap == 0 else 2 * recall * precision / (recall + precision)
    return {"exact": exact, "recall": recall, "precision": precision, "f1": f1}


def bleu(prediction: str, reference: str, max_n: int = 4) -> float:
    """Return sentence BLEU (geometric mean of 1..max_n-gram precisions, brevity penalty, +1 smoothing)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        pred_ngrams = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
        ref_ngrams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        matches = sum((pred_ngrams & ref_ngrams).values())
        total = max(sum(pred_ngrams.values()), 0)
        # Lin & Och's add-one smoothing for n > 1 keeps short answers from scoring zero outright.
        p = (matches + (n > 1)) / (total + (n > 1)) if total + (n > 1) else 0.0
        if p == 0:
            return 0.0
        log_p += math.log(p) / max_n
    brevity = 1.0 if len(pred) >= len(ref) else math.exp(1 - len(ref) / len(pred))
    return brevity * math.exp(log_p)


def rouge_l(prediction: str, reference: str) -> float:
    """Return ROUGE-L F1 (longest common subsequence of normalised tokens)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return 0.0
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if p == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    recall, precision = lcs / len(ref), lcs / len(pred)
    return 2 * recall * precision / (recall + precision)
