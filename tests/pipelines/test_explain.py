"""Grad-CAM: it finds known evidence in a hand-built model, and runs on MedViT with a real image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medai.errors import ModelInputError
from medai.models import create_model
from medai.pipelines.explain import default_cam_layer, grad_cam, save_cam_overlay


class BrightnessClassifier(nn.Module):
    """Class 1 score = mean of ReLU(image): the evidence is wherever the image is bright."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.features.weight)
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))

    def forward(self, x):
        return self.head(torch.relu(self.features(x)).mean((2, 3)))


def test_cam_peaks_where_the_evidence_is():
    image = torch.zeros(1, 32, 32)
    image[0, 20:26, 4:10] = 1.0
    result = grad_cam(BrightnessClassifier(), image, class_index=1, layer="features")
    assert result.cam.shape == (32, 32) and 0 <= result.cam.min() and result.cam.max() == pytest.approx(1.0)
    assert result.cam[20:26, 4:10].mean() > 0.9
    assert result.cam[:14, 16:].max() < 0.1
    assert result.class_index == 1 and 0.5 < result.probability <= 1


def test_medvit_cam_on_a_real_breastmnist_image(breastmnist_path, tmp_path):
    image = np.load(breastmnist_path)["test_images"][0]
    x = (torch.from_numpy(image).float()[None] / 255 - 0.5) / 0.5
    torch.manual_seed(0)
    model = create_model("medvit_tiny", in_chans=1, num_classes=2)
    assert default_cam_layer(model, (28, 28)) == "blocks.1"  # stage 1 ends at 7x7 for 28 px
    assert default_cam_layer(model, (224, 224)) == f"blocks.{len(model.blocks) - 1}"
    result = grad_cam(model, x)
    assert result.cam.shape == (28, 28) and np.isfinite(result.cam).all()
    assert result.class_index == int(model.eval()(x[None]).argmax())
    png = save_cam_overlay(image, result.cam, tmp_path / "cam.png", title="test")
    from PIL import Image

    with Image.open(png) as written:
        assert written.format == "PNG" and min(written.size) >= 100


def test_batch_is_refused():
    with pytest.raises(ModelInputError, match="one image"):
        grad_cam(BrightnessClassifier(), torch.zeros(2, 1, 8, 8), layer="features")


def test_explain_run_writes_one_png_per_item(breastmnist_path, tmp_path):
    """A run folder as `medai finetune` leaves it (config + best weights) -> Grad-CAM PNGs."""
    import shutil

    from medai.models import save_weights
    from medai.pipelines.explain import explain_run

    run = tmp_path / "run"
    (run / "checkpoints" / "best").mkdir(parents=True)
    config = (Path(__file__).resolve().parents[2] / "configs" / "breastmnist_medvit_tiny.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("${MEDAI_DATA}/medmnist/breastmnist.npz", str(breastmnist_path)))
    torch.manual_seed(0)
    save_weights(create_model("medvit_tiny", in_chans=1, num_classes=2), run / "checkpoints" / "best" / "model.safetensors")
    written = explain_run(run, "test", indices=(0, 5))
    assert [p.name for p in written] == ["test_0.png", "test_5.png"] and all(p.stat().st_size > 1000 for p in written)
    shutil.rmtree(run)
