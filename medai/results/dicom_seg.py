"""Segmentations as DICOM SEG (highdicom), and SEG files read back onto their source volume.

A SEG written here references every source slice (Derivation Image / Referenced Series), carries the
source Frame of Reference, marks the algorithm as AI (Segment Algorithm Type AUTOMATIC, Algorithm
Family 'Artificial Intelligence') and says 'not for clinical use' in its Series and Content Description.
Segment codes are SNOMED CT (SCT), never the retired SRT designator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medai.errors import DicomError, DicomSeriesError
from medai.io.dicom import ORIENTATION_TOLERANCE, DicomVolume, load_series, read_dataset
from medai.utils import optional_import

log = logging.getLogger(__name__)

AI_DISCLAIMER = "AI-generated, not for clinical use"
MANUFACTURER = "medai"


def _hd():
    return optional_import("highdicom", "DICOM SEG/SR writing", extra="dicom")


def _medai_version() -> str:
    try:
        from importlib.metadata import version

        return version("medai")
    except Exception:  # not installed as a distribution (source checkout)
        return "0.1.0"


def snomed_code(code: Any, what: str):
    """A pydicom Code from a Code/CodedConcept or a keyword of pydicom's SCT dictionary (e.g. 'Liver')."""
    from pydicom.sr.codedict import codes

    if isinstance(code, str):
        try:
            return getattr(codes.SCT, code)
        except AttributeError as exc:
            raise ValueError(
                f"{what}: '{code}' is not a SNOMED CT keyword known to pydicom (codes.SCT); pass a pydicom Code"
            ) from exc
    if getattr(code, "scheme_designator", None) == "SRT":
        raise ValueError(f"{what}: the SRT coding scheme is retired; use the SNOMED CT (SCT) code")
    return code


@dataclass
class SegmentSpec:
    """One segment: the value it has in the label map, its name, and SNOMED CT codes for what it is."""

    label: int
    name: str
    property_type: Any  # pydicom Code or codes.SCT keyword, e.g. "Liver", "Neoplasm"
    property_category: Any = "AnatomicalStructure"  # CID 7150 keyword or Code
    anatomic_region: Any = None
    tracking_id: str | None = None


def _algorithm(hd, name: str, version: str):
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name=name, family=codes.cid7162.ArtificialIntelligence, version=version)


# Type 2 elements of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1): required to be
# present, possibly empty. De-identified archives often drop them; highdicom copies them from the
# source into every SEG/SR, so a missing one must become an empty one, as the standard allows.
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")


def read_writer_sources(paths: Sequence[str | Path], *, stop_before_pixels: bool = False) -> list:
    """Read source instances for the SEG/SR writers, repaired where the standard allows (empty Type 2, charset)."""
    datasets = [read_dataset(p, stop_before_pixels=stop_before_pixels) for p in paths]
    for ds in datasets:
        # An empty Specific Character Set means the default repertoire; highdicom wants it absent.
        if "SpecificCharacterSet" in ds and not str(ds.SpecificCharacterSet).strip():
            del ds.SpecificCharacterSet
        for keyword in TYPE2_PATIENT_STUDY:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return datasets


def _source_datasets(volume: DicomVolume):
    """The source datasets in the order highdicom needs, and the label-slice order that matches them."""
    paths = []
    for fr in volume.frames:
        if fr.path not in paths:
            paths.append(fr.path)
    datasets = read_writer_sources(paths)
    for path, ds in zip(paths, datasets):
        if not str(ds.get("FrameOfReferenceUID", "")).strip():
            # A SEG places its frames in the source's frame of reference; inventing one would not match it.
            raise DicomSeriesError(path, "source has no Frame of Reference UID (0020,0052); a SEG could not be placed")
    if len(datasets) > 1 and all("ImageOrientationPatient" in ds for ds in datasets):
        # Scanners round IOP differently per slice (e.g. -0.0597709 vs -0.059771); load_series accepted
        # them within ORIENTATION_TOLERANCE, and highdicom needs them identical: use the first slice's.
        common = datasets[0].ImageOrientationPatient
        for ds in datasets[1:]:
            if np.max(np.abs(np.subtract([float(v) for v in ds.ImageOrientationPatient], [float(v) for v in common]))) <= ORIENTATION_TOLERANCE:
                ds.ImageOrientationPatient = common
    if len(paths) == 1 and len(volume.frames) > 1:
        # One enhanced multi-frame source: SEG frames follow the source frame numbers.
        order = np.argsort([fr.frame for fr in volume.frames])
        return datasets, order
    if len(paths) != len(volume.frames):
        raise DicomSeriesError(paths[0], "mixed multi-frame and single-frame sources are not supported for SEG")
    return datasets, np.arange(len(volume.frames))


