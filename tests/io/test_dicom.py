"""DICOM reading on the real shared files: every file decodes or is refused, geometry, edge cases, bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import traceback
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medai.errors import (
    DicomDecodeError,
    DicomNoPixelDataError,
    DicomNotImageError,
    DicomReadError,
    DicomSeriesError,
)
from medai.io.dicom import (
    CT_WINDOW_PRESETS,
    ORTHOGONALITY_TOLERANCE,
    apply_window,
    check_orientation,
    describe_file,
    load_folder,
    load_series,
    save_nifti,
    scan_folder,
    window_volume,
)

nib = pytest.importorskip("nibabel")

NON_DICOM_SUFFIXES = (".json", ".nii", ".nii.gz", ".nrrd")
TCIA_SERIES = "Study1/12-T1post-05670"


@pytest.fixture(scope="module")
def dicom_root(shared_data: Path) -> Path:
    return shared_data / "dicom"


@pytest.fixture(scope="module")
def dicom_index(dicom_root):
    return scan_folder(dicom_root)


# ---------------------------------------------------------------- every file in the shared data


def test_every_shared_dicom_file_is_indexed_or_refused_with_a_reason(dicom_root, dicom_index):
    files = [p for p in dicom_root.rglob("*") if p.is_file()]
    indexed = {i.path for s in dicom_index.all_series() for i in s.instances}
    duplicates = {d.path for d in dicom_index.duplicates}
    refused = {r.path: r for r in dicom_index.refused}
    assert len(files) == dicom_index.files_seen == len(indexed) + len(duplicates) + len(refused)
    for path, r in refused.items():
        # Only the reference outputs (JSON/NIfTI/NRRD) and one file without study/series UIDs are refused.
        if path.endswith(NON_DICOM_SUFFIXES):
            assert r.error == "DicomReadError" and "not a DICOM file" in r.reason
        else:
            assert path.endswith("JLSL_08_07_0_1F.dcm") and "StudyInstanceUID" in r.reason
    assert not any(p.endswith(NON_DICOM_SUFFIXES) for p in indexed)


def test_every_shared_image_file_decodes(dicom_root, dicom_index):
    paths = [i.path for s in dicom_index.all_series() for i in s.instances if i.kind == "image"]
    paths += [d.path for d in dicom_index.duplicates] + [str(dicom_root / "pydicom_data/JLSL_08_07_0_1F.dcm")]
    # TCIA files are all the same uncompressed syntax: two series stand for them (the volume test loads all).
    paths = [p for p in paths if "tcia_brain" not in p or TCIA_SERIES in p]
    failures = {}
    for path in paths:
        info = describe_file(path)
        if info["kind"] == "image" and not info["decodes"]:
            failures[path] = info["pixels"]
    assert not failures, failures
    assert len(paths) >= 80


def test_non_image_instances_are_indexed_but_refused_as_volumes(dicom_index):
    kinds = {s.kind for s in dicom_index.all_series()}
    assert {"image", "seg", "sr", "other"} <= kinds
    sr = dicom_index.find(kind="sr")[0]
    with pytest.raises(DicomNotImageError, match="Comprehensive SR"):
        load_series(sr)


# ---------------------------------------------------------------- transfer syntaxes and references


def test_dcm_qa_ts_nine_transfer_syntaxes_decode_identically(dicom_dcm_qa_ts_path):
    arrays = {}
    syntaxes = set()
    for i in range(1, 10):
        path = dicom_dcm_qa_ts_path / f"{i}.dcm"
        arrays[i] = load_series(path).array
        syntaxes.add(str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID))
    assert len(syntaxes) == 7  # explicit/implicit/big endian, RLE, JPEG lossless, JPEG-LS, JPEG 2000
    for i in range(2, 10):
        assert arrays[i].dtype == arrays[1].dtype and np.array_equal(arrays[i], arrays[1]), f"{i}.dcm differs"


def test_dcm_qa_ts_mosaic_untiles_to_the_dcm2niix_reference(dicom_dcm_qa_ts_path, tmp_path):
    volume = load_series(dicom_dcm_qa_ts_path / "1.dcm")
    assert volume.array.shape == (64, 64, 35) and volume.geometry == "patient"
    ours = nib.as_closest_canonical(nib.load(save_nifti(volume, tmp_path / "m.nii.gz")))
    ref = nib.as_closest_canonical(nib.load(dicom_dcm_qa_ts_path / "ref" / "1.nii"))
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(ref.dataobj))
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(volume.spacing_mm, (3.25, 3.25, 3.6), atol=1e-6)


@pytest.mark.parametrize("encoding", ["anatomical", "compressed_j2k", "compressed_jpeg", "compressed_jpegls", "compressed_rle"])
def test_dicom2nifti_series_match_ground_truth_nifti(dicom_dicom2nifti_generic_path, encoding, tmp_path):
    volume = load_series(dicom_dicom2nifti_generic_path / encoding / "001")
    out = save_nifti(volume, tmp_path / "out.nii.gz")
    ours = nib.as_closest_canonical(nib.load(out))
    truth = nib.as_closest_canonical(nib.load(dicom_dicom2nifti_generic_path / encoding / "001_ground_truth.nii.gz"))
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(truth.dataobj))
    np.testing.assert_allclose(ours.affine, truth.affine, atol=1e-4)


def test_monochrome1_is_inverted_and_ybr_converted(dicom_pydicom_data_path):
    cr = dicom_pydicom_data_path / "RG3_J2KR.dcm"
    ds = pydicom.dcmread(cr)
    volume = load_series(cr)
    raw = ds.pixel_array
    assert volume.metadata["monochrome1_inverted"]
    assert np.array_equal(volume.slices[0], (2 ** int(ds.BitsStored) - 1) - raw.astype(np.int64))
    lossless = load_series(dicom_pydicom_data_path / "US1_J2KR.dcm")
    reference = load_series(dicom_pydicom_data_path / "US1_UNCR.dcm")
    assert lossless.photometric == "RGB" and lossless.array.shape[-1] == 3
    assert np.array_equal(lossless.array, reference.array)
    palette = load_series(dicom_pydicom_data_path / "OBXXXX1A.dcm")
    assert palette.photometric == "RGB" and palette.array.shape == (800, 600, 1, 3)


# Lossy copies may differ from the original by at most this mean absolute error, as a fraction of
# the original's dynamic range (measured: 0.08 % RG3_J2KI 30:1 ... 1.5 % JPEG2000_UNC 2097:1).
LOSSY_MAE_FRACTION = 0.02
# NEMA WG04 naming: *_UNCR original, *_J2KR lossless J2K, *_J2KI lossy J2K, *_UNCI the lossy J2K decompressed.
PIXEL_PAIRS = [
    # (copy, reference, lossy): lossless copies must be identical to the uncompressed original
    ("MR2_J2KR", "MR2_UNCR", False),
    ("693_J2KR", "693_UNCR", False),
    ("US1_J2KR", "US1_UNCR", False),
    ("emri_small_RLE", "emri_small", False),
    ("emri_small_jpeg_ls_lossless", "emri_small", False),
    ("emri_small_jpeg_2k_lossless", "emri_small", False),
    ("OBXXXX1A_rle", "OBXXXX1A", False),
    # a lossy J2K decodes to exactly what NEMA's decompressed copy holds ...
    ("MR2_J2KI", "MR2_UNCI", False),
    ("US1_J2KI", "US1_UNCI", False),
    # ... and close to the original (RG3 and the NM image have no uncompressed original: their lossless copy)
    ("MR2_J2KI", "MR2_UNCR", True),
    ("US1_J2KI", "US1_UNCR", True),
    ("RG3_J2KI", "RG3_J2KR", True),
    ("693_UNCI", "693_UNCR", True),
    ("JPEG2000_UNC", "JPEG-LL", True),
]


@pytest.mark.parametrize("copy, reference, lossy", PIXEL_PAIRS, ids=[f"{c}-vs-{r}" for c, r, _ in PIXEL_PAIRS])
def test_encodings_of_one_image_load_to_the_same_pixels(dicom_pydicom_data_path, copy, reference, lossy):
    ours = load_series(dicom_pydicom_data_path / f"{copy}.dcm")
    ref = load_series(dicom_pydicom_data_path / f"{reference}.dcm")
    assert ours.photometric == ref.photometric and ours.array.dtype == ref.array.dtype
    assert ours.array.shape == ref.array.shape
    if not lossy:
        assert np.array_equal(ours.array, ref.array)
        return
    a, b = ours.array.astype(np.float64), ref.array.astype(np.float64)
    dynamic_range = float(b.max() - b.min())
    mae_fraction = float(np.abs(a - b).mean()) / dynamic_range
    assert 0 < mae_fraction < LOSSY_MAE_FRACTION, f"MAE {mae_fraction:.2%} of the dynamic range {dynamic_range}"
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9  # the same picture, not noise of the right size


def test_enhanced_ct_geometry_and_rescale_from_functional_groups(dicom_pydicom_data_path):
    path = dicom_pydicom_data_path / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    volume = load_series(path)
    assert volume.geometry == "patient"
    frames = ds.PerFrameFunctionalGroupsSequence
    positions = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in frames])
    first = positions[np.argmin(positions @ volume.direction[:, 2])]
    np.testing.assert_allclose(volume.origin_lps, first, atol=1e-6)
    iop = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    np.testing.assert_allclose(volume.direction[:, 0], iop[:3], atol=1e-6)
    np.testing.assert_allclose(volume.spacing_mm[:2], (0.388672, 0.388672))
    # Rescale Intercept -1024 sits only in the functional groups.
    assert volume.array.min() == int(ds.pixel_array.min()) - 1024


def test_enhanced_mr_without_functional_groups_gets_no_made_up_affine(dicom_pydicom_data_path, tmp_path):
    volume = load_series(dicom_pydicom_data_path / "emri_small.dcm")
    assert volume.affine_lps is None and volume.geometry == "none" and volume.array.shape == (64, 64, 10)
    with pytest.raises(DicomSeriesError, match="made-up affine"):
        save_nifti(volume, tmp_path / "x.nii.gz")


# ---------------------------------------------------------------- TCIA: one volume per series, header geometry


def test_tcia_studies_load_one_volume_per_series_with_header_geometry(dicom_brain_tumor_progression_path):
    index = scan_folder(dicom_brain_tumor_progression_path)
    assert len(index.studies) == 2 and len(index.all_series()) == 10 and not index.refused
    for series in index.all_series():
        volume = load_series(series)
        datasets = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(p) for p in series.paths)}
        assert volume.array.shape[2] == len(series.instances)
        assert volume.geometry == "patient" and not [w for w in volume.warnings if "gap" in w]
        for k, uid in enumerate(volume.sop_instance_uids):
            ds = datasets[uid]
            ipp = np.array([float(v) for v in ds.ImagePositionPatient])
            np.testing.assert_allclose(volume.affine_lps @ [0, 0, k, 1], np.append(ipp, 1), atol=1e-3)
            np.testing.assert_allclose(volume.array[:, :, k].T, ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0)), rtol=1e-6)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        np.testing.assert_allclose(volume.direction[:, 0], iop[:3], atol=1e-5)
        np.testing.assert_allclose(volume.direction[:, 1], iop[3:], atol=1e-5)
        np.testing.assert_allclose(volume.spacing_mm[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])


def test_slices_are_sorted_by_position_not_file_name(dicom_brain_tumor_progression_path, tmp_path):
    src = sorted((dicom_brain_tumor_progression_path / TCIA_SERIES).glob("*.dcm"))
    reference = load_series(src)
    rng = np.random.default_rng(0)
    for i, p in enumerate(rng.permutation(len(src))):
        nested = tmp_path / f"d{i % 3}"
        nested.mkdir(exist_ok=True)
        os.symlink(src[p], nested / f"IMG{i:03d}")
    (tmp_path / "README.txt").write_text("not dicom")
    shuffled = load_series(tmp_path)
    assert np.array_equal(shuffled.array, reference.array)
    assert np.allclose(shuffled.affine_lps, reference.affine_lps)
    normal = reference.direction[:, 2]
    positions = [float(f.position @ normal) for f in reference.frames]
    assert positions == sorted(positions)


# ---------------------------------------------------------------- geometry edge cases (synthetic from real files)


def _copy_series(src_dir: Path, dst: Path, edit=None, skip=()):
    dst.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(src_dir.glob("*.dcm"))):
        if i in skip:
            continue
        ds = pydicom.dcmread(path)
        if edit:
            edit(i, ds)
        ds.save_as(dst / path.name)
    return dst


def test_gap_is_reported_and_strict_mode_refuses(dicom_brain_tumor_progression_path, tmp_path):
    src = dicom_brain_tumor_progression_path / TCIA_SERIES
    by_position = [Path(f.path).name for f in load_series(src).frames]
    names = sorted(p.name for p in src.glob("*.dcm"))
    # Drop two slices adjacent in space (file names do not follow position).
    series = _copy_series(src, tmp_path / "s", skip={names.index(by_position[10]), names.index(by_position[11])})
    volume = load_series(series)
    assert volume.array.shape[2] == 20
    assert any("gap" in w and "2 slice(s) missing" in w for w in volume.warnings)
    with pytest.raises(DicomSeriesError, match="gap"):
        load_series(series, strict=True)


def test_duplicate_positions_are_refused(dicom_brain_tumor_progression_path, tmp_path):
    def same_position(i, ds):
        if i == 5:
            ds.ImagePositionPatient = pydicom.dcmread(next(iter(sorted((dicom_brain_tumor_progression_path / TCIA_SERIES).glob("*.dcm"))[4:5]))).ImagePositionPatient

    series = _copy_series(dicom_brain_tumor_progression_path / TCIA_SERIES, tmp_path / "s", edit=same_position)
    with pytest.raises(DicomSeriesError, match="more than once"):
        load_series(series)


def test_slightly_non_orthogonal_orientation_is_accepted_and_reported(dicom_brain_tumor_progression_path, tmp_path):
    def nudge(i, ds):
        iop = [float(v) for v in ds.ImageOrientationPatient]
        iop[4] += 2e-5  # the rounding real scanners write
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]

    volume = load_series(_copy_series(dicom_brain_tumor_progression_path / TCIA_SERIES, tmp_path / "s", edit=nudge))
    assert any("orthonormal" in w for w in volume.warnings)
    d = volume.direction
    assert abs(d[:, 0] @ d[:, 1]) < 1e-12


def test_orientation_beyond_tolerance_and_mixed_planes_are_refused(dicom_brain_tumor_progression_path, tmp_path):
    with pytest.raises(DicomSeriesError, match="not orthonormal"):
        check_orientation(np.array([1, 0, 0, 0.05, 1, 0.0]), "x")
    assert ORTHOGONALITY_TOLERANCE < 0.05

    def localizer(i, ds):
        if i == 0:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

    series = _copy_series(dicom_brain_tumor_progression_path / TCIA_SERIES, tmp_path / "s", edit=localizer)
    with pytest.raises(DicomSeriesError, match="different orientations"):
        load_series(series)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def broken_file_sources(dicom_brain_tumor_progression_path, dicom_dicom2nifti_generic_path) -> dict[str, Path]:
    """The real file each broken file is made from, by broken file name."""
    mr = sorted((dicom_brain_tumor_progression_path / "Study2/14-T1post-22014").glob("*.dcm"))[0]
    jls = dicom_dicom2nifti_generic_path / "compressed_jpegls/001/IM-0001-0001-0001.dcm"
    names = ("truncated_pixels.dcm", "truncated_header.dcm", "no_preamble.dcm", "no_pixels.dcm")
    return {**{name: mr for name in names}, "undecodable.dcm": jls}


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory, broken_file_sources):
    """Five broken files, one per failure kind, built from real files."""
    out = tmp_path_factory.mktemp("broken")
    good = broken_file_sources["no_pixels.dcm"]
    data = good.read_bytes()
    (out / "truncated_pixels.dcm").write_bytes(data[: len(data) // 3])
    (out / "truncated_header.dcm").write_bytes(data[:900])
    (out / "no_preamble.dcm").write_bytes(data[132:])
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(out / "no_pixels.dcm")
    jls = bytearray(broken_file_sources["undecodable.dcm"].read_bytes())
    soi = jls.find(b"\xff\xd8")
    jls[soi:soi + 200] = bytes(200)
    (out / "undecodable.dcm").write_bytes(bytes(jls))
    return out


def test_each_kind_of_bad_input_gets_a_typed_error_naming_file_and_reason(broken_files, dicom_dcmqi_path):
    from medai.io.dicom import decode_frames, read_dataset

    cases = {
        "truncated_pixels.dcm": (DicomReadError, "truncated"),
        "truncated_header.dcm": (DicomReadError, "truncated or malformed"),
        "no_preamble.dcm": (DicomReadError, "preamble"),
        "no_pixels.dcm": (DicomNoPixelDataError, "no Pixel Data"),
        "undecodable.dcm": (DicomDecodeError, "JPEG-LS"),
    }
    for name, (error, words) in cases.items():
        path = broken_files / name
        with pytest.raises(error) as info:
            decode_frames(read_dataset(path), path)
        assert str(path) in str(info.value) and words in str(info.value), str(info.value)
    with pytest.raises(DicomNotImageError, match="Comprehensive SR"):
        load_series(dicom_dcmqi_path / "sr-example" / "sr.dcm")
    # A raw dataset without preamble is readable when asked for explicitly.
    assert read_dataset(broken_files / "no_preamble.dcm", allow_no_preamble=True).Modality == "MR"


def test_odd_vr_is_refused(dicom_brain_tumor_progression_path, tmp_path):
    data = bytearray(sorted((dicom_brain_tumor_progression_path / TCIA_SERIES).glob("*.dcm"))[0].read_bytes())
    at = data.find(b"\x08\x00\x60\x00CS")  # Modality, explicit VR
    data[at + 4:at + 6] = b"QQ"
    (tmp_path / "odd.dcm").write_bytes(bytes(data))
    with pytest.raises(DicomReadError, match="Unknown Value Representation"):
        describe_file(tmp_path / "odd.dcm")


def test_folder_of_100_good_and_5_broken_files_loses_nothing(dicom_brain_tumor_progression_path, broken_files, tmp_path):
    good = []
    for series_dir in sorted((dicom_brain_tumor_progression_path / "Study1").iterdir()):
        good += sorted(series_dir.glob("*.dcm"))
    good = good[:100]
    for i, path in enumerate(good):
        target = tmp_path / f"sub{i % 4}" / f"{i:04d}"
        target.parent.mkdir(exist_ok=True)
        os.symlink(path, target)
    for path in broken_files.iterdir():
        shutil.copy(path, tmp_path / path.name)
    result = load_folder(tmp_path)
    assert result.files_seen == 105
    assert result.slices_loaded == 100
    assert sorted(Path(r.path).name for r in result.refused) == sorted(p.name for p in broken_files.iterdir())
    assert all(r.reason for r in result.refused)


# Header attributes that identify a patient (PS3.15 basic profile) and may be present in the shared files.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "AccessionNumber", "ReferringPhysicianName",
)


def patient_identifiers(path: Path) -> set[str]:
    """Identifying values in a file's header: each value and each name component of 4+ characters."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    found: set[str] = set()
    for keyword in IDENTIFYING_KEYWORDS:
        value = ds.get(keyword)
        values = value if isinstance(value, pydicom.multival.MultiValue) else [value]
        for v in values:
            text = str(v or "").strip()
            found.update(part for part in (text, *re.split(r"[\\^=]", text)) if len(part) >= 4)
    return found


