"""DICOM files to arrays with geometry: folder discovery, series-to-volume, decoding, windowing.

Conventions (stated once, used everywhere):
- ``DicomVolume.array`` is indexed ``[i, j, k]`` = ``[column, row, slice]`` (+ a last RGB axis for colour),
  the layout of NIfTI/nibabel and MONAI, so ``array[:, :, k].T`` is slice ``k`` as a viewer shows it.
- ``affine_lps`` maps ``(i, j, k, 1)`` to DICOM patient coordinates (LPS, mm); ``affine_ras`` is the
  same map in RAS (what NIfTI and MONAI's MetaTensor use).
- Slices are ordered by their position along the slice normal (row x column direction), never by
  file name or InstanceNumber; enhanced multi-frame geometry comes from the functional groups.
- Pixel values are modality values: Rescale Slope/Intercept applied (per frame when it varies),
  MONOCHROME1 inverted so that higher is brighter, colour returned as RGB.
No patient identifiers go into logs or error messages: only file paths and UIDs-free reasons.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medai.errors import (
    DicomDecodeError,
    DicomError,
    DicomNoPixelDataError,
    DicomNotImageError,
    DicomReadError,
    DicomSeriesError,
    InputFileError,
)
from medai.utils import optional_import

log = logging.getLogger(__name__)

# |row . column| and | |v| - 1 | above this are refused; below it the vectors are re-orthonormalised
# (scanners write IOP rounded to ~6 decimals, so 1e-6..1e-3 deviations are common and harmless).
ORTHOGONALITY_TOLERANCE = 1e-3
# Orientations of two slices that differ by more than this (per component) are different planes.
ORIENTATION_TOLERANCE = 1e-3
# Two slices closer than this along the normal sit at the same position (mm).
DUPLICATE_TOLERANCE_MM = 1e-2
# A step larger than GAP_FACTOR x the median step is reported as missing slices.
GAP_FACTOR = 1.5
# Relative deviation of a step from the median step reported as non-uniform spacing.
SPACING_TOLERANCE = 0.01

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Common CT display presets (center, width) in HU; radiology teaching values.
CT_WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (32.0, 8.0),
    "temporal_bone": (600.0, 2800.0),
    "soft_tissue": (40.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
}

# SOP classes whose instances hold no pixel volume to load (they are indexed, not loaded).
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT (plans, structure sets, ...)
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, segmentation, ...
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
)
SEGMENTATION_SOP = "1.2.840.10008.5.1.4.1.1.66.4"


def _pydicom():
    return optional_import("pydicom", "DICOM reading", extra="dicom")


def instance_kind(sop_class_uid: str) -> str:
    """Return 'image', 'seg', 'sr' or 'other' for a SOP Class UID."""
    if sop_class_uid == SEGMENTATION_SOP:
        return "seg"
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
        return "sr"
    if any(sop_class_uid.startswith(p) for p in NON_IMAGE_SOP_PREFIXES):
        return "other"
    return "image"


def sop_class_name(uid: str) -> str:
    """Return the DICOM name of a SOP Class UID (or the UID when unknown)."""
    from pydicom.uid import UID

    name = UID(uid).name
    return name or uid


# --------------------------------------------------------------------------------------------
# Reading one file
# --------------------------------------------------------------------------------------------


def read_dataset(path: str | Path, *, stop_before_pixels: bool = False, allow_no_preamble: bool = False,
                 defer_pixels: bool = True, every_element: bool = False):
    """Read one DICOM Part 10 file or raise DicomReadError naming the file and why.

    defer_pixels: leave large values (Pixel Data) on disk until used: fast scans; loaders that decode
    anyway pass False to read each file once.
    every_element: also parse private elements and sequence contents (de-identification visits them all).
    """
    pydicom = _pydicom()
    from pydicom.errors import BytesLengthException, InvalidDicomError

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DicomReadError(path, f"cannot open: {exc.strerror}") from exc
    if size == 0:
        raise DicomReadError(path, "empty file")
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=stop_before_pixels, defer_size="256 KB" if defer_pixels else None,
            force=allow_no_preamble,
        )
    except InvalidDicomError as exc:
        with open(path, "rb") as fh:
            head = fh.read(132)
        if len(head) >= 132 and head[128:132] == b"DICM":
            raise DicomReadError(path, f"malformed file meta information ({_value_free(exc)})") from None
        if _looks_like_raw_dicom(head):
            raise DicomReadError(
                path,
                "no 128-byte preamble and 'DICM' prefix (a raw dataset, not a DICOM Part 10 file); "
                "pass allow_no_preamble=True to read it anyway",
            ) from exc
        raise DicomReadError(path, "not a DICOM file (no 'DICM' prefix)") from exc
    except (EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError, struct.error,
            BytesLengthException) as exc:
        # struct.error: an element header cut short; BytesLengthException: a file meta value of the wrong length
        raise DicomReadError(path, f"truncated or malformed header ({_value_free(exc)})") from None
    if allow_no_preamble and "SOPClassUID" not in ds:
        raise DicomReadError(path, "not a DICOM file (no SOP Class UID)")
    # Convert every public top-level element now so that odd VRs and bad lengths fail here, at the
    # boundary. Private elements and sequence contents stay raw (parsing them all triples load time).
    _parse_elements(ds, path, every_element)
    if every_element and getattr(ds, "file_meta", None) is not None:
        _parse_elements(ds.file_meta, path, every_element)
    # pydicom stops quietly at the end of the file: a file cut inside its header reads as a short
    # dataset, and every user of an instance (index, info, convert, de-identify) needs these two.
    sop_uids = {"SOP Class UID": ds.get("SOPClassUID"), "SOP Instance UID": ds.get("SOPInstanceUID")}
    missing = [name for name, value in sop_uids.items() if not value]
    if missing:
        raise DicomReadError(path, f"truncated or malformed header: no {' or '.join(missing)} "
                                   "(a file cut short, or not a DICOM instance, e.g. a DICOMDIR)")
    several = [name for name, value in sop_uids.items() if not isinstance(value, str)]
    if several:
        raise DicomReadError(path, f"malformed header: several values in {' and '.join(several)} (one is required)")
    if not stop_before_pixels:
        _check_pixel_element_complete(ds, path, size)
    return ds


def _parse_elements(ds, path: Path, every_element: bool) -> None:
    """Parse the dataset's public top-level elements (all elements, nested too, with every_element) or raise DicomReadError."""
    for tag in list(ds.keys()):
        if tag == 0x7FE00010 or (tag.is_private and not every_element):
            continue
        try:
            value = ds[tag].value
        except Exception as exc:  # pydicom raises many types for bad values
            # pydicom's message quotes the raw value (a name, an ID): name the element, drop the cause.
            raise DicomReadError(path, _malformed_element_reason(ds, tag, exc)) from None
        if every_element and ds[tag].VR == "SQ":
            for item in value:
                _parse_elements(item, path, every_element)