def write_segmentation(
    labels: np.ndarray,
    source_series: DicomVolume | str | Path | Sequence[str | Path],
    segment_descriptions: Sequence[SegmentSpec] | Mapping[int, SegmentSpec],
    path: str | Path,
    *,
    algorithm_name: str = "medai",
    algorithm_version: str | None = None,
    keep_empty_frames: bool = False,
    series_description: str | None = None,
    series_number: int = 900,
    fractional: bool = False,
) -> Path:
    """Write a DICOM SEG for `labels` over `source_series` and return the written path.

    labels: in the layout of ``DicomVolume.array`` — ``[column, row, slice]`` in the volume's slice order —
        either an integer label map (0 = background, other values = ``SegmentSpec.label``) or a stack of
        per-segment masks ``[column, row, slice, segment]`` (overlapping segments; float in [0, 1] with
        ``fractional=True``, written as a FRACTIONAL/PROBABILITY SEG).
    source_series: the DicomVolume the labels were computed on (or a series folder / file list to load).
    segment_descriptions: one SegmentSpec per segment (label value, name, SNOMED CT codes).
    keep_empty_frames: write frames with no foreground too (some viewers misplace sparse SEG frames).
    The SEG is marked AI-generated / not for clinical use; the source's patient and study are copied.
    """
    hd = _hd()
    volume = source_series if isinstance(source_series, DicomVolume) else load_series(source_series)
    specs = list(segment_descriptions.values()) if isinstance(segment_descriptions, Mapping) else list(segment_descriptions)
    if not specs:
        raise ValueError("at least one segment description is needed")
    if volume.geometry != "patient":
        raise DicomSeriesError(volume.frames[0].path, "source series has no patient geometry; a SEG could not be placed")
    spatial = volume.array.shape[:3]
    labels = np.asarray(labels)
    if labels.shape[:3] != spatial:
        raise ValueError(f"labels shape {labels.shape} does not match the source volume {spatial} ([column, row, slice])")
    if "mosaic_slices" in volume.metadata:
        raise DicomSeriesError(volume.frames[0].path, "SEG over a Siemens mosaic is not supported (its slices are not DICOM frames)")
    datasets, frame_order = _source_datasets(volume)
    if labels.ndim == 3:
        values = set(np.unique(labels).tolist()) - {0}
        known = {s.label for s in specs}
        if values - known:
            raise ValueError(f"label values {sorted(values - known)} have no SegmentSpec")
        # highdicom wants segment numbers 1..N: map label values in spec order.
        seg_array = np.zeros(labels.shape, dtype=np.uint16 if len(specs) > 255 else np.uint8)
        for number, spec in enumerate(specs, start=1):
            seg_array[labels == spec.label] = number
        pixel_array = seg_array.transpose(2, 1, 0)[frame_order]
    elif labels.ndim == 4:
        if labels.shape[3] != len(specs):
            raise ValueError(f"labels has {labels.shape[3]} mask channels but {len(specs)} segment descriptions")
        if fractional:
            if labels.min() < 0 or labels.max() > 1:
                raise ValueError("fractional masks must lie in [0, 1]")
            pixel_array = labels.astype(np.float32).transpose(2, 1, 0, 3)[frame_order]
        else:
            pixel_array = (labels > 0).astype(np.uint8).transpose(2, 1, 0, 3)[frame_order]
    else:
        raise ValueError("labels must be a 3D label map or a 4D stack of masks")

    algorithm = _algorithm(hd, algorithm_name, algorithm_version or _medai_version())
    descriptions = []
    for number, spec in enumerate(specs, start=1):
        category = spec.property_category
        if isinstance(category, str):
            from pydicom.sr.codedict import codes

            category = getattr(codes.cid7150, category)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=spec.name,
                segmented_property_category=snomed_code(category, f"segment {spec.name} category"),
                segmented_property_type=snomed_code(spec.property_type, f"segment {spec.name} type"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=spec.tracking_id or spec.name,
                anatomic_regions=[snomed_code(spec.anatomic_region, "anatomic region")] if spec.anatomic_region else None,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version or _medai_version(),
        device_serial_number="0",
        content_description=AI_DISCLAIMER,
        content_label="AI_SEG",
        omit_empty_frames=not keep_empty_frames,
    )
    seg.SeriesDescription = (series_description or f"{algorithm_name} segmentation")[:40] + " [AI, not clinical]"
    seg.SeriesDescription = seg.SeriesDescription[:64]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    log.info("wrote SEG with %d segment(s), %d frame(s) to %s", len(specs), int(seg.NumberOfFrames), path)
    return path


@dataclass
class SegmentInfo:
    """A segment as read from a SEG: number, label, and its coded type/category."""

    number: int
    label: str
    property_type: tuple[str, str, str]
    property_category: tuple[str, str, str]
    algorithm_type: str


@dataclass
class SegmentationRead:
    """A SEG file: segments, per-frame references and positions, and the raw frames."""

    path: str
    segmentation_type: str
    segments: list[SegmentInfo]
    frame_segment: list[int]
    frame_source_uids: list[str | None]
    frame_positions: list[np.ndarray | None]
    referenced_series_uid: str | None
    frame_of_reference_uid: str | None
    frames: np.ndarray = field(repr=False)  # (frames, rows, columns), float in [0,1] for FRACTIONAL