def messages_about(paths, load_root: Path) -> list[str]:
    """Every message medai gives about these files: errors with tracebacks, describe_file, refusals (API and CLI).

    The CLI's study index itself lists patient name and ID on purpose (it is what users query); only its
    refusal reasons are messages.
    """
    from typer.testing import CliRunner

    from medai.cli import app
    from medai.io.dicom import decode_frames, read_dataset

    texts = []
    for path in paths:
        for attempt in (lambda: decode_frames(read_dataset(path), path), lambda: describe_file(path)):
            try:
                texts.append(str(attempt()))
            except Exception as exc:  # noqa: BLE001 - every error type's text is checked
                texts.append("".join(traceback.format_exception(exc)))
    texts += [f"{r.path}: {r.reason}" for r in load_folder(load_root).refused]
    scan = CliRunner().invoke(app, ["dicom", "scan", str(load_root), "--json"])
    texts += [json.dumps(r) for r in json.loads(scan.output)["refused"]]
    return texts


def test_no_patient_identifiers_in_logs_or_errors(broken_files, broken_file_sources, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    identifiers = set().union(*(patient_identifiers(p) for p in set(broken_file_sources.values())))
    assert {"PGBM-006", "Thanos^Inevitable", "dicom2nifti"} <= identifiers
    # The identifiers really are in the broken files, so a message that quoted the header could leak them.
    contents = [p.read_bytes() for p in broken_files.iterdir()]
    assert all(any(i.encode() in c for c in contents) for i in identifiers)
    shutil.copytree(broken_files, tmp_path / "b")
    messages = messages_about(sorted((tmp_path / "b").iterdir()), tmp_path / "b")
    messages += [r.getMessage() for r in caplog.records]
    assert len(messages) > len(broken_file_sources)
    for text in messages:
        leaked = [i for i in identifiers if i in text]
        assert not leaked, (leaked, text)


PLANTED_NAME = "Planted^O'Leary"  # a quote inside, as in real names: quoting must not end early


@pytest.mark.parametrize(
    "keyword, vr, strict_values",
    [
        ("PatientName", "US", False),  # a name where a binary VR is declared: wrong length for the VR
        ("PatientName", "FD", False),
        ("PatientWeight", "DS", True),  # text that does not parse as its VR (pydicom raising on invalid values)
        ("SeriesNumber", "IS", True),
    ],
)
def test_malformed_element_errors_name_the_tag_but_never_the_value(
    dicom_brain_tumor_progression_path, keyword, vr, strict_values, monkeypatch, caplog, tmp_path
):
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import tag_for_keyword

    from medai.io.dicom import read_dataset

    caplog.set_level(logging.DEBUG)
    if strict_values:
        monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    ds = pydicom.dcmread(sorted((dicom_brain_tumor_progression_path / TCIA_SERIES).glob("*.dcm"))[0])
    tag = pydicom.tag.Tag(tag_for_keyword(keyword))
    value = PLANTED_NAME.encode()
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)  # written as is, unparsed
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / "planted.dcm"
    ds.save_as(path)
    assert value in path.read_bytes()
    with pytest.raises(DicomReadError) as info:
        read_dataset(path)
    texts = messages_about([path], tmp_path / "d") + [r.getMessage() for r in caplog.records]
    for text in texts:
        for part in (PLANTED_NAME, "Planted", "Leary"):
            assert part not in text, text
    assert str(tag) in str(info.value) and keyword in str(info.value) and str(path) in str(info.value)
    assert any(keyword in t for t in texts[2:])  # the folder refusal and the CLI name the element too


