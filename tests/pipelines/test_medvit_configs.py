"""The MedViT training configs load strictly and build the model the task asks for."""

from __future__ import annotations

import pytest

from medai.utils import shipped_file
from medai.pipelines.train_config import load_train_config

CONFIGS = ["breastmnist_medvit_tiny.yaml", "breastmnist_efficientnet_lite0.yaml", "pneumoniamnist_medvit_tiny.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_strictly(name):
    cfg = load_train_config(shipped_file(f"configs/{name}"))
    assert cfg.task == "classification" and cfg.trainer.monitor == "val_auroc"
    assert str(cfg.data.path).endswith(".npz")


def test_baseline_shares_the_medvit_recipe():
    medvit = load_train_config(shipped_file("configs/breastmnist_medvit_tiny.yaml"))
    baseline = load_train_config(shipped_file("configs/breastmnist_efficientnet_lite0.yaml"))
    assert medvit.optim == baseline.optim and medvit.schedule == baseline.schedule
    assert medvit.trainer == baseline.trainer and medvit.data == baseline.data
    assert baseline.model.pretrained == "imagenet"