# Quoted literals ('...', "...", b'...') in library exception text: where pydicom echoes element values.
_QUOTED_LITERAL = re.compile(r"""b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*\"""", re.DOTALL)
_VR_CODE = re.compile(r"[A-Z]{2}")


def _value_free(exc: BaseException) -> str:
    """Return 'ExceptionType: message' with every quoted literal withheld, so no element value is echoed."""
    return f"{type(exc).__name__}: {_QUOTED_LITERAL.sub('<value withheld>', str(exc))}"


def _malformed_element_reason(ds, tag, exc: BaseException) -> str:
    """Return why an element does not parse, naming its tag, keyword and VR but never its value."""
    from pydicom.datadict import keyword_for_tag
    from pydicom.errors import BytesLengthException

    vr = getattr(ds.get_item(tag, keep_deferred=True), "VR", None)  # a deferred value would be read (and fail) again
    vr = vr if isinstance(vr, str) and _VR_CODE.fullmatch(vr) else "?"
    if isinstance(exc, NotImplementedError) and "Unknown Value Representation" in str(exc):
        fault = f"Unknown Value Representation '{vr}'"
    elif isinstance(exc, BytesLengthException):
        fault = f"value length is not a multiple of the {vr} item size"
    elif isinstance(exc, (ValueError, TypeError)):
        fault = f"value does not parse as VR {vr}"
    else:
        fault = f"VR {vr} value unreadable"
    keyword = keyword_for_tag(tag) or "unknown keyword"
    return f"malformed element {tag} {keyword}: {fault} ({type(exc).__name__}; value not shown)"


def _looks_like_raw_dicom(head: bytes) -> bool:
    """True when bytes start like a DICOM dataset without preamble (group 0002 or 0008 little endian)."""
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[2:4] in (b"\x00\x00", b"\x01\x00", b"\x05\x00", b"\x08\x00", b"\x10\x00", b"\x12\x00", b"\x16\x00")


def _check_pixel_element_complete(ds, path: Path, file_size: int) -> None:
    """Raise DicomReadError when the Pixel Data element runs past the end of the file."""
    if "PixelData" not in ds:
        return
    raw = ds.get_item("PixelData")
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    # Offsets can be compared with the file size only for a value still on disk (deferred) in a
    # file that is not deflated (a deflated file's offsets count inflated bytes).
    deferred = getattr(raw, "value", None) is None and ts != "1.2.840.10008.1.2.1.99"
    length = getattr(raw, "length", None) if deferred else None
    tell = getattr(raw, "value_tell", None) if deferred else None
    # (an unknown transfer syntax UID, e.g. a garbled one, cannot say whether it is compressed: no size check)
    if ts is not None and ts.is_transfer_syntax and not ts.is_compressed and all(k in ds for k in ("Rows", "Columns", "BitsAllocated")):
        frames = _int_or_none(ds.get("NumberOfFrames")) or 1
        bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) * frames
        expected = (bits + 7) // 8
        have = length if tell is not None and length not in (None, 0xFFFFFFFF) else len(ds.PixelData or b"")
        if tell is not None and length not in (None, 0xFFFFFFFF):
            have = min(length, file_size - tell)
        if have < expected:
            raise DicomReadError(path, f"truncated: Pixel Data holds {have} bytes, the image needs {expected}")
        if have > expected + 1:  # one byte of padding to an even length is allowed
            # Decoders trim the excess silently, so the image would be read with the wrong geometry.
            raise DicomReadError(path, f"Pixel Data holds {have} bytes but Rows x Columns x samples x frames "
                                       f"({int(ds.Rows)} x {int(ds.Columns)} x {int(ds.get('SamplesPerPixel', 1))} x "
                                       f"{frames}) at {int(ds.BitsAllocated)} bits needs {expected}: the header does "
                                       "not match the pixels")
    if length is None or tell is None:
        return  # already parsed (small file): pydicom read it fully or raised
    if length == 0xFFFFFFFF:
        # Encapsulated: the file must end with a Sequence Delimitation Item.
        with open(path, "rb") as fh:
            fh.seek(max(file_size - 8, 0))
            tail = fh.read(8)
        if tail[:4] not in (b"\xfe\xff\xdd\xe0", b"\xff\xfe\xe0\xdd"):
            raise DicomReadError(path, "truncated: encapsulated Pixel Data has no sequence delimiter")
    elif tell + length > file_size:
        raise DicomReadError(
            path, f"truncated: Pixel Data declares {length} bytes, file holds {file_size - tell}"
        )


# --------------------------------------------------------------------------------------------
# Discovery: folder tree -> studies -> series -> instances
# --------------------------------------------------------------------------------------------


@dataclass
class InstanceRecord:
    """One DICOM instance found on disk."""

    path: str
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    instance_number: int | None
    number_of_frames: int
    rows: int | None
    columns: int | None
    transfer_syntax: str
    position_mm: list[float] | None = None  # Image Position (Patient), LPS
    orientation: list[float] | None = None  # Image Orientation (Patient)