HCROP_SERIES = "Study1/13_HCropVolume"


def test_a_file_cut_anywhere_in_its_header_is_read_or_refused_by_name(dicom_brain_tumor_progression_path, tmp_path):
    """Found by the hostile-input harness: cut inside the file meta (BytesLengthException) or an element header
    (struct.error), cut before the SOP UIDs (a short dataset that later failed on ds.SOPClassUID), or cut inside
    Window Width (an empty DS that float() refused) ended in tracebacks; each must be a DicomError naming the file."""
    data = (dicom_brain_tumor_progression_path / HCROP_SERIES / "1.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    refused = 0
    for length in range(1, 1300):
        cut.write_bytes(data[:length])
        try:
            describe_file(cut)
        except DicomReadError as exc:
            assert str(cut) in str(exc) and exc.reason
            refused += 1
    assert refused > 600
    cut.write_bytes(data[:132])  # preamble and prefix only: pydicom reads an empty dataset
    with pytest.raises(DicomReadError, match="no SOP Class UID or SOP Instance UID"):
        describe_file(cut)


def test_an_oversized_malformed_element_is_named_without_reading_it_again(dicom_brain_tumor_progression_path, tmp_path):
    """A value over the deferred-read size that does not parse: naming it must not parse it a second time."""
    import struct

    from medai.io.dicom import read_dataset

    data = (dicom_brain_tumor_progression_path / HCROP_SERIES / "7.dcm").read_bytes()
    at = data.find(b"\xe0\x7f\x10\x00")  # Pixel Data: insert before it, in tag order
    length = 300_004  # not a multiple of UV's 8 bytes, and deferred (over 256 KB)
    element = struct.pack("<HH", 0x0040, 0x9212) + b"UV\x00\x00" + struct.pack("<I", length) + bytes(length)
    path = tmp_path / "big.dcm"
    path.write_bytes(data[:at] + element + data[at:])
    with pytest.raises(DicomReadError, match=r"\(0040,9212\) RealWorldValueLUTData: value length is not a multiple"):
        read_dataset(path)


def test_empty_window_and_garbled_rescale_or_thickness(dicom_brain_tumor_progression_path, tmp_path):
    """An empty Window Width is allowed (no window); a multi-valued Slice Thickness is unknown; a Rescale Slope that
    is not one number is refused by name (modality values would be wrong)."""
    source = dicom_brain_tumor_progression_path / HCROP_SERIES / "1.dcm"
    ds = pydicom.dcmread(source)
    ds.WindowWidth = ""
    ds.SliceThickness = [1, 2]
    ds.save_as(tmp_path / "empty_window.dcm")
    info = describe_file(tmp_path / "empty_window.dcm")
    assert info["decodes"] is True
    volume = load_series(tmp_path / "empty_window.dcm")
    assert volume.frames[0].window is None and volume.frames[0].slice_thickness is None
    ds = pydicom.dcmread(source)
    ds.RescaleSlope = [1, 2]
    ds.save_as(tmp_path / "two_slopes.dcm")
    with pytest.raises(DicomReadError, match="Rescale Slope is not one number"):
        describe_file(tmp_path / "two_slopes.dcm")


def test_an_unknown_transfer_syntax_uid_is_read_and_refused_at_decoding(dicom_brain_tumor_progression_path, tmp_path):
    """A garbled Transfer Syntax UID: the Pixel Data size check asked pydicom whether it is compressed (ValueError)."""
    data = (dicom_brain_tumor_progression_path / HCROP_SERIES / "1.dcm").read_bytes()
    path = tmp_path / "unknown_ts.dcm"
    path.write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.7\x00", 1))
    info = describe_file(path)
    assert info["decodes"] is False and "1.2.840.10008.1.2.7" in info["transfer_syntax"]


def test_a_panicking_decoder_is_a_decode_error_and_plugin_tracebacks_stay_out_of_the_log(
    dicom_pydicom_data_path, tmp_path, caplog
):
    """pylibjpeg-rle panics (pyo3's PanicException, a BaseException) on a bad segment offset; pydicom logs every
    failing plugin with its traceback. Both reached the user; the DicomDecodeError names each plugin's failure."""
    from medai.io.dicom import decode_frames, read_dataset

    data = bytearray((dicom_pydicom_data_path / "emri_small_RLE.dcm").read_bytes())
    pixels = data.find(b"\xe0\x7f\x10\x00")
    offsets_item = data.find(b"\xfe\xff\x00\xe0", pixels)
    first_fragment = data.find(b"\xfe\xff\x00\xe0", offsets_item + 8) + 8
    data[first_fragment + 8] = 0  # the RLE header's second segment offset, now inside the first segment
    path = tmp_path / "bad_rle.dcm"
    path.write_bytes(bytes(data))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DicomDecodeError, match="RLE Lossless"):
        decode_frames(read_dataset(path), path)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


