"""Acceptance run: BreastMNIST with a small CNN through `medai finetune` reaches test AUROC >= 0.85."""

import json
import os
import subprocess
import sys

import pytest

from medai.utils import shipped_file


@pytest.mark.slow
def test_breastmnist_resnet18_reaches_auroc(tmp_path, breastmnist_path):
    env = {**os.environ, "MEDAI_DATA": str(breastmnist_path.parent.parent)}
    config = shipped_file("configs/breastmnist_resnet18.yaml")
    train = subprocess.run([sys.executable, "-m", "medai.cli", "finetune", str(config), "-o", f"output_dir={tmp_path}"],
                           capture_output=True, text=True, env=env, timeout=3600)
    assert train.returncode == 0, train.stderr[-2000:]
    run = tmp_path / "classification-resnet18-seed0"
    evaluation = subprocess.run([sys.executable, "-m", "medai.cli", "evaluate", str(run), "--n-boot", "1000"],
                                capture_output=True, text=True, env=env, timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    auroc = json.loads((run / "eval_test.json").read_text())["metrics"]["auroc"]
    assert auroc["value"] >= 0.85, auroc
    assert auroc["low"] < auroc["value"] < auroc["high"]
