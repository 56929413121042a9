"""De-identification on export: identifiers gone, UIDs remapped consistently so SEG still fits its CT."""

from __future__ import annotations

import pydicom
import pytest

from medai.errors import DicomError
from medai.io.deidentify import UidMap, deidentify_dataset, deidentify_folder
from medai.io.dicom import load_series, scan_folder
from medai.results.dicom_seg import read_segmentation, segmentation_to_volume


def test_identifiers_removed_and_references_kept(dicom_dcmqi_path, tmp_path):
    src = dicom_dcmqi_path / "segmentations"
    written, refused = deidentify_folder(src, tmp_path, secret="site-key")
    assert len(written) == 5 and len(refused) == 3  # the three .nrrd files are not DICOM
    original = pydicom.dcmread(src / "ct-3slice" / "01.dcm")
    index = scan_folder(tmp_path)
    assert len(index.studies) == 1  # the CT and both SEGs still share one (new) study
    study = next(iter(index.studies.values()))
    assert study.study_uid != str(original.StudyInstanceUID) and study.patient_id == "ANON"
    for path in written:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        for keyword in ("InstitutionName", "ReferringPhysicianName", "PatientBirthDate", "StationName", "AccessionNumber"):
            assert not ds.get(keyword), keyword
        assert str(original.PatientName) not in str(ds.PatientName)
        assert not any(e.tag.is_private for e in ds)
    ct = load_series(index.find(kind="image")[0])
    liver = next(s for s in index.find(kind="seg") if s.instances[0].number_of_frames == 3)
    seg = read_segmentation(liver.instances[0].path)
    assert set(seg.frame_source_uids) <= set(ct.sop_instance_uids)
    assert seg.referenced_series_uid == ct.metadata["SeriesInstanceUID"]
    assert segmentation_to_volume(seg, ct).sum() == 107098


def test_uid_map_is_keyed_and_deterministic():
    uid = "1.3.6.1.4.1.14519.5.2.1.4429.7055.1"
    assert UidMap("a")(uid) == UidMap("a")(uid) != UidMap("b")(uid)
    assert UidMap("a")(uid).startswith("2.25.") and len(UidMap("a")(uid)) <= 64
    assert UidMap("a")("1.2.840.10008.5.1.4.1.1.4") == "1.2.840.10008.5.1.4.1.1.4"  # SOP class kept


def test_burned_in_annotation_is_refused(dicom_dcmqi_path):
    ds = pydicom.dcmread(dicom_dcmqi_path / "segmentations" / "ct-3slice" / "01.dcm")
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DicomError, match="Burned In Annotation"):
        deidentify_dataset(ds, UidMap("k"))
