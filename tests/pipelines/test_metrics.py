"""Metrics and their bootstrap CIs: classification, VQA answer scoring, text overlap."""

import numpy as np

from medai.pipelines.metrics import (bleu, bootstrap_ci, classification_metrics, closed_correct, mean_ci,
                                     mean_difference_ci, paired_bootstrap, rouge_l, token_scores)


def test_closed_and_open_scoring():
    assert closed_correct("Yes, there is a mass.", "yes") and not closed_correct("No.", "yes")
    assert closed_correct("Axial", "axial") and not closed_correct("The axial plane", "coronal")
    s = token_scores("the left lower lobe", "Left lobe")
    assert s["recall"] == 1.0 and s["exact"] == 0.0 and 0 < s["f1"] < 1
    assert token_scores("", "x")["f1"] == 0.0


def test_bleu_and_rouge_l():
    assert bleu("no acute findings", "no acute findings") == 1.0
    assert bleu("completely different words", "no acute findings") == 0.0
    assert 0 < bleu("no acute cardiopulmonary findings", "no acute findings") < 1
    assert rouge_l("lungs are clear", "the lungs are clear") == 1.0  # articles dropped by normalisation
    assert abs(rouge_l("x y z w", "x z") - 2 * (1.0 * 0.5) / 1.5) < 1e-9  # LCS 2: recall 1, precision 0.5


def test_mean_ci_brackets_the_estimate():
    est, lo, hi = mean_ci([1, 0, 1, 1] * 25)
    assert lo < est == 0.75 < hi
    d, dlo, dhi = mean_difference_ci(np.ones(50), np.zeros(50))
    assert d == dlo == dhi == 1.0
    assert all(np.isnan(mean_ci([])))


def test_mean_ci_keeps_the_numbers_of_the_former_text_bootstrap():
    # Values the VQA cards were computed with (text_metrics.bootstrap_ci before it became bootstrap_ci's form).
    assert mean_ci([1, 0, 1, 1] * 25) == (0.75, 0.67, 0.83)
    rng = np.random.default_rng(5)
    scores = rng.random(451)
    assert mean_ci(scores, n_boot=500, seed=3) == (0.4855411700926997, 0.4595474365195366, 0.5087231447787867)
    a, b = rng.random(97), rng.random(97)
    assert mean_difference_ci(a, b, n_boot=300) == (-0.037094939232434954, -0.10615269541096427, 0.028894708531548453)


def test_bootstrap_ci_covers_known_accuracy():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 2000)
    correct = rng.random(2000) < 0.8  # 80% accurate classifier
    pred = np.where(correct, target, 1 - target)
    prob = np.eye(2)[pred] * 0.9 + 0.05
    fn = lambda p: classification_metrics(p["target"], p["prob"], "binary")  # noqa: E731
    ci = bootstrap_ci(fn, {"target": target, "prob": prob}, n_boot=200)["accuracy"]
    assert ci["low"] < 0.8 < ci["high"] and ci["high"] - ci["low"] < 0.06


def test_paired_bootstrap_detects_a_real_difference():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 2, 500)
    good = np.eye(2)[np.where(rng.random(500) < 0.9, target, 1 - target)]
    bad = np.eye(2)[np.where(rng.random(500) < 0.6, target, 1 - target)]
    fn = lambda p: classification_metrics(p["target"], p["prob"], "binary")  # noqa: E731
    acc = paired_bootstrap(fn, {"target": target, "prob": good}, {"target": target, "prob": bad}, 200)["accuracy"]
    assert acc["difference"] > 0.2 and acc["low"] > 0 and acc["p_value"] < 0.01
