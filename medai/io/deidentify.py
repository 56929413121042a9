"""De-identification for export: DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

What is applied:
- every attribute of Table E.1-1 (PS3.15 2024b, 617 tags in medai.io.confidentiality_profile) gets
  its basic-profile action at any depth of sequences: X removed, Z emptied, D a dummy value, U a
  new UID; combinations as resolve_action says. D on a sequence (SR Content Sequence, Verifying
  Observer Sequence, ...) keeps its items' structure, codes (CS) and numbers but gives every text,
  name, date and time inside a dummy value. Patient Name and ID become the pseudonym, Study Date
  19000101;
- private elements and the overlay/curve groups (60xx, 50xx) are removed; every other UID that is
  not DICOM-defined is remapped too, and every other person name emptied;
- UIDs are remapped through one keyed map (2.25.<sha256(key|uid)>, key >= 16 characters): the same
  key gives the same new UIDs, so a study keeps its internal references (SEG/SR -> images, Frame
  of Reference) across calls, and another key gives unrelated ones;
- Patient Identity Removed = YES and the method (code 113100) are recorded.

Options: retain_descriptions keeps Study/Series Description (not basic-profile compliant; only for
descriptions known to hold no identifiers). No other option of the profile (retain dates, device
or institution identity, clean structured content, ...) is offered.

Pixels are not cleaned: an instance with Burned In Annotation YES is refused, and so is one of a
modality or SOP class that often carries burned-in text (US, SC, XA, ...) without Burned In
Annotation NO, unless the caller says its pixels were checked (burned_in_checked).
"""
from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medai.errors import ConfigError, DicomError
from medai.io.confidentiality_profile import BASIC_PROFILE
from medai.io.dicom import iter_files, read_dataset
from medai.utils import atomic_write

log = logging.getLogger(__name__)

# Values written for action D (and where resolve_action picks D of a combination), by VR: valid
# for the VR and obviously not data. UIDs get the keyed map instead; binary values 8 zero bytes
# (a whole number of words for every OB/OW/OF/OD/OL/OV).
DUMMY_TEXT = "ANONYMIZED"
DUMMY_DATE = "19000101"
DUMMY_BY_VR = {"DA": DUMMY_DATE, "TM": "000000", "DT": DUMMY_DATE + "000000", "AS": "000Y", "DS": "0", "IS": "0",
               **dict.fromkeys(("AE", "CS", "SH", "LO", "LT", "ST", "UT", "UC", "UR", "PN"), DUMMY_TEXT),
               **dict.fromkeys(("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"), 0),
               **dict.fromkeys(("OB", "OD", "OF", "OL", "OV", "OW", "UN"), bytes(8))}
DATE_TIME_VRS = {"DA", "TM", "DT"}
# Z elements medai fills with a dummy (Z allows one): a study date keeps date-sorting tools working.
DUMMY_DATE_KEYWORDS = {"StudyDate"}
# Text VRs whose values a dummy (D) sequence replaces; CS (enumerated codes) and numbers stay.
FREE_TEXT_VRS = {"AE", "SH", "LO", "LT", "ST", "UT", "UC", "UR", "PN"}
DESCRIPTION_KEYWORDS = ("StudyDescription", "SeriesDescription")
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
                          "`openssl rand -hex 16`")
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


def resolve_action(action: str, vr: str) -> str:
    """The one action medai takes for a Table E.1-1 code: X, Z, D, U, or U* (keep the sequence, clean its items).

    Without the IOD's module tables medai cannot tell a Type 1 from a Type 3 element, so of a
    combination it takes the choice that keeps an element that was present present whenever the
    standard allows it (the file stays as conformant as it was): X/Z -> Z (empty); X/Z/D -> D (a
    dummy: Device Serial Number is Type 1 in enhanced images, and an emptied Type 3 sequence is
    invalid); Z/D -> a dummy date/time (Content Date/Time are Type 1 in SR) or else empty; X/D -> a
    dummy date/time or else removal; X/Z/U* -> the sequence kept with every UID inside replaced.
    """
    if action in ("X", "Z", "D", "U"):
        return action
    if action == "X/Z":
        return "Z"
    if action == "X/Z/D":
        return "D"
    if action == "Z/D":
        return "D" if vr in DATE_TIME_VRS else "Z"
    if action == "X/D":
        return "D" if vr in DATE_TIME_VRS else "X"
    if action == "X/Z/U*":
        return "U*"
    raise ValueError(f"unknown Table E.1-1 action {action!r}")


