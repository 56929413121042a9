"""Evaluation reports, CIs and paired comparison on runs trained on real BreastMNIST."""

import json

import numpy as np
import pytest
import yaml

from medai.pipelines.evaluate import compare_runs, evaluate_run
from medai.pipelines.finetune import finetune
from medai.pipelines.train_config import load_train_config
from medai.pipelines.metrics import bootstrap_ci, classification_metrics, paired_bootstrap


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, breastmnist_path):
    root = tmp_path_factory.mktemp("eval")
    runs = []
    for seed in (1, 2):
        cfg = {"task": "classification", "model": {"name": "resnet10t"},
               "data": {"path": str(breastmnist_path), "batch_size": 32},
               "trainer": {"epochs": 1, "limit_train_batches": 2, "evaluate_test": False},
               "seed": seed, "output_dir": str(root)}
        path = root / f"cfg{seed}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        runs.append(finetune(load_train_config(path)).run_dir)
    return runs


def test_evaluate_writes_report_with_cis(two_runs):
    report = evaluate_run(two_runs[0], "test", n_boot=100)
    assert report["n_items"] == 156 and sum(map(sum, report["confusion_matrix"])) == 156
    for name in ("auroc", "auprc", "accuracy", "balanced_accuracy", "f1", "ece"):
        m = report["metrics"][name]
        assert m["low"] <= m["value"] <= m["high"], name
    assert json.loads((two_runs[0] / "eval_test.json").read_text())["split"] == "test"
    assert "| auroc |" in (two_runs[0] / "eval_test.md").read_text()


def test_paired_comparison_of_two_runs(two_runs):
    result = compare_runs(two_runs[0], two_runs[1], "test", n_boot=100)
    auroc = result["metrics"]["auroc"]
    assert auroc["difference"] == pytest.approx(auroc["a"] - auroc["b"])
    assert auroc["low"] <= auroc["difference"] <= auroc["high"]
    assert 0.0 <= auroc["p_value"] <= 1.0
    self_cmp = compare_runs(two_runs[0], two_runs[0], "test", n_boot=50)["metrics"]["auroc"]
    assert self_cmp["difference"] == 0 and self_cmp["low"] == self_cmp["high"] == 0


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
