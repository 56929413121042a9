"""LoadDicomSeriesd feeds a real TCIA series into a MONAI pipeline with its geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
from monai.transforms import Compose, Orientationd, Spacingd  # noqa: E402

from medai.errors import DicomSeriesError  # noqa: E402
from medai.io.dicom import load_series, scan_folder  # noqa: E402
from medai.transforms.dicom import LoadDicomSeriesd  # noqa: E402


def test_load_dicom_series_into_monai_pipeline(dicom_brain_tumor_progression_path):
    folder = dicom_brain_tumor_progression_path / "Study1" / "13_HCropVolume"
    volume = load_series(folder)
    out = LoadDicomSeriesd("image")({"image": folder})
    image = out["image"]
    assert tuple(image.shape) == (1,) + volume.array.shape
    np.testing.assert_allclose(image.affine.numpy(), volume.affine_ras)
    assert image.meta["SeriesInstanceUID"] == volume.metadata["SeriesInstanceUID"]
    assert torch.equal(image[0], torch.as_tensor(volume.array))
    # MONAI spatial transforms use the affine: resampling to 2 mm halves the extent.
    resampled = Compose([Orientationd("image", "RAS", labels=None), Spacingd("image", (2.0, 2.0, 2.0))])(out)["image"]
    extent = np.array(volume.array.shape) * np.array(volume.spacing_mm)
    np.testing.assert_allclose(sorted(np.array(resampled.shape[1:]) * 2.0), sorted(extent), atol=4.0)


def test_series_record_input_and_no_geometry_refusal(dicom_pydicom_data_path, dicom_dcmqi_path):
    record = scan_folder(dicom_dcmqi_path / "segmentations" / "ct-3slice").all_series()[0]
    assert LoadDicomSeriesd("image")({"image": record})["image"].shape[-1] == 3
    with pytest.raises(DicomSeriesError, match="no patient geometry"):
        LoadDicomSeriesd("image")({"image": dicom_pydicom_data_path / "emri_small.dcm"})
    loose = LoadDicomSeriesd("image", require_geometry=False)({"image": dicom_pydicom_data_path / "emri_small.dcm"})
    assert loose["image"].meta["geometry"] == "none"
