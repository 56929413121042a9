"""TID 1500 SR: the real dcmqi report reads back; SR written by medai references its SEG and validates."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medai.io.dicom import load_series
from medai.results.dicom_seg import SegmentSpec, write_segmentation
from medai.results.dicom_sr import (
    FindingSpec,
    MeasurementGroupSpec,
    MeasurementSpec,
    measurements_from_report,
    read_structured_report,
    write_measurement_report,
)
from medai.results.validate import dciodvfy
from tests.conftest import require_system_tool


def test_dcmqi_tid1500_report_reads_back(dicom_dcmqi_path):
    items = read_structured_report(dicom_dcmqi_path / "sr-example" / "sr.dcm")
    assert items[0].concept == "Imaging Measurement Report"
    volumes = [m for m in measurements_from_report(dicom_dcmqi_path / "sr-example" / "sr.dcm") if m["concept"] == "Volume"]
    assert volumes == [{"concept": "Volume", "value": pytest.approx(33.5824), "unit": "ml"}]
    seg_refs = [i.value for i in items if i.value_type == "IMAGE" and isinstance(i.value, dict) and "segment_number" in i.value]
    seg_uid = str(pydicom.dcmread(dicom_dcmqi_path / "sr-example" / "seg.dcm", stop_before_pixels=True).SOPInstanceUID)
    assert seg_refs and all(r["sop_instance_uid"] == seg_uid for r in seg_refs)


def test_written_report_references_seg_marks_device_observer_and_validates(dicom_dcmqi_path, tmp_path):
    ct = load_series(dicom_dcmqi_path / "segmentations" / "ct-3slice")
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[200:260, 200:260, :] = 1
    seg_path = write_segmentation(labels, ct, [SegmentSpec(1, "Lesion", "Neoplasm", "MorphologicallyAbnormalStructure")], tmp_path / "seg.dcm")
    volume_ml = float(labels.sum() * np.prod(ct.spacing_mm) / 1000.0)
    sr_path = write_measurement_report(
        ct,
        [
            MeasurementGroupSpec("lesion-1", "Neoplasm", [MeasurementSpec("Volume", volume_ml, "ml", "milliliter")], segment_number=1),
            MeasurementGroupSpec("case", "Finding", findings=[FindingSpec("Finding", "Neoplasm")]),
        ],
        tmp_path / "sr.dcm",
        segmentation=seg_path,
    )
    ds = pydicom.dcmread(sr_path)
    assert ds.VerificationFlag == "UNVERIFIED" and ds.CompletionFlag == "PARTIAL"
    assert "not for clinical use" in ds.SeriesDescription
    items = read_structured_report(sr_path)
    assert any(i.concept == "Observer Type" and i.value[2] == "Device" for i in items)
    assert measurements_from_report(sr_path) == [{"concept": "Volume", "value": pytest.approx(volume_ml), "unit": "ml"}]
    seg_uid = str(pydicom.dcmread(seg_path, stop_before_pixels=True).SOPInstanceUID)
    assert any(isinstance(i.value, dict) and i.value.get("sop_instance_uid") == seg_uid and i.value.get("segment_number") == 1 for i in items)
    assert any(i.value_type == "CODE" and i.value[0] == "108369006" and i.value[1] == "SCT" for i in items)
    require_system_tool("dciodvfy")
    report = dciodvfy(sr_path)
    assert report.ok, report.errors