# ---------------------------------------------------------------- windowing, CLI


def test_windowing_follows_the_dicom_linear_formula_and_presets():
    values = np.array([-1000.0, 10.0, 40.0, 70.0, 1000.0])
    out = apply_window(values, *CT_WINDOW_PRESETS["brain"])
    assert out[0] == 0 and out[-1] == 1 and abs(out[2] - (0.5 + 0.5 / 79)) < 1e-6
    assert 0 < out[1] < out[2] < out[3] <= 1


def test_header_window_is_used_for_display(dicom_brain_tumor_progression_path):
    volume = load_series(dicom_brain_tumor_progression_path / TCIA_SERIES)
    center, width = volume.metadata["window_center_width"]
    shown = window_volume(volume)
    assert shown.min() >= 0 and shown.max() <= 1
    inside = (volume.array > center - width / 2) & (volume.array < center + width / 2 - 1)
    assert np.all((shown[inside] > 0) & (shown[inside] < 1))


def test_cli_scan_convert_info(dicom_dcmqi_path, tmp_path):
    from typer.testing import CliRunner

    from medai.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["dicom", "scan", str(dicom_dcmqi_path), "--json"])
    assert result.exit_code == 0, result.output
    index = json.loads(result.output)
    assert len(index["refused"]) == 3 and all(r["reason"] for r in index["refused"])
    out = tmp_path / "ct.nii.gz"
    result = runner.invoke(app, ["dicom", "convert", str(dicom_dcmqi_path / "segmentations" / "ct-3slice"), str(out)])
    assert result.exit_code == 0, result.output
    assert nib.load(out).shape == (512, 512, 3)
    result = runner.invoke(app, ["dicom", "info", str(dicom_dcmqi_path / "segmentations" / "ct-3slice" / "01.dcm")])
    assert result.exit_code == 0 and "decode ok" in result.output
    result = runner.invoke(app, ["dicom", "info", str(dicom_dcmqi_path / "segmentations" / "liver_seg.nrrd")])
    assert result.exit_code == 2 and "not a DICOM file" in " ".join(result.output.split())