def _code_tuple(item) -> tuple[str, str, str]:
    return (str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def read_segmentation(path: str | Path) -> SegmentationRead:
    """Read a DICOM SEG (BINARY, FRACTIONAL or LABELMAP) into frames plus what each frame is and where."""
    path = Path(path)
    ds = read_dataset(path)
    if str(ds.get("SOPClassUID", "")) not in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"):
        raise DicomError(path, "not a Segmentation Storage instance")
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as exc:
        raise DicomError(path, f"SEG pixels do not decode: {exc}") from exc
    n = int(ds.get("NumberOfFrames", 1))
    frames = frames.reshape(n, int(ds.Rows), int(ds.Columns))
    seg_type = str(ds.SegmentationType)
    if seg_type == "FRACTIONAL":
        frames = frames.astype(np.float32) / float(ds.MaximumFractionalValue)
    segments = [
        SegmentInfo(
            number=int(s.SegmentNumber),
            label=str(s.get("SegmentLabel", "")),
            property_type=_code_tuple(s.SegmentedPropertyTypeCodeSequence[0]),
            property_category=_code_tuple(s.SegmentedPropertyCategoryCodeSequence[0]),
            algorithm_type=str(s.get("SegmentAlgorithmType", "")),
        )
        for s in ds.SegmentSequence
    ]
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.PerFrameFunctionalGroupsSequence
    frame_segment, frame_sources, frame_positions = [], [], []
    for item in per_frame:
        ident = item.get("SegmentIdentificationSequence") or (shared.get("SegmentIdentificationSequence") if shared else None)
        frame_segment.append(int(ident[0].ReferencedSegmentNumber) if ident else 0)
        src = None
        for deriv in item.get("DerivationImageSequence", []):
            for s in deriv.get("SourceImageSequence", []):
                src = str(s.ReferencedSOPInstanceUID)
        frame_sources.append(src)
        pos = item.get("PlanePositionSequence")
        frame_positions.append(np.array([float(v) for v in pos[0].ImagePositionPatient]) if pos else None)
    ref_series = ds.get("ReferencedSeriesSequence")
    return SegmentationRead(
        path=str(path),
        segmentation_type=seg_type,
        segments=segments,
        frame_segment=frame_segment,
        frame_source_uids=frame_sources,
        frame_positions=frame_positions,
        referenced_series_uid=str(ref_series[0].SeriesInstanceUID) if ref_series else None,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")) or None,
        frames=frames,
    )


def segmentation_to_volume(seg: SegmentationRead | str | Path, volume: DicomVolume, *, tolerance_mm: float = 0.01) -> np.ndarray:
    """Place SEG frames on the source volume: returns masks ``[column, row, slice, segment]`` (bool or float).

    Frames are matched to slices by their plane position along the volume's slice normal, and the
    in-plane origin must agree within `tolerance_mm` (raises DicomSeriesError otherwise), so a SEG
    that does not fit the volume is refused rather than misplaced.
    """
    seg = seg if isinstance(seg, SegmentationRead) else read_segmentation(seg)
    if volume.affine_lps is None:
        raise DicomSeriesError(seg.path, "the volume has no patient geometry to place the SEG on")
    inv = np.linalg.inv(volume.affine_lps)
    numbers = [s.number for s in seg.segments]
    if seg.segmentation_type == "LABELMAP":
        numbers = sorted(set(numbers))
    dtype = np.float32 if seg.segmentation_type == "FRACTIONAL" else bool
    out = np.zeros(volume.array.shape[:3] + (len(numbers),), dtype=dtype)
    nx, ny, nz = volume.array.shape[:3]
    for f, (pos, number) in enumerate(zip(seg.frame_positions, seg.frame_segment)):
        if pos is None:
            raise DicomSeriesError(seg.path, f"frame {f + 1} has no Plane Position; cannot place it")
        ijk = inv @ np.append(pos, 1.0)
        k = int(round(ijk[2]))
        # In-plane: the frame's first pixel must sit at the volume's (0, 0) of slice k.
        offset_mm = np.linalg.norm(volume.affine_lps[:3, :3] @ (ijk[:3] - np.array([0.0, 0.0, k])))
        if not 0 <= k < nz or offset_mm > tolerance_mm:
            raise DicomSeriesError(seg.path, f"frame {f + 1} does not lie on a slice of the volume (offset {offset_mm:.3f} mm, slice {ijk[2]:.2f})")
        frame = seg.frames[f].T  # -> [column, row]
        if frame.shape != (nx, ny):
            raise DicomSeriesError(seg.path, f"frame size {frame.shape} differs from the volume's {(nx, ny)}")
        if seg.segmentation_type == "LABELMAP":
            for s_idx, num in enumerate(numbers):
                out[:, :, k, s_idx] |= frame == num
        else:
            s_idx = numbers.index(number)
            out[:, :, k, s_idx] = np.maximum(out[:, :, k, s_idx], frame.astype(dtype))
    return out
