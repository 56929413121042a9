"""`medai seg` commands call the library and print what they wrote."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
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


@pytest.mark.parametrize("damage", ["cut", "wrong_name"])
def test_seg_predict_names_an_unreadable_volume(msd_hippocampus_path, tmp_path, damage):
    """Found by the hostile-input harness: a cut .nii.gz or a volume under another extension reached MONAI's
    loader, whose RuntimeError ('applying transform <LoadImaged ...>') was a traceback naming no file."""
    weights = save_weights(create_model("dynunet_3d", features=(4, 8, 8)), tmp_path / "w.safetensors")
    data = (msd_hippocampus_path / "images" / "hippocampus_004.nii.gz").read_bytes()
    image = tmp_path / ("cut.nii.gz" if damage == "cut" else "volume.dcm")
    image.write_bytes(data[: len(data) // 2] if damage == "cut" else data)
    result = runner.invoke(app, ["seg", "predict", str(image), "--model", "dynunet_3d", "--weights", str(weights),
                                 "--out", str(tmp_path / "pred.nii.gz"), "-o", "features=[4, 8, 8]"],
                           env={"COLUMNS": "400"})
    assert result.exit_code == 2 and image.name in result.output and "error:" in result.output, result.output
    assert not (tmp_path / "pred.nii.gz").exists()
