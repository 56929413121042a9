"""Findings and measurements as a DICOM SR (TID 1500 Measurement Report, Comprehensive 3D SR), and SR read back.

The observer is a device (TID 1004: medai, the algorithm name and version), the document is left
UNVERIFIED and PARTIAL (no clinician signed it), and the Series Description says it is AI-generated
and not for clinical use. Measurements on a segment reference the DICOM SEG segment (TID 1411);
image-level findings (a classifier's output) go into a TID 1501 group referencing the source images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from medai.errors import DicomError
from medai.io.dicom import DicomVolume, load_series, read_dataset
from medai.results.dicom_seg import AI_DISCLAIMER, MANUFACTURER, _medai_version, read_writer_sources, snomed_code
from medai.utils import optional_import

log = logging.getLogger(__name__)


@dataclass
class MeasurementSpec:
    """One numeric measurement: a SNOMED CT concept (e.g. 'Volume'), value and UCUM unit (e.g. 'ml', 'mm')."""

    name: Any
    value: float
    unit: str
    unit_meaning: str | None = None


@dataclass
class FindingSpec:
    """A coded finding from a model: what was evaluated (concept) and the answer (SNOMED CT code)."""

    name: Any  # e.g. codes.DCM.Finding or an SCT keyword
    value: Any  # e.g. "Neoplasm" or a Code


@dataclass
class MeasurementGroupSpec:
    """One TID 1500 measurement group: a tracked finding with measurements and coded evaluations.

    segment_number: refer to this segment of the SEG given to write_measurement_report (volumetric group);
    None: an image-level group over the source series (classification output).
    """

    tracking_id: str
    finding_type: Any = "Neoplasm"
    measurements: list[MeasurementSpec] = field(default_factory=list)
    findings: list[FindingSpec] = field(default_factory=list)
    segment_number: int | None = None
    finding_site: Any = None


def _code(value: Any, what: str):
    """SNOMED CT keyword or Code; DCM concepts given as Code pass through."""
    from pydicom.sr.codedict import codes

    if isinstance(value, str):
        for scheme in (codes.SCT, codes.DCM):
            try:
                return getattr(scheme, value)
            except AttributeError:
                continue
        raise ValueError(f"{what}: '{value}' is not a SCT or DCM keyword known to pydicom")
    return snomed_code(value, what)


def _unit(hd, unit: str, meaning: str | None):
    return hd.sr.CodedConcept(value=unit, scheme_designator="UCUM", meaning=meaning or unit)


def _referenced_segment(hd, seg_ds, segment_number: int):
    """TID 1411 segment reference with its source images.

    Built here rather than with ReferencedSegment.from_segmentation, which expects the segment number in
    every per-frame item and fails on single-segment SEGs that keep it in the shared functional groups.
    """
    if segment_number not in [int(s.SegmentNumber) for s in seg_ds.SegmentSequence]:
        raise ValueError(f"segment {segment_number} is not in the segmentation")
    shared = seg_ds.get("SharedFunctionalGroupsSequence", [None])[0]
    sources: dict[str, str] = {}
    for item in seg_ds.PerFrameFunctionalGroupsSequence:
        ident = item.get("SegmentIdentificationSequence") or (shared.get("SegmentIdentificationSequence") if shared else None)
        if ident and int(ident[0].ReferencedSegmentNumber) != segment_number:
            continue
        for deriv in item.get("DerivationImageSequence", []):
            for src in deriv.get("SourceImageSequence", []):
                sources[str(src.ReferencedSOPInstanceUID)] = str(src.ReferencedSOPClassUID)
    if not sources:
        raise ValueError(f"segment {segment_number} has no frames with source image references")
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg_ds.SOPClassUID),
        sop_instance_uid=str(seg_ds.SOPInstanceUID),
        segment_number=segment_number,
        source_images=[hd.sr.SourceImageForSegmentation(cls, uid) for uid, cls in sources.items()],
    )


def write_measurement_report(
    source_series: DicomVolume | str | Path | Sequence[str | Path],
    groups: Sequence[MeasurementGroupSpec],
    path: str | Path,
    *,
    segmentation: str | Path | None = None,
    algorithm_name: str = "medai",
    algorithm_version: str | None = None,
    series_number: int = 901,
) -> Path:
    """Write a TID 1500 Measurement Report (Comprehensive 3D SR) for the source series; returns the path."""
    hd = optional_import("highdicom", "DICOM SR writing", extra="dicom")
    from pydicom.sr.codedict import codes

    volume = source_series if isinstance(source_series, DicomVolume) else load_series(source_series)
    paths = list(dict.fromkeys(fr.path for fr in volume.frames))
    sources = read_writer_sources(paths, stop_before_pixels=True)
    seg_ds = read_dataset(segmentation) if segmentation is not None else None
    version = algorithm_version or _medai_version()
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm_name, version=version)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=algorithm_name, manufacturer_name=MANUFACTURER, model_name=f"{algorithm_name} {version}"
        ),
    )
    observation = hd.sr.ObservationContext(observer_device_context=device)
    built = []
    for g in groups:
        measurements = [
            hd.sr.Measurement(
                name=_code(m.name, "measurement"), value=float(m.value), unit=_unit(hd, m.unit, m.unit_meaning),
                algorithm_id=algorithm_id,
            )
            for m in g.measurements
        ]
        evaluations = [
            hd.sr.QualitativeEvaluation(name=_code(f.name, "finding name"), value=_code(f.value, "finding value"))
            for f in g.findings
        ]
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=g.tracking_id)
        sites = [hd.sr.FindingSite(anatomic_location=_code(g.finding_site, "finding site"))] if g.finding_site else None
        common = dict(
            tracking_identifier=tracking,
            finding_type=_code(g.finding_type, "finding type"),
            algorithm_id=algorithm_id,
            finding_sites=sites,
            measurements=measurements or None,
            qualitative_evaluations=evaluations or None,
        )
        if g.segment_number is not None:
            if seg_ds is None:
                raise ValueError(f"group '{g.tracking_id}' refers to segment {g.segment_number} but no segmentation was given")
            ref = _referenced_segment(hd, seg_ds, g.segment_number)
            built.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=ref, **common))
        else:
            images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]
            built.append(hd.sr.MeasurementsAndQualitativeEvaluations(source_images=images, **common))
    report = hd.sr.MeasurementReport(
        observation_context=observation,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=built,
    )
    evidence = sources + ([seg_ds] if seg_ds is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=False,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = f"{algorithm_name} measurements [{AI_DISCLAIMER}]"[:64]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path)
    log.info("wrote SR with %d measurement group(s) to %s", len(built), path)
    return path


@dataclass
class SrItem:
    """One content item of an SR tree, flattened: depth, relationship, concept, value and unit."""

    depth: int
    relationship: str
    value_type: str
    concept: str
    value: Any
    unit: str | None = None


def read_structured_report(path: str | Path) -> list[SrItem]:
    """Walk an SR document's content tree into a flat list of items (any template)."""
    path = Path(path)
    ds = read_dataset(path)
    if not str(ds.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.88."):
        raise DicomError(path, "not a Structured Report instance")
    items: list[SrItem] = []

    def concept_of(item) -> str:
        seq = item.get("ConceptNameCodeSequence")
        return str(seq[0].CodeMeaning) if seq else ""

    def walk(item, depth: int) -> None:
        vt = str(item.get("ValueType", ""))
        value: Any = None
        unit = None
        if vt == "NUM" and item.get("MeasuredValueSequence"):
            mv = item.MeasuredValueSequence[0]
            value = float(mv.NumericValue)
            unit = str(mv.MeasurementUnitsCodeSequence[0].CodeValue)
        elif vt == "CODE" and item.get("ConceptCodeSequence"):
            c = item.ConceptCodeSequence[0]
            value = (str(c.CodeValue), str(c.CodingSchemeDesignator), str(c.CodeMeaning))
        elif vt in ("TEXT", "UIDREF", "DATETIME", "DATE", "TIME", "PNAME"):
            value = str(item.get({"TEXT": "TextValue", "UIDREF": "UID", "DATETIME": "DateTime", "DATE": "Date",
                                  "TIME": "Time", "PNAME": "PersonName"}[vt], ""))
        elif vt in ("IMAGE", "COMPOSITE") and item.get("ReferencedSOPSequence"):
            ref = item.ReferencedSOPSequence[0]
            value = {"sop_instance_uid": str(ref.ReferencedSOPInstanceUID)}
            if "ReferencedSegmentNumber" in ref:
                value["segment_number"] = int(ref.ReferencedSegmentNumber)
        items.append(SrItem(depth, str(item.get("RelationshipType", "")), vt, concept_of(item), value, unit))
        for child in item.get("ContentSequence", []):
            walk(child, depth + 1)

    walk(ds, 0)
    return items


def measurements_from_report(path: str | Path) -> list[dict[str, Any]]:
    """The numeric measurements of an SR: concept, value, UCUM unit."""
    return [
        {"concept": i.concept, "value": i.value, "unit": i.unit}
        for i in read_structured_report(path)
        if i.value_type == "NUM" and i.value is not None
    ]
