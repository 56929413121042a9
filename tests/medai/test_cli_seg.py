"""`medai seg` commands call the library and print what they wrote."""

from __future__ import annotations

import json

import nibabel as nib
import torch
from typer.testing import CliRunner

from medai.cli import app
from medai.models import create_model, save_weights

runner = CliRunner()


def test_seg_split_writes_the_committed_split(msd_hippocampus_path, tmp_path):
    out = tmp_path / "split.json"
    result = runner.invoke(app, ["seg", "split", str(msd_hippocampus_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "160 train, 40 validation" in " ".join(result.output.split())  # rich wraps lines
    assert json.loads(out.read_text()) == json.loads(open("configs/splits/msd_task04_hippocampus.json").read())


def test_seg_predict_writes_nifti(msd_hippocampus_path, tmp_path):
    torch.manual_seed(0)
    weights = save_weights(create_model("dynunet_3d", features=(4, 8, 8)), tmp_path / "w.safetensors")
    image = msd_hippocampus_path / "images" / "hippocampus_004.nii.gz"
    out = tmp_path / "pred.nii.gz"
    result = runner.invoke(app, ["seg", "predict", str(image), "--model", "dynunet_3d", "--weights", str(weights),
                                 "--out", str(out), "-o", "features=[4, 8, 8]"])
    assert result.exit_code == 0, result.output
    assert nib.load(str(out)).shape == nib.load(str(image)).shape