def deidentify_dataset(ds, uid_map: UidMap, *, pseudonym: str = "ANON", retain_descriptions: bool = False,
                       source: str | Path = "<dataset>", burned_in_checked: bool = False):
    """De-identify a pydicom Dataset in place (PS3.15 basic profile, every attribute of Table E.1-1) and return it.

    Each listed element gets its table action (see resolve_action) at any depth of sequences. D on a
    sequence (Content Sequence, Verifying Observer Sequence, ...) keeps its items' structure and
    codes (CS) and numbers but replaces every text, name, date and time inside with a dummy value and
    every UID through the map. Beyond the table: private elements and the overlay/curve groups are
    removed, every other UID that is not DICOM-defined or the name of a kind (SOP class, transfer
    syntax, coding scheme) is remapped, and every other person name is emptied.

    retain_descriptions keeps Study/Series Description: this is NOT basic-profile compliant and is only
    for descriptions known to be free of identifiers (it corresponds to the Clean Descriptors option
    without the cleaning).
    """
    from pydicom import Dataset
    from pydicom.dataelem import empty_value_for_VR

    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise DicomError(source, "Burned In Annotation is YES: pixel data may show identifiers; refusing to export")
    risk = None if burned_in_checked else burned_in_risk(ds)
    if risk:
        raise DicomError(source, risk)
    ds.remove_private_tags()
    for elem in list(ds):
        if 0x6000 <= elem.tag.group <= 0x60FF or 0x5000 <= elem.tag.group <= 0x50FF:
            del ds[elem.tag]  # overlays and curves can carry burned-in text
        elif elem.tag.group == 0x0000:
            del ds[elem.tag]  # Command Set elements belong to a network message, not a stored file (not writable)
    keep = set(DESCRIPTION_KEYWORDS) if retain_descriptions else set()

    def remap(elem) -> None:
        if elem.VM > 1:
            elem.value = [uid_map(str(v)) for v in elem.value]
        elif elem.value:
            elem.value = uid_map(str(elem.value))

    def dummy(elem) -> None:
        if elem.VR == "SQ":
            for item in elem.value:
                clean(item, dummy_text=True)
        elif elem.VR == "UI":
            remap(elem)
        elif elem.VR in DUMMY_BY_VR:
            elem.value = DUMMY_BY_VR[elem.VR]

    def clean(dataset, *, dummy_text: bool = False) -> None:
        for elem in list(dataset):
            if elem.keyword in keep:
                continue
            listed = BASIC_PROFILE.get(elem.tag)
            action = resolve_action(listed, elem.VR) if listed else None
            if action == "X":
                del dataset[elem.tag]
            elif action == "Z" and elem.keyword in DUMMY_DATE_KEYWORDS and elem.value:
                elem.value = DUMMY_DATE
            elif action == "Z":
                elem.value = empty_value_for_VR(elem.VR)
            elif action == "D" or (dummy_text and elem.VR in FREE_TEXT_VRS | DATE_TIME_VRS and elem.value):
                dummy(elem)
            elif elem.VR == "SQ":
                for item in elem.value:
                    clean(item, dummy_text=dummy_text)
            elif elem.VR == "UI" and elem.keyword not in KEEP_UID_KEYWORDS and elem.value:
                remap(elem)  # U, U*, and UIDs the table does not list (remapped all the same)
            elif elem.VR == "PN" and elem.value and elem.keyword != "PatientName":
                elem.value = ""  # any other person name left in the dataset

    clean(ds)
    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = ("PS3.15 Basic Application Confidentiality Profile (medai)"
                                 + ("; Study/Series Description retained" if retain_descriptions else ""))
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
    sources: dict[Path, str] = {}  # written file -> the input it came from
    for path in paths:
        try:
            ds = read_dataset(path, every_element=True)  # a malformed private or nested element: refused by name
            deidentify_dataset(ds, uid_map, pseudonym=pseudonym, retain_descriptions=retain_descriptions, source=path,
                               burned_in_checked=burned_in_checked)
            target = out_dir / f"{ds.SOPInstanceUID}.dcm"
            if target in sources:
                # Same SOP Instance UID (another copy, or a conflicting file): writing it would replace the first.
                raise DicomError(path, f"same SOP Instance UID as {sources[target]}, already written; not written twice")
            _write(ds, target, path)
        except DicomError as exc:
            refused.append((str(path), exc.reason))
            log.warning("not exported: %s", exc)
            continue
        sources[target] = str(path)
        written.append(target)
    return written, refused


def _write(ds, target: Path, source: str | Path) -> None:
    """Write the de-identified dataset whole or not at all; a value pydicom cannot encode is a DicomError."""
    try:
        with atomic_write(target) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        # the message may quote a value: name the error type only
        raise DicomError(source, f"cannot be written as DICOM ({type(exc).__name__} from the writer)") from None


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