@dataclass
class SeriesRecord:
    """A series: its UIDs, description and instances (any file names, any folders)."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    series_number: int | None
    kind: str
    instances: list[InstanceRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # duplicated or shifted slices, found by scan

    @property
    def paths(self) -> list[Path]:
        """Paths of the instances (unsorted: loading sorts them by position)."""
        return [Path(i.path) for i in self.instances]


@dataclass
class StudyRecord:
    """A study and its series; patient fields are kept for querying, never logged."""

    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    description: str
    accession_number: str
    series: dict[str, SeriesRecord] = field(default_factory=dict)


@dataclass
class RefusedFile:
    """A file that a scan or load could not use, with the error type and the reason."""

    path: str
    error: str
    reason: str


@dataclass
class DicomIndex:
    """Study/series index of a folder tree plus every refused file."""

    root: str
    studies: dict[str, StudyRecord] = field(default_factory=dict)
    refused: list[RefusedFile] = field(default_factory=list)
    duplicates: list[RefusedFile] = field(default_factory=list)
    files_seen: int = 0

    def all_series(self) -> list[SeriesRecord]:
        """Every series of every study."""
        return [s for st in self.studies.values() for s in st.series.values()]

    def series(self, series_uid: str) -> SeriesRecord:
        """The series with this UID (KeyError when absent)."""
        for st in self.studies.values():
            if series_uid in st.series:
                return st.series[series_uid]
        raise KeyError(f"no series {series_uid} under {self.root}")

    def find(self, *, modality: str | None = None, kind: str | None = None, description: str | None = None) -> list[SeriesRecord]:
        """Series matching all the given filters (description: case-insensitive substring)."""
        out = []
        for s in self.all_series():
            if modality and s.modality != modality:
                continue
            if kind and s.kind != kind:
                continue
            if description and description.lower() not in s.description.lower():
                continue
            out.append(s)
        return out

    @property
    def instance_count(self) -> int:
        """Number of instances indexed."""
        return sum(len(s.instances) for s in self.all_series())

    def to_dict(self, *, phi: bool = False) -> dict[str, Any]:
        """JSON-ready dict of the whole index; patient name, ID and accession number blanked unless `phi`."""
        data = asdict(self)
        if not phi:
            for study in data["studies"].values():
                for key in ("patient_id", "patient_name", "accession_number"):
                    study[key] = "<redacted>" if study[key] else ""
        return data


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def iter_files(root: str | Path) -> Iterable[Path]:
    """Every regular file under root (recursively, sorted for reproducible output)."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def scan_folder(root: str | Path, *, progress: bool = False) -> DicomIndex:
    """Index every DICOM file under root into studies/series; refused files are recorded with reasons."""
    root = Path(root)
    if not root.exists():
        raise InputFileError(root, "no such file or folder")
    index = DicomIndex(root=str(root))
    files = list(iter_files(root))
    if progress:
        from tqdm import tqdm

        files = tqdm(files, desc="scan", unit="file")
    for path in files:
        index.files_seen += 1
        try:
            ds = read_dataset(path)
            record, study_fields, series_fields = _index_entry(ds, path)
        except DicomError as exc:
            index.refused.append(RefusedFile(str(path), type(exc).__name__, exc.reason))
            log.info("refused %s: %s", path, exc.reason)
            continue
        study = index.studies.get(study_fields["study_uid"])
        if study is None:
            study = index.studies[study_fields["study_uid"]] = StudyRecord(**study_fields)
        series = study.series.get(series_fields["series_uid"])
        if series is None:
            series = study.series[series_fields["series_uid"]] = SeriesRecord(**series_fields)
        twin = next((i for i in series.instances if i.sop_instance_uid == record.sop_instance_uid), None)
        if twin is not None:
            # Same instance, another copy (often another transfer syntax): listed, not loaded twice.
            index.duplicates.append(
                RefusedFile(str(path), "DuplicateInstance", f"same SOP Instance UID as {twin.path}; that copy is indexed")
            )
            continue
        series.instances.append(record)
    for series in index.all_series():
        series.warnings = series_geometry_warnings(series)
    log.info(
        "scanned %d files: %d instances, %d duplicate copies, %d refused",
        index.files_seen, index.instance_count, len(index.duplicates), len(index.refused),
    )
    return index


def series_geometry_warnings(series: SeriesRecord, *, tolerance: float = 0.1) -> list[str]:
    """Say where a single-frame image series repeats a slice position or breaks its spacing (a shifted or missing slice)."""
    placed = [i for i in series.instances if i.position_mm and i.orientation and i.number_of_frames == 1]
    if series.kind != "image" or len(placed) < 3:
        return []
    row, col = np.array(placed[0].orientation[:3]), np.array(placed[0].orientation[3:])
    normal = np.cross(row, col)
    dist = np.array([np.dot(i.position_mm, normal) for i in placed])
    order = np.argsort(dist, kind="stable")
    names = [Path(placed[k].path).name for k in order]
    steps = np.diff(dist[order])
    same = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    warnings = [f"{names[k]} and {names[k + 1]} share one position ({dist[order][k]:.2f} mm): a duplicated slice, "
                "or echoes / time points / stacks in one series" for k in same[:3]]
    if same.size > 3:
        warnings.append(f"{same.size - 3} more shared positions")
    regular = steps[steps >= DUPLICATE_TOLERANCE_MM]
    if regular.size:
        spacing = float(np.median(regular))
        for k in np.flatnonzero(steps >= DUPLICATE_TOLERANCE_MM):
            if abs(steps[k] - spacing) > tolerance * spacing:
                warnings.append(f"spacing {steps[k]:.2f} mm between {names[k]} and {names[k + 1]} where the series has "
                                f"{spacing:.2f} mm: a shifted or missing slice")
    return warnings


def _index_entry(ds, path: Path):
    """Build the instance record and study/series fields of one dataset, or raise a DicomError."""
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)]
    if missing:
        raise DicomReadError(path, f"missing required UID(s): {', '.join(missing)}")
    sop_class = str(ds.SOPClassUID)
    kind = instance_kind(sop_class)
    if kind == "image":
        _check_image_attributes(ds, path)
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    record = InstanceRecord(
        path=str(path),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=sop_class,
        kind=kind,
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        number_of_frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
        rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        transfer_syntax=ts,
        position_mm=_float_list(ds.get("ImagePositionPatient"), 3),
        orientation=_float_list(ds.get("ImageOrientationPatient"), 6),
    )
    study = dict(
        study_uid=str(ds.StudyInstanceUID),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        study_date=_text(ds, "StudyDate"),
        description=_text(ds, "StudyDescription"),
        accession_number=_text(ds, "AccessionNumber"),
    )
    series = dict(
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        modality=_text(ds, "Modality"),
        description=_text(ds, "SeriesDescription"),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        kind=kind,
    )
    return record, study, series


def _float_list(value, n: int) -> list[float] | None:
    """n finite numbers as a list, or None when absent or garbled (pydicom keeps an unparsable DS as text)."""
    arr = _ds_float_seq(value, n)
    return None if arr is None else [float(v) for v in arr]


def _check_image_attributes(ds, path: Path) -> None:
    """Raise DicomNoPixelDataError when an image instance lacks pixel data or its attributes."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomNoPixelDataError(path, f"{sop_class_name(str(ds.SOPClassUID))} instance has no Pixel Data")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation") if k not in ds]
    if missing:
        raise DicomNoPixelDataError(path, f"pixel attributes missing: {', '.join(missing)}")


# --------------------------------------------------------------------------------------------
# Decoding pixels
# --------------------------------------------------------------------------------------------


def transfer_syntax_name(ds) -> str:
    """Human name of the dataset's transfer syntax."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return f"{uid.name} ({uid})" if uid else "unknown transfer syntax"