# ---------------------------------------------------------------- syntaxes the shared DICOM folder lacks


def test_jpeg_baseline_decodes_close_to_the_uncompressed_copy(wsi_dicom_google_path):
    lossy = describe_file(wsi_dicom_google_path / "jpeg.dicom")
    assert lossy["decodes"] and "JPEG Baseline" in lossy["transfer_syntax"]
    from medai.io.dicom import decode_frames, read_dataset

    jpeg, _ = decode_frames(read_dataset(wsi_dicom_google_path / "jpeg.dicom"), "jpeg")
    raw, _ = decode_frames(read_dataset(wsi_dicom_google_path / "raw.dicom"), "raw")
    assert jpeg.shape == raw.shape == (12, 256, 256, 3)
    assert np.abs(jpeg.astype(int) - raw.astype(int)).mean() < 3  # lossy, but the same picture


def test_deflate_and_reencoded_syntaxes_decode_identically(dicom_dcm_qa_ts_path, tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

    source = dicom_dcm_qa_ts_path / "1.dcm"
    reference = load_series(source).array
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflate.dcm", enforce_file_format=True)
    assert np.array_equal(load_series(tmp_path / "deflate.dcm").array, reference)
    for uid in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        ds = pydicom.dcmread(source)
        ds.compress(uid)
        ds.save_as(tmp_path / f"{uid}.dcm")
        assert np.array_equal(load_series(tmp_path / f"{uid}.dcm").array, reference), uid.name


def test_a_decoder_is_installed_for_every_transfer_syntax_named_in_the_issue():
    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        HTJ2K, RLELossless, HTJ2KLossless, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
        JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, DeflatedExplicitVRLittleEndian,
    )

    for uid in (DeflatedExplicitVRLittleEndian, RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
                JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2K):
        if uid == DeflatedExplicitVRLittleEndian:
            continue  # inflated by pydicom's reader, then native
        assert get_decoder(uid).is_available, uid.name


