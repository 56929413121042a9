"""Answer and report text metrics: VQA closed/open scoring, BLEU, ROUGE-L, bootstrap CIs.

VQA-RAD scoring follows the literature: closed questions by exact match after normalisation
(for yes/no answers the first yes/no word of a free-text reply is the answer, since generative
models say "Yes, there is ..."), open questions by exact match and by token recall (LLaVA-Med's
"recall": the share of the reference's tokens found in the reply) and token F1.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import numpy as np

from medai.io.vqa_rad import normalize_answer

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


def bootstrap_ci(
    values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Return (estimate, 2.5th, 97.5th percentile) of a statistic over items, by percentile bootstrap."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    stats = np.array([statistic(arr[row]) for row in idx])
    return float(statistic(arr)), float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Return mean(a - b) with a 95% CI, resampling items jointly (a and b scored on the same items)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return bootstrap_ci(diff, np.mean, n_boot, seed)