def _drop_plugin_tracebacks(record: logging.LogRecord) -> bool:
    """Logging filter: pydicom logs each failing decoder plugin with a traceback; the DicomDecodeError names them all."""
    return record.exc_info is None


def decode_frames(ds, path: str | Path) -> tuple[np.ndarray, str]:
    """Decode all frames to (frames, rows, columns[, 3]) and return them with 'MONOCHROME' or 'RGB'.

    Stored values only (no rescale); MONOCHROME1 is inverted here so that higher is brighter,
    PALETTE COLOR is expanded through its LUT, YBR is converted to RGB.
    """
    from pydicom.pixels import apply_color_lut

    path = Path(path)
    if "SOPClassUID" in ds and instance_kind(str(ds.SOPClassUID)) not in ("image",):
        raise DicomNotImageError(path, sop_class_name(str(ds.SOPClassUID)))
    _check_image_attributes(ds, path)
    decoder_log = logging.getLogger("pydicom.pixels.decoders.base")
    decoder_log.addFilter(_drop_plugin_tracebacks)
    try:
        arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # decoders raise RuntimeError/ValueError/NotImplementedError...
        # ... and the Rust ones (pylibjpeg-rle) panic on bad data with pyo3's PanicException, a BaseException
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        raise DicomDecodeError(path, transfer_syntax_name(ds), f"{type(exc).__name__}: {exc}") from exc
    finally:
        decoder_log.removeFilter(_drop_plugin_tracebacks)
    photometric = str(ds.PhotometricInterpretation).strip()
    samples = int(ds.SamplesPerPixel)
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        samples = 3
    if samples == 1:
        arr = arr.reshape(frames, int(ds.Rows), int(ds.Columns))
    else:
        arr = arr.reshape(frames, int(ds.Rows), int(ds.Columns), 3)
    if photometric == "MONOCHROME1":
        arr = _invert_stored(arr, ds)
    arr = np.ascontiguousarray(arr)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr, ("MONOCHROME" if samples == 1 else "RGB")


def _stored_range(ds) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _invert_stored(arr: np.ndarray, ds) -> np.ndarray:
    lo, hi = _stored_range(ds)
    return (lo + hi - arr.astype(np.int64)).astype(arr.dtype)


# --------------------------------------------------------------------------------------------
# Series -> volume
# --------------------------------------------------------------------------------------------


@dataclass
class FrameGeometry:
    """Where one 2D frame sits: source file, frame index and its plane in patient space (LPS mm)."""

    path: str
    frame: int
    sop_instance_uid: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    slope: float
    intercept: float
    instance_number: int | None
    window: tuple[float, float] | None


