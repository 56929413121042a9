"""De-identification for export: DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

Covers the attributes of Table E.1-1 that clinical images commonly carry (patient, physicians,
institution, dates/times, descriptions, device identifiers, request attributes), removes private
and overlay/curve groups, and remaps every instance UID through one keyed map, so a study keeps its
internal references (SEG/SR -> images, Frame of Reference) consistent after de-identification.
Burned-in annotation cannot be cleaned here: such instances are refused.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from medai.errors import ConfigError, DicomError
from medai.io.dicom import iter_files, read_dataset

log = logging.getLogger(__name__)

# Action codes of PS3.15 Table E.1-1 (basic profile column), collapsed to what we do:
# X remove, Z replace with empty (type 2 kept present), D replace with a dummy value.
REMOVE = (
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress", "PatientBirthTime",
    "PatientTelephoneNumbers", "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments",
    "MedicalRecordLocator", "PatientAge", "PatientSize", "PatientWeight", "PatientMotherBirthName",
    "MilitaryRank", "BranchOfService", "CountryOfResidence", "RegionOfResidence", "PatientReligiousPreference",
    "MedicalAlerts", "Allergies", "PregnancyStatus", "SmokingStatus", "LastMenstrualDate", "PatientState",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "OperatorsName", "OperatorIdentificationSequence",
    "RequestingPhysician", "RequestingService", "ScheduledPerformingPhysicianName",
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "AdmissionID", "IssuerOfAdmissionID",
    "StationName", "DeviceSerialNumber", "DetectorID", "GantryID", "PlateID", "CassetteID", "ProtocolName",
    "StudyDescription", "SeriesDescription", "PerformedProcedureStepDescription", "RequestedProcedureDescription",
    "ImageComments", "RequestAttributesSequence", "ReferencedPatientSequence", "ReferencedStudySequence",
    "PerformedProcedureStepID", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime", "ScheduledProcedureStepID",
    "RequestedProcedureID", "FillerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequest",
    "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
    "InstanceCreationDate", "InstanceCreationTime", "DerivationDescription", "ContributionDescription",
    "PersonName", "VerifyingObserverName", "VerifyingOrganization", "ContentCreatorName",
    "TextComments", "TextString", "CurrentPatientLocation", "PatientInstitutionResidence",
    "ResponsiblePerson", "ResponsibleOrganization", "InterpretationAuthor", "InterpretationRecorder",
)
EMPTY = ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientBirthDate", "PatientSex", "StudyTime", "ContentTime")
DUMMY_DATES = ("StudyDate", "ContentDate")
DUMMY_DATE = "19000101"
# UIDs that name things (SOP classes, transfer syntaxes, coding schemes) rather than patients' data.
KEEP_UID_KEYWORDS = {"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
                     "ImplementationClassUID", "ReferencedSOPClassUIDInFile", "CodingSchemeUID",
                     "ReferencedTransferSyntaxUIDInFile", "ContextGroupExtensionCreatorUID", "MappingResourceUID"}


# A short or empty key makes the new UIDs a public function of the old ones (2.25.<sha256(key|uid)>),
# so anyone could link them back by hashing candidate UIDs.
MIN_SECRET_CHARS = 16
# Modalities and SOP classes whose pixels often carry burned-in names (ultrasound, secondary capture,
# angiography, endoscopy, photographs, scanned documents): exported only when their Burned In
# Annotation element says NO, or when the user says the pixels were checked.
BURNED_IN_PRONE_MODALITIES = {"US", "IVUS", "SC", "XA", "RF", "ES", "XC", "GM", "SM", "OT", "DOC"}
BURNED_IN_PRONE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.6.",  # ultrasound (single and multi-frame)
                                "1.2.840.10008.5.1.4.1.1.3.1",  # ultrasound multi-frame (retired)
                                "1.2.840.10008.5.1.4.1.1.7",  # secondary capture family
                                "1.2.840.10008.5.1.4.1.1.12.",  # X-ray angiography / fluoroscopy
                                "1.2.840.10008.5.1.4.1.1.77.1.")  # visible light (endoscopy, photographs)


def check_secret(secret: str | None) -> str:
    """Return `secret` if it can key the UID map; else raise ConfigError saying how long it must be."""
    if not secret or len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(f"the de-identification key must be at least {MIN_SECRET_CHARS} characters "
                          f"(got {len(secret or '')}); without a secret key the new UIDs can be linked back to "
                          "the originals. Keep one key per project, e.g. from "
                          "`python -c 'import secrets; print(secrets.token_hex(16))'`")
    return secret


@dataclass
class UidMap:
    """Old UID -> new UID, keyed by a secret so the same study maps the same way in every call."""

    secret: str
    mapping: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_secret(self.secret)

    def __call__(self, uid: str) -> str:
        """The new UID for `uid` (2.25 root from a keyed hash: deterministic, not reversible without the key)."""
        if uid.startswith("1.2.840.10008."):
            return uid  # DICOM-defined UIDs (classes, syntaxes, well-known frames) are not identifying
        if uid not in self.mapping:
            digest = hashlib.sha256(f"{self.secret}|{uid}".encode()).digest()[:16]
            self.mapping[uid] = f"2.25.{int.from_bytes(digest, 'big')}"
        return self.mapping[uid]


def burned_in_risk(ds) -> str | None:
    """Why this instance's pixels may show identifiers with nothing saying they don't, or None."""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "NO":
        return None
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    if modality in BURNED_IN_PRONE_MODALITIES or sop_class.startswith(BURNED_IN_PRONE_SOP_PREFIXES):
        return (f"{modality or 'this'} image with no Burned In Annotation element: such images often show names "
                "in the pixels; check them and pass burned_in_checked (CLI: --burned-in-checked)")
    return None


def deidentify_dataset(ds, uid_map: UidMap, *, pseudonym: str = "ANON", retain_descriptions: bool = False,
                       source: str | Path = "<dataset>", burned_in_checked: bool = False):
    """De-identify a pydicom Dataset in place (basic profile) and return it.

    retain_descriptions keeps Study/Series Description: this is NOT basic-profile compliant and is only
    for descriptions known to be free of identifiers (it corresponds to the Clean Descriptors option
    without the cleaning).
    """
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise DicomError(source, "Burned In Annotation is YES: pixel data may show identifiers; refusing to export")
    risk = None if burned_in_checked else burned_in_risk(ds)
    if risk:
        raise DicomError(source, risk)
    ds.remove_private_tags()
    for elem in list(ds):
        if 0x6000 <= elem.tag.group <= 0x60FF or 0x5000 <= elem.tag.group <= 0x50FF:
            del ds[elem.tag]  # overlays and curves can carry burned-in text
    keep = {"StudyDescription", "SeriesDescription"} if retain_descriptions else set()

    def clean(dataset) -> None:
        for kw in REMOVE:
            if kw in dataset and kw not in keep:
                delattr(dataset, kw)
        for kw in EMPTY:
            if kw in dataset:
                dataset.data_element(kw).value = ""
        for kw in DUMMY_DATES:
            if kw in dataset and dataset.get(kw):
                setattr(dataset, kw, DUMMY_DATE)
        for elem in list(dataset):
            if elem.VR == "SQ":
                for item in elem.value:
                    clean(item)
            elif elem.VR == "UI" and elem.keyword not in KEEP_UID_KEYWORDS and elem.value:
                if elem.VM > 1:
                    elem.value = [uid_map(str(v)) for v in elem.value]
                else:
                    elem.value = uid_map(str(elem.value))
            elif elem.VR in ("PN",) and elem.value and elem.keyword not in ("PatientName",):
                elem.value = ""  # any other person name left in the dataset

    clean(ds)
    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "PS3.15 Basic Application Confidentiality Profile (medai)"
    from pydicom import Dataset

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113100", "DCM", "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]
    return ds


def deidentify_files(paths: Iterable[str | Path], out_dir: str | Path, *, secret: str, pseudonym: str = "ANON",
                     retain_descriptions: bool = False,
                     burned_in_checked: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """De-identify files into out_dir (named by new SOP Instance UID); returns written paths and (path, reason) refusals."""
    uid_map = UidMap(secret)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, refused = [], []
    for path in paths:
        try:
            ds = read_dataset(path)
            deidentify_dataset(ds, uid_map, pseudonym=pseudonym, retain_descriptions=retain_descriptions, source=path,
                               burned_in_checked=burned_in_checked)
        except DicomError as exc:
            refused.append((str(path), exc.reason))
            log.warning("not exported: %s", exc)
            continue
        target = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written, refused


def deidentify_folder(src: str | Path, out_dir: str | Path, *, secret: str, **kwargs) -> tuple[list[Path], list[tuple[str, str]]]:
    """De-identify every file under src into out_dir with one UID map (consistent across the study).

    Refuses (ConfigError) a short key, a missing source, and an output folder that is the source or
    inside it (the copies would land beside the originals, and a rerun would read them as input).
    """
    check_secret(secret)
    src, out_dir = Path(src), Path(out_dir)
    if not src.exists():
        raise ConfigError(f"{src}: no such file or folder to de-identify")
    source_root = src.resolve() if src.is_dir() else src.resolve().parent
    if out_dir.resolve() == source_root or source_root in out_dir.resolve().parents:
        raise ConfigError(f"{out_dir}: the output folder is the source folder or inside it; choose another")
    return deidentify_files(iter_files(src), out_dir, secret=secret, **kwargs)
