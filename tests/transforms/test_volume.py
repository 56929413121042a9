"""Volume checks on real MSD Hippocampus files, and the bad inputs real data lacks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medai.errors import InvalidVolumeError
from medai.transforms.volume import CheckVolumed, segmentation_transforms

CASE = "hippocampus_001"


def paths(root):
    return {"image": str(root / "images" / f"{CASE}.nii.gz"), "label": str(root / "labels" / f"{CASE}.nii.gz")}


def test_real_volume_passes_and_is_normalised(msd_hippocampus_path):
    item = segmentation_transforms("val", (32, 48, 32))(paths(msd_hippocampus_path))
    image, label = item["image"], item["label"]
    raw = nib.load(paths(msd_hippocampus_path)["image"])
    assert image.shape == (1, *raw.shape)  # 1 mm data: Spacingd keeps the grid
    inside = image[image != 0]
    assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05
    assert set(torch.unique(label).tolist()) == {0, 1, 2}


def test_train_transform_crops_to_the_roi(msd_hippocampus_path):
    item = segmentation_transforms("train", (32, 48, 32))(paths(msd_hippocampus_path))
    assert item["image"].shape == (1, 32, 48, 32) and item["label"].shape == (1, 32, 48, 32)


def write(tmp_path, name, array, zooms=(1.0, 1.0, 1.0)):
    affine = np.diag([*zooms, 1.0])
    path = tmp_path / name
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def good_volume():
    rng = np.random.default_rng(0)
    return rng.random((10, 12, 8)).astype(np.float32)


@pytest.mark.parametrize(
    "array,zooms,message",
    [
        (np.random.default_rng(0).random((10, 12)).astype(np.float32), (1.0, 1.0), "3D volume"),
        (np.random.default_rng(0).random((10, 12, 8, 3)).astype(np.float32), (1.0, 1.0, 1.0, 1.0), "3D volume"),
        (np.zeros((10, 12, 8), np.float32), (1.0, 1.0, 1.0), "empty volume"),
        (np.where(good_volume() > 0.99, np.nan, good_volume()).astype(np.float32), (1.0, 1.0, 1.0), "NaN"),
        (good_volume(), (1.0, 1e-6, 1.0), "spacing"),
        (good_volume(), (1.0, 100.0, 1.0), "spacing"),
    ],
)
def test_bad_images_raise_naming_the_file(tmp_path, array, zooms, message):
    path = write(tmp_path, "bad.nii.gz", array, zooms[:3] if len(zooms) >= 3 else (*zooms, 1.0))
    with pytest.raises(InvalidVolumeError, match=message) as info:
        segmentation_transforms("infer", (8, 8, 8), with_label=False)({"image": path})
    assert "bad.nii.gz" in str(info.value)


def test_label_problems_are_named(tmp_path):
    image = write(tmp_path, "img.nii.gz", good_volume())
    wrong_values = write(tmp_path, "lab.nii.gz", np.full((10, 12, 8), 7, np.uint8))
    with pytest.raises(InvalidVolumeError, match=r"unexpected label values \[7\]"):
        segmentation_transforms("val", (8, 8, 8))({"image": image, "label": wrong_values})
    wrong_shape = write(tmp_path, "lab2.nii.gz", np.zeros((10, 12, 9), np.uint8))
    with pytest.raises(InvalidVolumeError, match="lab2.nii.gz.*differs"):
        segmentation_transforms("val", (8, 8, 8))({"image": image, "label": wrong_shape})


def test_check_accepts_in_memory_tensors_without_metadata():
    checked = CheckVolumed(label_key=None)({"image": torch.rand(1, 4, 4, 4)})
    assert checked["image"].shape == (1, 4, 4, 4)
    with pytest.raises(InvalidVolumeError, match="<in-memory volume>"):
        CheckVolumed(label_key=None)({"image": torch.rand(4, 4, 4)})
