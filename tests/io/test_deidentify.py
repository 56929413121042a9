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


def test_hostile_copies_are_refused_by_name_and_never_overwrite_a_written_file(
    dicom_dcmqi_path, dicom_brain_tumor_progression_path, tmp_path
):
    """Found by the hostile-input harness: a malformed private or file-meta element, a Command Set element and
    a multi-valued SOP Instance UID were tracebacks; a second file with the same SOP Instance UID silently
    replaced the first one's output while the count said both were written."""
    import struct

    source = dicom_dcmqi_path / "segmentations" / "ct-3slice" / "01.dcm"
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(source, src / "a_original.dcm")
    shutil.copy(source, src / "b_same_instance.dcm")
    # an explicit-VR file (the TCIA crop), where a private element carries its own VR: a UL of 3 bytes
    data = (dicom_brain_tumor_progression_path / "Study1" / "13_HCropVolume" / "1.dcm").read_bytes()
    at = data.find(b"\x10\x00\x10\x00PN")  # Patient Name: the private group 0009 goes just before it
    private = b"\x09\x00\x10\x00LO\x04\x00ACME" + b"\x09\x00\x01\x10UL\x03\x00\x01\x02\x03"
    (src / "c_bad_private.dcm").write_bytes(data[:at] + private + data[at:])
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = [pydicom.uid.generate_uid(), pydicom.uid.generate_uid()]
    ds.save_as(src / "d_two_uids.dcm")
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(src / "e_command_element.dcm")
    data = (src / "e_command_element.dcm").read_bytes()
    dataset_start = 144 + struct.unpack("<I", data[140:144])[0]
    comment = _implicit(0x0000, 0x0902, b"note")  # Error Comment, a Command Set element
    (src / "e_command_element.dcm").write_bytes(data[:dataset_start] + comment + data[dataset_start:])

    written, refused = deidentify_folder(src, tmp_path / "out", secret=KEY_A)
    reasons = {name.rsplit("/", 1)[-1]: reason for name, reason in refused}
    assert set(reasons) == {"b_same_instance.dcm", "c_bad_private.dcm", "d_two_uids.dcm"}, reasons
    assert "a_original.dcm" in reasons["b_same_instance.dcm"] and "not written twice" in reasons["b_same_instance.dcm"]
    assert "(0009,1001)" in reasons["c_bad_private.dcm"]
    assert "several values in SOP Instance UID" in reasons["d_two_uids.dcm"]
    assert len(written) == 2 and sorted((tmp_path / "out").iterdir()) == sorted(written)
    assert all(e.tag.group != 0 for path in written for e in pydicom.dcmread(path))


def _implicit(group: int, element: int, value: bytes) -> bytes:
    """One element in Implicit VR Little Endian (the dcmqi CT's transfer syntax): tag, 4-byte length, value."""
    import struct

    return struct.pack("<HHI", group, element, len(value)) + value