def test_voi_lut_path_matches_our_window_formula(dicom_brain_tumor_progression_path):
    from medai.io.dicom import apply_voi_lut_frame

    path = sorted((dicom_brain_tumor_progression_path / TCIA_SERIES).glob("*.dcm"))[10]
    ds = pydicom.dcmread(path)
    shown = apply_voi_lut_frame(path)  # pydicom's VOI LUT: output spans the stored value range
    first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)  # noqa: E731
    center, width = first(ds.WindowCenter), first(ds.WindowWidth)
    values = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    lo = -(2 ** (int(ds.BitsStored) - 1)) if ds.PixelRepresentation else 0
    hi = 2 ** (int(ds.BitsStored) - (1 if ds.PixelRepresentation else 0)) - 1
    ours = apply_window(values, center, width) * (hi - lo) + lo
    np.testing.assert_allclose(shown, ours, atol=(hi - lo) * 1e-4)


def test_rows_smaller_than_pixel_data_is_refused_by_read_and_scan(dicom_brain_tumor_progression_path, tmp_path):
    """A header whose Rows x Columns don't match the pixels: refused by name (decoders trimmed it silently)."""
    import pydicom

    from medai.errors import DicomReadError
    from medai.io.dicom import read_dataset, scan_folder

    src = next((dicom_brain_tumor_progression_path / "Study1" / "13_HCropVolume").glob("*.dcm"))
    ds = pydicom.dcmread(src)
    ds.Rows = int(ds.Rows) - 5
    bad = tmp_path / "series" / "bad.dcm"
    bad.parent.mkdir()
    ds.save_as(bad)
    shutil.copy(src, tmp_path / "series" / "good.dcm")
    with pytest.raises(DicomReadError, match="the header does not match the pixels"):
        read_dataset(bad)
    index = scan_folder(tmp_path / "series")
    assert [r.path for r in index.refused] == [str(bad)] and index.instance_count == 1