@dataclass
class DicomVolume:
    """A series as a volume: array [column, row, slice(, RGB)], affine, spacing and what was found."""

    array: np.ndarray
    affine_lps: np.ndarray | None
    spacing_mm: tuple[float, float, float]
    geometry: str  # 'patient' (true LPS affine), 'pixel' (spacing only) or 'none'
    photometric: str
    metadata: dict[str, Any]
    frames: list[FrameGeometry]
    warnings: list[str] = field(default_factory=list)

    @property
    def affine_ras(self) -> np.ndarray | None:
        """The affine in RAS (NIfTI/MONAI convention), or None without patient geometry."""
        return None if self.affine_lps is None else LPS_TO_RAS @ self.affine_lps

    @property
    def origin_lps(self) -> np.ndarray | None:
        """Centre of voxel (0, 0, 0) in LPS mm."""
        return None if self.affine_lps is None else self.affine_lps[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray | None:
        """3x3 unit column vectors of the i, j, k axes in LPS."""
        if self.affine_lps is None:
            return None
        m = self.affine_lps[:3, :3]
        return m / np.linalg.norm(m, axis=0, keepdims=True)

    @property
    def slices(self) -> np.ndarray:
        """The volume as (slice, row, column[, RGB]) for display."""
        return np.moveaxis(self.array, (0, 1), (-1, -2)) if self.array.ndim == 3 else self.array.transpose(2, 1, 0, 3)

    @property
    def sop_instance_uids(self) -> list[str]:
        """Source SOP Instance UID of each slice, in slice order."""
        return [f.sop_instance_uid for f in self.frames]


def _ds_float_seq(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n and np.all(np.isfinite(arr)) else None


def _spacing_or_none(value) -> np.ndarray | None:
    """Pixel spacing as 2 positive floats, or None (some writers put 0\\0 for 'unknown')."""
    arr = _ds_float_seq(value, 2)
    return arr if arr is not None and np.all(arr > 0) else None


def _first_item(ds, seq_keyword: str):
    seq = ds.get(seq_keyword)
    return seq[0] if seq else None


def frame_geometries(ds, path: str | Path) -> list[FrameGeometry]:
    """Per-frame geometry of one instance: functional groups for enhanced objects, else the top level."""
    path = str(path)
    n_frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    sop = str(ds.get("SOPInstanceUID", ""))
    inst = _int_or_none(ds.get("InstanceNumber"))
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")

    def lookup(frame_item, seq_keyword: str, keyword: str):
        for group in (frame_item, shared):
            if group is None:
                continue
            item = _first_item(group, seq_keyword)
            if item is not None and keyword in item:
                return item.get(keyword)
        return None

    out = []
    if per_frame is not None or shared is not None:
        for f in range(n_frames):
            item = per_frame[f] if per_frame is not None and f < len(per_frame) else None
            window = _window_or_none(lookup(item, "FrameVOILUTSequence", "WindowCenter"),
                                     lookup(item, "FrameVOILUTSequence", "WindowWidth"))
            spacing = _spacing_or_none(lookup(item, "PixelMeasuresSequence", "PixelSpacing"))
            thick = lookup(item, "PixelMeasuresSequence", "SliceThickness")
            slope = lookup(item, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = lookup(item, "PixelValueTransformationSequence", "RescaleIntercept")
            out.append(
                FrameGeometry(
                    path=path,
                    frame=f,
                    sop_instance_uid=sop,
                    position=_ds_float_seq(lookup(item, "PlanePositionSequence", "ImagePositionPatient"), 3),
                    orientation=_ds_float_seq(lookup(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                    pixel_spacing=tuple(spacing) if spacing is not None else None,
                    slice_thickness=_one_float(thick),
                    slope=_rescale(slope if slope not in (None, "") else ds.get("RescaleSlope"), 1.0, "Rescale Slope", path),
                    intercept=_rescale(intercept if intercept not in (None, "") else ds.get("RescaleIntercept"), 0.0,
                                       "Rescale Intercept", path),
                    instance_number=inst,
                    window=window,
                )
            )
        return out
    spacing = _spacing_or_none(ds.get("PixelSpacing"))
    if spacing is None:
        spacing = _spacing_or_none(ds.get("ImagerPixelSpacing"))
    window = _window_or_none(ds.get("WindowCenter"), ds.get("WindowWidth"))
    position = _ds_float_seq(ds.get("ImagePositionPatient"), 3)
    orientation = _ds_float_seq(ds.get("ImageOrientationPatient"), 6)
    thick = ds.get("SliceThickness")
    for f in range(n_frames):
        out.append(
            FrameGeometry(
                path=path,
                frame=f,
                sop_instance_uid=sop,
                # Classic multi-frame (US cine, ...) frames share one plane: not a spatial stack.
                position=position if n_frames == 1 else None,
                orientation=orientation if n_frames == 1 else None,
                pixel_spacing=tuple(spacing) if spacing is not None else None,
                slice_thickness=_one_float(thick),
                slope=_rescale(ds.get("RescaleSlope"), 1.0, "Rescale Slope", path),
                intercept=_rescale(ds.get("RescaleIntercept"), 0.0, "Rescale Intercept", path),
                instance_number=inst,
                window=window,
            )
        )
    return out


def _first_float(value) -> float:
    try:
        return float(value[0]) if not isinstance(value, (str, bytes)) and hasattr(value, "__len__") else float(value)
    except TypeError:
        return float(value)


def _one_float(value) -> float | None:
    """A single number, or None when absent, empty or not one number (a multi-valued or garbled element)."""
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _rescale(value, default: float, name: str, path: str | Path) -> float:
    """Rescale Slope/Intercept (the default when absent, empty or 0 for the slope); refuse one that is not a number."""
    if not value:
        return default
    number = _one_float(value)
    if number is None:
        raise DicomReadError(path, f"{name} is not one number: modality values cannot be computed")
    return number


def _window_or_none(center, width) -> tuple[float, float] | None:
    """The first (center, width) window, or None when either is absent, empty (Type 3 elements may be) or not a number."""
    try:
        return _first_float(center), _first_float(width)
    except (TypeError, ValueError, IndexError):
        return None


def check_orientation(iop: np.ndarray, source: str | Path, tolerance: float = ORTHOGONALITY_TOLERANCE) -> tuple[np.ndarray, np.ndarray, float]:
    """Return orthonormal (row, column) direction cosines and the deviation found; refuse beyond tolerance."""
    row, col = iop[:3], iop[3:]
    deviation = max(abs(float(row @ col)), abs(np.linalg.norm(row) - 1.0), abs(np.linalg.norm(col) - 1.0))
    if deviation > tolerance:
        raise DicomSeriesError(
            source, f"Image Orientation (Patient) is not orthonormal (deviation {deviation:.2e} > tolerance {tolerance:.0e})"
        )
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    return row, col, deviation


def _dicom_files(source) -> list[Path]:
    if isinstance(source, SeriesRecord):
        return source.paths
    if isinstance(source, (str, Path)):
        source = Path(source)
        if source.is_dir():
            return list(iter_files(source))
        return [source]
    return [Path(p) for p in source]


def load_series(
    source: str | Path | Sequence[str | Path] | SeriesRecord,
    *,
    series_uid: str | None = None,
    strict: bool = False,
    on_file_error: str = "raise",
    failures: list[RefusedFile] | None = None,
) -> DicomVolume:
    """Load one series (folder, file list, or SeriesRecord) as a DicomVolume sorted along the slice normal.

    strict: raise DicomSeriesError on gaps or non-uniform spacing instead of recording warnings.
    on_file_error: 'raise' stops on the first bad file; 'skip' records it in `failures` and goes on.
    """
    if on_file_error not in ("raise", "skip"):
        raise ValueError("on_file_error must be 'raise' or 'skip'")
    paths = _dicom_files(source)
    from_folder = isinstance(source, SeriesRecord) or (isinstance(source, (str, Path)) and Path(source).is_dir())
    label = str(source) if isinstance(source, (str, Path)) else (paths[0].parent if paths else "<empty>")
    failures = failures if failures is not None else []
    datasets: dict[str, Any] = {}
    by_series: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        try:
            ds = read_dataset(path, defer_pixels=False)
            if not ds.get("SeriesInstanceUID"):
                raise DicomReadError(path, "missing Series Instance UID")
            kind = instance_kind(str(ds.get("SOPClassUID", "")))
            if kind != "image":
                raise DicomNotImageError(path, sop_class_name(str(ds.SOPClassUID)))
            _check_image_attributes(ds, path)
        except DicomError as exc:
            # In a folder, files that are not DICOM at all (notes, NIfTI, ...) are expected: record, go on;
            # so is a broken file of another series when one series was asked for.
            foreign = from_folder and isinstance(exc, DicomReadError) and exc.reason.startswith("not a DICOM file")
            if series_uid is not None and not foreign:
                foreign = _series_uid_of_broken_file(path) not in (series_uid, None)
            if on_file_error == "raise" and not foreign:
                raise
            failures.append(RefusedFile(str(path), type(exc).__name__, exc.reason))
            continue
        datasets[str(path)] = ds
        by_series[str(ds.SeriesInstanceUID)].append(str(path))
    if series_uid is not None:
        if series_uid not in by_series:
            raise DicomSeriesError(label, f"no image instances of the requested series (found {len(by_series)} series)")
        chosen = by_series[series_uid]
    elif len(by_series) == 1:
        chosen = next(iter(by_series.values()))
    elif not by_series:
        raise DicomSeriesError(label, "no loadable image instances")
    else:
        # a series of a few files among many is often a stray or damaged file: name them
        counts = ", ".join(f"{uid} ({len(p)} files{': ' + ', '.join(Path(x).name for x in p) if len(p) <= 3 else ''})"
                           for uid, p in by_series.items())
        raise DicomSeriesError(label, f"{len(by_series)} series found; pass series_uid= one of: {counts}")
    return _assemble_volume([(p, datasets[p]) for p in chosen], label, strict, on_file_error, failures)


def _series_uid_of_broken_file(path: str | Path) -> str | None:
    """The Series Instance UID of a file that failed to load, when its header still says it; else None."""
    try:
        ds = _pydicom().dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"], force=True)
        return str(ds.SeriesInstanceUID) if ds.get("SeriesInstanceUID") else None
    except Exception:  # any parse failure means: cannot tell
        return None


def is_mosaic(ds) -> bool:
    """True for a Siemens MOSAIC image (a grid of slices in one 2D frame)."""
    return "MOSAIC" in [str(t).upper() for t in ds.get("ImageType", [])]


def _load_mosaic(path: str, ds, label) -> DicomVolume:
    """Un-tile a Siemens mosaic into slices with their geometry (slice count and normal from the CSA header).

    nibabel's MosaicWrapper reads the Siemens CSA header (NumberOfImagesInMosaic, slice normal) that
    pydicom does not parse; its affine indexes (row, column, slice) and is turned into ours here.
    """
    import warnings as _warnings

    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")  # nibabel flags its DICOM readers as experimental
            nicom = optional_import("nibabel.nicom.dicomwrappers", "Siemens mosaic un-tiling", extra="dicom")
            wrapper = nicom.wrapper_from_data(ds)
            data = np.asarray(wrapper.get_data())  # (rows, columns, slices), rescale applied
            affine_rc = np.asarray(wrapper.affine, dtype=np.float64)
    except ImportError:
        raise
    except Exception as exc:  # CSA header missing or malformed
        raise DicomSeriesError(path, f"Siemens mosaic without a usable CSA header ({type(exc).__name__}: {exc})") from exc
    if data.ndim != 3:
        raise DicomSeriesError(path, f"mosaic un-tiled to shape {data.shape}, expected 3D")
    affine = affine_rc.copy()
    affine[:, [0, 1]] = affine_rc[:, [1, 0]]  # (row, column) -> (column, row)
    array = np.ascontiguousarray(data.transpose(1, 0, 2))
    if not array.dtype.isnative:  # big endian files
        array = array.astype(array.dtype.newbyteorder("="))
    if np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array)) and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    window = _window_or_none(ds.get("WindowCenter"), ds.get("WindowWidth"))
    orientation = _ds_float_seq(ds.get("ImageOrientationPatient"), 6)
    frames = [
        FrameGeometry(path=str(path), frame=0, sop_instance_uid=str(ds.SOPInstanceUID),
                      position=(affine @ [0, 0, k, 1])[:3], orientation=orientation,
                      pixel_spacing=(spacing[1], spacing[0]), slice_thickness=_int_or_none(ds.get("SliceThickness")),
                      slope=_rescale(ds.get("RescaleSlope"), 1.0, "Rescale Slope", path),
                      intercept=_rescale(ds.get("RescaleIntercept"), 0.0, "Rescale Intercept", path),
                      instance_number=_int_or_none(ds.get("InstanceNumber")), window=window)
        for k in range(array.shape[2])
    ]
    metadata = _series_metadata(ds, frames, "patient")
    metadata["mosaic_slices"] = int(array.shape[2])
    return DicomVolume(array=array, affine_lps=affine, spacing_mm=spacing, geometry="patient", photometric="MONOCHROME",
                       metadata=metadata, frames=frames,
                       warnings=[f"Siemens mosaic un-tiled into {array.shape[2]} slices (geometry from the CSA header)"])


def _assemble_volume(items, label, strict: bool, on_file_error: str, failures: list[RefusedFile]) -> DicomVolume:
    mosaics = [(p, ds) for p, ds in items if is_mosaic(ds)]
    if mosaics:
        if len(items) > 1:
            raise DicomSeriesError(
                label, f"{len(mosaics)} Siemens mosaic volumes in one series (a time series): load one file at a time"
            )
        return _load_mosaic(*mosaics[0], label)
    warnings: list[str] = []
    frames: list[FrameGeometry] = []
    seen_sops: set[str] = set()
    for path, ds in items:
        sop = str(ds.SOPInstanceUID)
        if sop in seen_sops:
            warnings.append(f"{path}: duplicate copy of an instance already loaded; ignored")
            continue
        seen_sops.add(sop)
        frames.extend(frame_geometries(ds, path))
    sizes = Counter((int(ds.Rows), int(ds.Columns)) for _, ds in items)
    if len(sizes) > 1:
        raise DicomSeriesError(label, f"slices of different sizes (rows x columns: {dict(sizes)}); not one volume")

    frames, affine, spacing, geometry = _order_frames(frames, label, strict, warnings)

    # Decode each file once, then pick its frames in slice order.
    decoded: dict[str, np.ndarray] = {}
    photometric = None
    datasets = dict(items)
    keep: list[FrameGeometry] = []
    for fr in frames:
        if fr.path not in decoded:
            try:
                decoded[fr.path], photo = decode_frames(datasets[fr.path], fr.path)
            except DicomError as exc:
                if on_file_error == "raise":
                    raise
                failures.append(RefusedFile(fr.path, type(exc).__name__, exc.reason))
                decoded[fr.path] = None
                continue
            if photometric is None:
                photometric = photo
            elif photo != photometric:
                raise DicomSeriesError(label, "series mixes colour and monochrome instances")
        if decoded[fr.path] is not None:
            keep.append(fr)
    if not keep:
        raise DicomSeriesError(label, "no instance of the series could be decoded")
    if len(keep) != len(frames):
        warnings.append(f"{len(frames) - len(keep)} slice(s) dropped because their pixels did not decode")
        if geometry == "patient":
            frames, affine, spacing, geometry = _order_frames(keep, label, strict, warnings)
        else:
            frames = keep
    stack = np.stack([decoded[fr.path][fr.frame] for fr in frames])  # (k, rows, cols[, 3])
    stack, dtype_note = _apply_rescale(stack, frames)
    if dtype_note:
        warnings.append(dtype_note)
    array = np.moveaxis(stack, 0, 2).swapaxes(0, 1) if stack.ndim == 3 else stack.transpose(2, 1, 0, 3)
    first = datasets[frames[0].path]
    metadata = _series_metadata(first, frames, geometry)
    for w in warnings:
        log.warning("%s: %s", label, w)
    return DicomVolume(
        array=np.ascontiguousarray(array),
        affine_lps=affine,
        spacing_mm=spacing,
        geometry=geometry,
        photometric=photometric or "MONOCHROME",
        metadata=metadata,
        frames=frames,
        warnings=warnings,
    )


def _order_frames(frames: list[FrameGeometry], label, strict: bool, warnings: list[str]):
    """Sort frames along the slice normal and build the affine; check orientation, duplicates, gaps."""
    has_geometry = all(f.position is not None and f.orientation is not None for f in frames)
    spacing_2d = frames[0].pixel_spacing
    if not has_geometry:
        if any(f.position is not None for f in frames):
            raise DicomSeriesError(label, "some slices have Image Position/Orientation and others do not")
        if len(frames) > 1:
            warnings.append(
                "no patient geometry (Image Position/Orientation absent): frames kept in file/frame order, "
                "no affine; they may be time points, not slices"
            )
        frames = sorted(frames, key=lambda f: (f.instance_number if f.instance_number is not None else 0, f.path, f.frame))
        if spacing_2d is not None:
            sp = (float(spacing_2d[1]), float(spacing_2d[0]), float(frames[0].slice_thickness or 1.0))
            return frames, None, sp, "pixel"
        return frames, None, (1.0, 1.0, 1.0), "none"
    if spacing_2d is None:
        raise DicomSeriesError(label, "Image Position/Orientation present but Pixel Spacing absent")
    ref = frames[0].orientation
    for f in frames[1:]:
        if np.max(np.abs(f.orientation - ref)) > ORIENTATION_TOLERANCE:
            n_planes = len({tuple(np.round(fr.orientation, 3)) for fr in frames})
            raise DicomSeriesError(
                label, f"slices have {n_planes} different orientations (a localizer or several stacks in one series?)"
            )
    row, col, deviation = check_orientation(ref, label)
    if deviation > 1e-6:
        warnings.append(
            f"orientation vectors off orthonormal by {deviation:.1e} (tolerance {ORTHOGONALITY_TOLERANCE:.0e}); re-orthonormalised"
        )
    if any(f.pixel_spacing is None or np.max(np.abs(np.subtract(f.pixel_spacing, spacing_2d))) > 1e-4 for f in frames):
        raise DicomSeriesError(label, "slices have different Pixel Spacing")
    normal = np.cross(row, col)
    dist = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(dist, kind="stable")
    frames = [frames[i] for i in order]
    dist = dist[order]
    steps = np.diff(dist)
    dup = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    if dup.size:
        first = dup[0]
        where = f"{Path(frames[first].path).name}" + (f" frame {frames[first].frame}" if frames[first].frame else "")
        twin = f"{Path(frames[first + 1].path).name}" + (f" frame {frames[first + 1].frame}" if frames[first + 1].frame else "")
        raise DicomSeriesError(
            label,
            f"{dup.size} slice position(s) occur more than once (e.g. {where} and {twin} both at "
            f"{dist[first]:.2f} mm along the normal): a copied slice, or several echoes, time points or stacks in one "
            "series; remove the copy or split the series (EchoNumbers, TemporalPositionIdentifier, StackID)",
        )
    col_spacing, row_spacing = float(spacing_2d[1]), float(spacing_2d[0])
    affine = np.eye(4)
    affine[:3, 0] = row * col_spacing
    affine[:3, 1] = col * row_spacing
    affine[:3, 3] = frames[0].position
    if len(frames) == 1:
        thick = frames[0].slice_thickness or 1.0
        affine[:3, 2] = normal * thick
        return frames, affine, (col_spacing, row_spacing, float(thick)), "patient"
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    for g in gaps:
        missing = int(round(steps[g] / median)) - 1
        warnings.append(f"gap of {steps[g]:.2f} mm between slices {g} and {g + 1} (about {missing} slice(s) missing)")
    uneven = np.max(np.abs(steps - median)) > SPACING_TOLERANCE * median + 1e-3
    if uneven and not gaps.size:
        warnings.append(f"non-uniform slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm (median {median:.3f} used)")
    if (gaps.size or uneven) and strict:
        raise DicomSeriesError(label, "; ".join(warnings[-max(1, gaps.size):]))
    # The mean step vector, not normal*spacing: keeps gantry tilt (shear) exact instead of hiding it.
    step_vec = (frames[-1].position - frames[0].position) / (len(frames) - 1)
    if gaps.size or uneven:
        step_vec = normal * median
    tilt = np.degrees(np.arccos(np.clip(abs(step_vec @ normal) / np.linalg.norm(step_vec), -1, 1)))
    if tilt > 0.1:
        warnings.append(f"slices are sheared by {tilt:.1f} degrees (gantry tilt); the affine keeps the shear")
    affine[:3, 2] = step_vec
    return frames, affine, (col_spacing, row_spacing, float(np.linalg.norm(step_vec))), "patient"


def _apply_rescale(stack: np.ndarray, frames: list[FrameGeometry]) -> tuple[np.ndarray, str]:
    slopes = np.array([f.slope for f in frames])
    intercepts = np.array([f.intercept for f in frames])
    if np.all(slopes == 1) and np.all(intercepts == 0):
        return stack, ""
    shape = (-1,) + (1,) * (stack.ndim - 1)
    if np.all(slopes == 1) and np.all(intercepts == np.round(intercepts)):
        out = stack.astype(np.int32) + intercepts.astype(np.int32).reshape(shape)
        if out.min() >= np.iinfo(np.int16).min and out.max() <= np.iinfo(np.int16).max:
            out = out.astype(np.int16)
        return out, ""
    out = stack.astype(np.float32) * slopes.astype(np.float32).reshape(shape) + intercepts.astype(np.float32).reshape(shape)
    return out, ""


def _series_metadata(ds, frames: list[FrameGeometry], geometry: str) -> dict[str, Any]:
    """Study/series/acquisition fields (no patient identifiers) for downstream code and MONAI."""
    keys = (
        "Modality", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
        "SeriesDescription", "SeriesNumber", "Manufacturer", "BodyPartExamined", "PatientPosition",
        "PhotometricInterpretation", "BitsStored", "RescaleType",
    )
    meta: dict[str, Any] = {}
    for k in keys:
        if k in ds and ds.get(k) not in (None, ""):
            v = ds.get(k)
            meta[k] = str(v) if not isinstance(v, (int, float)) else v
    meta["TransferSyntaxUID"] = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    meta["number_of_slices"] = len(frames)
    meta["geometry"] = geometry
    meta["space"] = "LPS (affine_lps) / RAS (affine_ras)"
    windows = [f.window for f in frames if f.window is not None]
    if windows:
        meta["window_center_width"] = windows[len(windows) // 2]
    meta["rescale_slope"] = [f.slope for f in frames]
    meta["rescale_intercept"] = [f.intercept for f in frames]
    meta["monochrome1_inverted"] = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    if meta["monochrome1_inverted"] and windows:
        # Header windows refer to the un-inverted values: map the centre through the inversion.
        lo, hi = _stored_range(ds)
        s, b = frames[0].slope, frames[0].intercept
        c, w = meta["window_center_width"]
        meta["window_center_width"] = (s * (lo + hi) + 2 * b - c, w)
    return meta


# --------------------------------------------------------------------------------------------
# Windowing for display
# --------------------------------------------------------------------------------------------


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map modality values to [0, 1] display values with a DICOM window (PS3.3 C.11.2.1.2)."""
    values = np.asarray(values, dtype=np.float32)
    function = function.upper()
    if function == "LINEAR":
        if width < 1:
            raise ValueError("LINEAR window width must be >= 1")
        out = ((values - (center - 0.5)) / (width - 1)) + 0.5
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError("LINEAR_EXACT window width must be > 0")
        out = (values - center) / width + 0.5
    elif function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    else:
        raise ValueError(f"unknown VOI LUT function '{function}'")
    return np.clip(out, 0.0, 1.0)


def window_volume(volume: DicomVolume, preset: str | None = None) -> np.ndarray:
    """Return the volume windowed to [0, 1]: a CT preset by name, else the header window, else min/max."""
    if preset is not None:
        if preset not in CT_WINDOW_PRESETS:
            raise ValueError(f"unknown preset '{preset}' (known: {', '.join(CT_WINDOW_PRESETS)})")
        center, width = CT_WINDOW_PRESETS[preset]
    elif "window_center_width" in volume.metadata:
        center, width = volume.metadata["window_center_width"]
    else:
        lo, hi = float(np.min(volume.array)), float(np.max(volume.array))
        center, width = (lo + hi) / 2, max(hi - lo, 1.0)
    return apply_window(volume.array, center, width)


def apply_voi_lut_frame(path: str | Path, frame: int = 0) -> np.ndarray:
    """One frame through the file's own Modality and VOI LUTs (LUT sequence or window), as pydicom applies them."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = read_dataset(path)
    arr, _ = decode_frames(ds, path)
    values = apply_modality_lut(arr[frame], ds)
    return apply_voi_lut(values, ds, index=0)


# --------------------------------------------------------------------------------------------
# Summaries, folder loading, NIfTI
# --------------------------------------------------------------------------------------------


def describe_file(path: str | Path) -> dict[str, Any]:
    """Header summary of one file (no patient fields) and whether its pixels decode."""
    ds = read_dataset(path)
    info: dict[str, Any] = {
        "path": str(path),
        "sop_class": sop_class_name(str(ds.get("SOPClassUID", ""))),
        "kind": instance_kind(str(ds.get("SOPClassUID", ""))),
        "transfer_syntax": transfer_syntax_name(ds),
        "modality": _text(ds, "Modality"),
        "study_uid": _text(ds, "StudyInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "series_description": _text(ds, "SeriesDescription"),
        "rows": _int_or_none(ds.get("Rows")),
        "columns": _int_or_none(ds.get("Columns")),
        "frames": _int_or_none(ds.get("NumberOfFrames")) or 1,
        "photometric": _text(ds, "PhotometricInterpretation"),
        "bits_allocated": _int_or_none(ds.get("BitsAllocated")),
        "bits_stored": _int_or_none(ds.get("BitsStored")),
    }
    geo = frame_geometries(ds, path)[0] if info["kind"] == "image" else None
    if geo is not None:
        info["pixel_spacing_mm"] = geo.pixel_spacing
        info["image_position_lps"] = None if geo.position is None else [float(v) for v in geo.position]
        info["image_orientation"] = None if geo.orientation is None else [float(v) for v in geo.orientation]
    if info["kind"] != "image":
        info["pixels"] = "no pixels (not an image SOP class)"
        return info
    try:
        arr, photometric = decode_frames(ds, path)
        info["pixels"] = f"decode ok: {arr.shape} {arr.dtype} {photometric}, stored range {arr.min()}..{arr.max()}"
        info["decodes"] = True
    except DicomError as exc:
        info["pixels"] = f"does not decode: {exc.reason}"
        info["decodes"] = False
    return info


@dataclass
class FolderLoad:
    """Outcome of loading every image series of a folder: volumes, per-file refusals, totals."""

    volumes: dict[str, DicomVolume]
    refused: list[RefusedFile]
    files_seen: int
    non_image_series: list[str] = field(default_factory=list)

    @property
    def slices_loaded(self) -> int:
        """Number of 2D slices in all loaded volumes."""
        return sum(len(v.frames) for v in self.volumes.values())


def load_folder(root: str | Path, *, progress: bool = False) -> FolderLoad:
    """Scan a folder and load every image series, recording each refused file and continuing."""
    index = scan_folder(root, progress=progress)
    refused = list(index.refused)
    volumes: dict[str, DicomVolume] = {}
    non_image = []
    for series in index.all_series():
        if series.kind != "image":
            non_image.append(series.series_uid)
            continue
        try:
            volumes[series.series_uid] = load_series(series, on_file_error="skip", failures=refused)
        except DicomError as exc:
            for inst in series.instances:
                if not any(r.path == inst.path for r in refused):
                    refused.append(RefusedFile(inst.path, type(exc).__name__, f"series not loadable: {exc.reason}"))
    return FolderLoad(volumes=volumes, refused=refused, files_seen=index.files_seen, non_image_series=non_image)


def save_nifti(volume: DicomVolume, path: str | Path) -> Path:
    """Write the volume as NIfTI with its RAS affine (qform and sform code 1, scanner space)."""
    nib = optional_import("nibabel", "NIfTI writing", extra="dicom")
    if volume.affine_lps is None:
        raise DicomSeriesError(
            volume.frames[0].path if volume.frames else path,
            f"no patient geometry ({volume.geometry}): refusing to write a NIfTI with a made-up affine",
        )
    array = volume.array
    if array.ndim == 4:
        # NIfTI RGB: a structured rgb24 array would lose nothing, but most tools read 4D better.
        array = array.astype(np.uint8) if array.dtype == np.uint8 else array
    img = nib.Nifti1Image(array, volume.affine_ras)
    img.set_qform(volume.affine_ras, code=1)
    img.set_sform(volume.affine_ras, code=1)
    img.header.set_xyzt_units("mm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def convert_series(source: str | Path, out: str | Path, *, series_uid: str | None = None) -> DicomVolume:
    """Load a series folder and write it as NIfTI; returns the volume (with its warnings, skipped files named)."""
    skipped: list[RefusedFile] = []
    volume = load_series(source, series_uid=series_uid, failures=skipped)
    # Files passed over as not DICOM (or of another series): a slice cut down to a few bytes is one of them.
    volume.warnings.extend(f"{f.path} not read: {f.reason}" for f in skipped)
    save_nifti(volume, out)
    return volume
