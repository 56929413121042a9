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

from medai.errors import DicomError
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


@dataclass
class UidMap:
    """Old UID -> new UID, keyed by a secret so the same study maps the same way in every call."""

    secret: str
    mapping: dict[str, str] = field(default_factory=dict)

    def __call__(self, uid: str) -> str:
        """The new UID for `uid` (2.25 root from a keyed hash: deterministic, not reversible without the key)."""
        if uid.startswith("1.2.840.10008."):
            return uid  # DICOM-defined UIDs (classes, syntaxes, well-known frames) are not identifying
        if uid not in self.mapping:
            digest = hashlib.sha256(f"{self.secret}|{uid}".encode()).digest()[:16]
            self.mapping[uid] = f"2.25.{int.from_bytes(digest, 'big')}"
        return self.mapping[uid]


def deidentify_dataset(ds, uid_map: UidMap, *, pseudonym: str = "ANON", retain_descriptions: bool = False,
                       source: str | Path = "<dataset>"):
    """De-identify a pydicom Dataset in place (basic profile) and return it.

    retain_descriptions keeps Study/Series Description: this is NOT basic-profile compliant and is only
    for descriptions known to be free of identifiers (it corresponds to the Clean Descriptors option
    without the cleaning).
    """
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise DicomError(source, "Burned In Annotation is YES: pixel data may show identifiers; refusing to export")
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
                     retain_descriptions: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """De-identify files into out_dir (named by new SOP Instance UID); returns written paths and (path, reason) refusals."""
    uid_map = UidMap(secret)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, refused = [], []
    for path in paths:
        try:
            ds = read_dataset(path)
            deidentify_dataset(ds, uid_map, pseudonym=pseudonym, retain_descriptions=retain_descriptions, source=path)
        except DicomError as exc:
            refused.append((str(path), exc.reason))
            log.warning("not exported: %s", exc)
            continue
        target = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written, refused


def deidentify_folder(src: str | Path, out_dir: str | Path, *, secret: str, **kwargs) -> tuple[list[Path], list[tuple[str, str]]]:
    """De-identify every file under src into out_dir with one UID map (consistent across the study)."""
    return deidentify_files(iter_files(src), out_dir, secret=secret, **kwargs)
