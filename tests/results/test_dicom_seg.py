"""DICOM SEG: the real dcmqi SEGs read back onto their CT; SEG written by medai round-trips and validates."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medai.io.dicom import load_series
from medai.results.dicom_seg import (
    AI_DISCLAIMER,
    SegmentSpec,
    read_segmentation,
    segmentation_to_volume,
    write_segmentation,
)
from medai.results.validate import dciodvfy
from tests.conftest import require_system_tool


@pytest.fixture(scope="module")
def ct(dicom_dcmqi_path):
    return load_series(dicom_dcmqi_path / "segmentations" / "ct-3slice")


def test_dcmqi_liver_seg_frames_align_with_referenced_ct_slices(dicom_dcmqi_path, ct):
    seg = read_segmentation(dicom_dcmqi_path / "segmentations" / "liver.dcm")
    assert [s.label for s in seg.segments] == ["Liver"]
    assert seg.referenced_series_uid == ct.metadata["SeriesInstanceUID"]
    assert seg.frame_of_reference_uid == ct.metadata["FrameOfReferenceUID"]
    masks = segmentation_to_volume(seg, ct)
    assert masks.shape == (512, 512, 3, 1)
    for f, src_uid in enumerate(seg.frame_source_uids):
        k = ct.sop_instance_uids.index(src_uid)  # the slice the frame says it derives from
        np.testing.assert_allclose(seg.frame_positions[f], ct.frames[k].position, atol=1e-3)
        assert np.array_equal(masks[:, :, k, 0], seg.frames[f].T.astype(bool))
    # The liver sits where the CT shows soft tissue: its mean HU is liver-like, not air or bone.
    hu = ct.array[masks[..., 0]]
    assert 20 < hu.mean() < 120 and masks.sum() == 107098


def test_overlapping_segments_read_back(dicom_dcmqi_path, ct):
    seg = read_segmentation(dicom_dcmqi_path / "segmentations" / "partial_overlaps.dcm")
    masks = segmentation_to_volume(seg, ct)
    assert masks.shape[-1] == len(seg.segments) == 5
    overlap = masks.sum(axis=-1) > 1
    assert overlap.any()


def test_seg_that_does_not_fit_the_volume_is_refused(dicom_dcmqi_path, ct):
    from medai.errors import DicomSeriesError

    seg = read_segmentation(dicom_dcmqi_path / "sr-example" / "seg.dcm")
    with pytest.raises(DicomSeriesError):
        segmentation_to_volume(seg, ct)


@pytest.fixture(scope="module")
def written(tmp_path_factory, ct, dicom_dcmqi_path):
    liver = segmentation_to_volume(read_segmentation(dicom_dcmqi_path / "segmentations" / "liver.dcm"), ct)[..., 0]
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[liver] = 1
    labels[250:270, 250:270, 1] = 2  # a lesion on the middle slice only
    specs = [SegmentSpec(1, "Liver", "Liver"), SegmentSpec(2, "Lesion", "Neoplasm", "MorphologicallyAbnormalStructure")]
    out = tmp_path_factory.mktemp("seg")
    sparse = write_segmentation(labels, ct, specs, out / "sparse.dcm")
    full = write_segmentation(labels, ct, specs, out / "full.dcm", keep_empty_frames=True)
    return labels, sparse, full


def test_written_seg_round_trips_onto_the_source_volume(written, ct):
    labels, sparse, _ = written
    seg = read_segmentation(sparse)
    masks = segmentation_to_volume(seg, ct)
    assert np.array_equal(masks[..., 0], labels == 1) and np.array_equal(masks[..., 1], labels == 2)
    assert set(seg.frame_source_uids) <= set(ct.sop_instance_uids)
    assert len(seg.frame_segment) == 4  # 3 liver frames + 1 lesion frame (empty frames omitted)


def test_keep_empty_frames_writes_every_slice_for_every_segment(written):
    _, _, full = written
    assert len(read_segmentation(full).frame_segment) == 6


def test_written_seg_is_coded_with_snomed_and_marked_ai(written):
    _, sparse, _ = written
    ds = pydicom.dcmread(sparse)
    for item in ds.SegmentSequence:
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert ds.ContentDescription == AI_DISCLAIMER and "not clinical" in ds.SeriesDescription
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT Liver


def test_written_seg_passes_dciodvfy(written):
    require_system_tool("dciodvfy")
    for path in written[1:]:
        report = dciodvfy(path)
        assert report.ok, report.errors


def test_seg_writer_refuses_bad_input(ct, tmp_path):
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match="no SegmentSpec"):
        write_segmentation(labels, ct, [SegmentSpec(1, "Liver", "Liver")], tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="does not match"):
        write_segmentation(labels[:-1], ct, [SegmentSpec(1, "Liver", "Liver")], tmp_path / "x.dcm")
    from pydicom.sr.coding import Code

    srt = Code("T-62000", "SRT", "Liver")
    with pytest.raises(ValueError, match="retired"):
        write_segmentation(np.zeros(ct.array.shape, np.uint8), ct, [SegmentSpec(1, "Liver", srt)], tmp_path / "x.dcm")


def test_seg_on_enhanced_multiframe_source(dicom_pydicom_data_path, tmp_path):
    volume = load_series(dicom_pydicom_data_path / "eCT_Supplemental.dcm")
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[100:200, 100:200, 1] = 1
    out = write_segmentation(labels, volume, [SegmentSpec(1, "Brain", "Brain")], tmp_path / "seg.dcm")
    masks = segmentation_to_volume(out, volume)
    assert np.array_equal(masks[..., 0], labels == 1)
