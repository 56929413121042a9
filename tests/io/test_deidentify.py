"""De-identification on export: identifiers gone, UIDs remapped consistently so SEG still fits its CT."""

from __future__ import annotations

import shutil

import pydicom
import pytest

from medai.errors import ConfigError, DicomError
from medai.io.deidentify import DUMMY_TEXT, UidMap, deidentify_dataset, deidentify_folder
from medai.io.dicom import load_series, scan_folder
from medai.results.dicom_seg import read_segmentation, segmentation_to_volume

KEY_A = "site-a-0123456789abcdef"
KEY_B = "site-b-0123456789abcdef"


def test_identifiers_removed_and_references_kept(dicom_dcmqi_path, tmp_path):
    src = dicom_dcmqi_path / "segmentations"
    written, refused = deidentify_folder(src, tmp_path, secret="site-key-0123456789")
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
        for keyword in ("ReferringPhysicianName", "PatientBirthDate", "AccessionNumber"):
            assert not ds.get(keyword), keyword
        for keyword in ("InstitutionName", "StationName"):  # X/Z/D: a dummy where present
            assert ds.get(keyword) in (None, "", DUMMY_TEXT), keyword
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
    assert UidMap(KEY_A)(uid) == UidMap(KEY_A)(uid) != UidMap(KEY_B)(uid)
    assert UidMap(KEY_A)(uid).startswith("2.25.") and len(UidMap(KEY_A)(uid)) <= 64
    assert UidMap(KEY_A)("1.2.840.10008.5.1.4.1.1.4") == "1.2.840.10008.5.1.4.1.1.4"  # SOP class kept


def test_burned_in_annotation_is_refused(dicom_dcmqi_path):
    ds = pydicom.dcmread(dicom_dcmqi_path / "segmentations" / "ct-3slice" / "01.dcm")
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DicomError, match="Burned In Annotation"):
        deidentify_dataset(ds, UidMap(KEY_A))


@pytest.mark.parametrize("secret", ["", "short", None])
def test_an_empty_or_short_key_is_refused(secret, dicom_dcmqi_path, tmp_path):
    with pytest.raises(ConfigError, match="at least 16 characters"):
        deidentify_folder(dicom_dcmqi_path / "segmentations", tmp_path / "out", secret=secret)
    assert not (tmp_path / "out").exists()


def test_missing_source_and_output_inside_source_are_refused(dicom_dcmqi_path, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        deidentify_folder(tmp_path / "nowhere", tmp_path / "out", secret=KEY_A)
    src = tmp_path / "src"
    shutil.copytree(dicom_dcmqi_path / "segmentations" / "ct-3slice", src)
    for out in (src, src / "deid"):
        with pytest.raises(ConfigError, match="inside it"):
            deidentify_folder(src, out, secret=KEY_A)
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in (dicom_dcmqi_path / "segmentations" / "ct-3slice").iterdir())


def test_ultrasound_without_burned_in_element_is_refused_unless_checked(dicom_dcmqi_path, tmp_path):
    ds = pydicom.dcmread(dicom_dcmqi_path / "segmentations" / "ct-3slice" / "01.dcm")
    ds.Modality = "US"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    if "BurnedInAnnotation" in ds:
        del ds.BurnedInAnnotation
    with pytest.raises(DicomError, match="Burned In Annotation element"):
        deidentify_dataset(ds.copy(), UidMap(KEY_A))
    deidentify_dataset(ds.copy(), UidMap(KEY_A), burned_in_checked=True)
    ds.BurnedInAnnotation = "NO"
    deidentify_dataset(ds.copy(), UidMap(KEY_A))


def test_cli_exit_codes(dicom_dcmqi_path, tmp_path):
    from typer.testing import CliRunner

    from medai.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["dicom", "deidentify", str(dicom_dcmqi_path / "segmentations" / "ct-3slice"),
                               str(tmp_path / "a"), "--secret", KEY_A])
    assert done.exit_code == 0, done.output
    # the .nrrd files beside the DICOM are refused by name: done, with failed items
    mixed = runner.invoke(app, ["dicom", "deidentify", str(dicom_dcmqi_path / "segmentations"), str(tmp_path / "b"),
                                "--secret", KEY_A])
    assert mixed.exit_code == 1 and "REFUSED" in mixed.output, mixed.output
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = runner.invoke(app, ["dicom", "deidentify", str(empty), str(tmp_path / "c"), "--secret", KEY_A])
    assert nothing.exit_code == 2, nothing.output
