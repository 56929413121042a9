"""Evaluation reports, CIs and paired comparison on runs trained on real BreastMNIST."""

import json

import pytest
import yaml

from medai.pipelines.evaluate import compare_runs, evaluate_run
from medai.pipelines.finetune import finetune
from medai.pipelines.train_config import load_train_config


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