def test_scan_of_a_missing_folder_is_a_typed_error(tmp_path):
    from medai.errors import InputFileError
    from medai.io.dicom import scan_folder

    with pytest.raises(InputFileError, match="no such file or folder"):
        scan_folder(tmp_path / "nowhere")


def test_cli_on_missing_folder_prints_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "medai.cli", "dicom", "scan", str(tmp_path / "nowhere")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "no such file or folder" in out.stderr


def _copy_crop_series(src, dest):
    dest.mkdir()
    for path in sorted(src.glob("*.dcm")):
        shutil.copy(path, dest / path.name)
    return sorted(dest.glob("*.dcm"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)


def test_scan_flags_a_duplicated_and_a_shifted_slice_naming_the_files(dicom_brain_tumor_progression_path, tmp_path):
    import pydicom

    from medai.io.dicom import scan_folder

    files = _copy_crop_series(dicom_brain_tumor_progression_path / "Study1" / "13_HCropVolume", tmp_path / "s")
    assert scan_folder(tmp_path / "s").all_series()[0].warnings == []
    dup = pydicom.dcmread(files[3])
    dup.SOPInstanceUID = pydicom.uid.generate_uid()  # a second instance at slice 4's position
    dup.save_as(tmp_path / "s" / "copy.dcm")
    moved = pydicom.dcmread(files[10])
    moved.ImagePositionPatient = [float(v) for v in moved.ImagePositionPatient[:2]] + [float(moved.ImagePositionPatient[2]) + 0.5]
    moved.save_as(files[10])
    warnings = scan_folder(tmp_path / "s").all_series()[0].warnings
    assert any("copy.dcm" in w and files[3].name in w and "share one position" in w for w in warnings), warnings
    assert any(files[10].name in w and "shifted or missing" in w for w in warnings), warnings


def test_convert_names_the_duplicated_files_and_ignores_broken_files_of_other_series(dicom_brain_tumor_progression_path, tmp_path):
    import pydicom

    from medai.errors import DicomSeriesError
    from medai.io.dicom import load_series

    files = _copy_crop_series(dicom_brain_tumor_progression_path / "Study1" / "13_HCropVolume", tmp_path / "s")
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    other = sorted((dicom_brain_tumor_progression_path / "Study1" / "12-T1post-05670").glob("*.dcm"))[0]
    (tmp_path / "s" / "other_truncated.dcm").write_bytes(other.read_bytes()[: other.stat().st_size // 2])
    volume = load_series(tmp_path / "s", series_uid=uid)  # the broken file belongs to another series
    assert volume.array.shape[2] == len(files)
    dup = pydicom.dcmread(files[3])
    dup.SOPInstanceUID = pydicom.uid.generate_uid()
    dup.save_as(tmp_path / "s" / "copy.dcm")
    with pytest.raises(DicomSeriesError, match="copy.dcm"):
        load_series(tmp_path / "s", series_uid=uid)


def test_scan_json_redacts_patient_fields_unless_phi(dicom_brain_tumor_progression_path):
    import json

    from typer.testing import CliRunner

    from medai.cli import app

    folder = dicom_brain_tumor_progression_path / "Study1" / "13_HCropVolume"
    redacted = json.loads(CliRunner().invoke(app, ["dicom", "scan", str(folder), "--json"]).stdout)
    study = next(iter(redacted["studies"].values()))
    assert study["patient_id"] in ("<redacted>", "") and study["patient_name"] in ("<redacted>", "")
    kept = json.loads(CliRunner().invoke(app, ["dicom", "scan", str(folder), "--json", "--phi"]).stdout)
    assert next(iter(kept["studies"].values()))["patient_id"] not in ("<redacted>",)


def test_scan_indexes_a_file_with_a_garbled_position_without_its_geometry(dicom_brain_tumor_progression_path, tmp_path):
    """pydicom keeps an unparsable DS (here 'p') as text; scan's float() of it was a traceback."""
    data = bytearray((dicom_brain_tumor_progression_path / HCROP_SERIES / "1.dcm").read_bytes())
    at = data.find(b"\x20\x00\x32\x00DS")  # Image Position (Patient), explicit VR: its value starts 8 bytes on
    data[at + 8] = ord("p")
    (tmp_path / "p.dcm").write_bytes(bytes(data))
    index = scan_folder(tmp_path)
    (series,) = index.all_series()
    assert not index.refused and series.instances[0].position_mm is None


def test_convert_names_a_slice_it_passed_over_as_not_dicom(dicom_brain_tumor_progression_path, tmp_path):
    """Found by the hostile-input harness: a slice cut before its 'DICM' prefix was skipped as a foreign file and
    convert wrote a volume one slice short, exit 0, naming nothing."""
    from typer.testing import CliRunner

    from medai.cli import app

    series = tmp_path / "series"
    shutil.copytree(dicom_brain_tumor_progression_path / HCROP_SERIES, series)
    (series / "16.dcm").write_bytes((series / "16.dcm").read_bytes()[:100])
    result = CliRunner().invoke(app, ["dicom", "convert", str(series), str(tmp_path / "v.nii.gz")],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "16.dcm not read: not a DICOM file" in result.output


def test_a_folder_of_two_series_names_the_files_of_a_small_one(dicom_brain_tumor_progression_path, tmp_path):
    """Found by the hostile-input harness: one slice whose Series Instance UID changed made convert list two
    series by UID and file count only; a series of a few files is named file by file."""
    series = tmp_path / "series"
    shutil.copytree(dicom_brain_tumor_progression_path / HCROP_SERIES, series)
    ds = pydicom.dcmread(series / "5.dcm")
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(series / "5.dcm")
    with pytest.raises(DicomSeriesError, match=r"2 series found.*\(1 files: 5\.dcm\)"):
        load_series(series)
