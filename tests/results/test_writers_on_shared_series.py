"""SEG and SR writing over every shared DICOM image series: written and valid, or refused with a reason.

De-identified archives drop Type 2 patient elements (the TCIA crops have no PatientBirthDate); such
sources used to end in highdicom's AttributeError. Now each series is written, or refused with a
typed medai error that names the file and the reason (no patient geometry, no Frame of Reference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medai.errors import DicomError
from medai.io.dicom import load_series, scan_folder
from medai.results.dicom_seg import SegmentSpec, read_segmentation, write_segmentation
from medai.results.dicom_sr import MeasurementGroupSpec, MeasurementSpec, measurements_from_report, write_measurement_report
from medai.results.validate import dciodvfy
from tests.conftest import require_system_tool


@pytest.fixture(scope="module")
def image_series(shared_data):
    index = scan_folder(shared_data / "dicom")
    return [s for s in index.all_series() if s.kind == "image"]


def test_every_shared_series_is_written_or_refused_with_a_reason(image_series, tmp_path):
    written, refused = [], []
    for series in image_series:
        try:
            volume = load_series([i.path for i in series.instances])
        except DicomError:
            continue  # the loader's own refusals are tested in tests/io/test_dicom.py
        if volume.array.ndim != 3:
            continue
        labels = np.zeros(volume.array.shape, np.uint8)
        labels[tuple(slice(d // 3, max(d // 3 + 1, 2 * d // 3)) for d in volume.array.shape)] = 1
        out = tmp_path / series.series_uid
        try:
            seg = write_segmentation(labels, volume, [SegmentSpec(1, "Region", "Tissue")], out / "seg.dcm")
        except DicomError as exc:
            assert str(Path(series.instances[0].path).parent) in str(exc)  # names the file
            refused.append((series.description, str(exc)))
            continue
        volume_ml = float(labels.sum() * np.prod(volume.spacing_mm) / 1000.0)
        sr = write_measurement_report(volume, [MeasurementGroupSpec("region", "Tissue", [MeasurementSpec(
            "Volume", volume_ml, "ml", "milliliter")], segment_number=1)], out / "sr.dcm", segmentation=seg)
        assert read_segmentation(seg).segments[0].number == 1
        assert measurements_from_report(sr)[0]["value"] == pytest.approx(volume_ml)
        written.append((series.description, seg, sr))
    crops = [w for w in written if w[0].endswith("HCropVolume") or "Crop" in w[0]]
    assert len(crops) == 2, [w[0] for w in written]  # both TCIA hippocampus-crop series, no PatientBirthDate
    assert written and all(reason for _, reason in refused)


def test_seg_and_sr_of_a_source_without_type2_patient_elements_validate(shared_data, tmp_path):
    series = shared_data / "dicom" / "tcia_brain_tumor_progression" / "Study1" / "13_HCropVolume"
    assert "PatientBirthDate" not in pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    volume = load_series(series)
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[10:20, 10:30, 10:20] = 1
    seg = write_segmentation(labels, volume, [SegmentSpec(1, "Hippocampus", "Hippocampus")], tmp_path / "seg.dcm")
    sr = write_measurement_report(volume, [MeasurementGroupSpec("hippocampus", "Hippocampus", [MeasurementSpec(
        "Volume", 2.0, "ml", "milliliter")], segment_number=1)], tmp_path / "sr.dcm", segmentation=seg)
    written = pydicom.dcmread(seg, stop_before_pixels=True)
    assert written.PatientBirthDate == "" and written.PatientSex == ""
    require_system_tool("dciodvfy")
    for path in (seg, sr):
        report = dciodvfy(path)
        assert report.ok, (path.name, report.errors)
