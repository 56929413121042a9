"""EHR ingestion into one patient-timeline model: FHIR R4 (Bundles, bulk NDJSON), MIMIC-IV tables, MEDS.

The canonical artifact is three Parquet tables written by `EHRTables.write(DIR)`:

- `patients.parquet`: patient_id, identifier, birth_time, sex, death_time, dates_shifted, source
- `visits.parquet`:   patient_id, visit_id, identifier, start, end, visit_class, parent_visit_id
- `events.parquet`:   patient_id, visit_id, time, kind, system, code, numeric_value, text_value, unit, source_id

plus `refused.parquet`/`refused.csv` (source, location, resource_type, resource_id, reason) naming
every resource or row that did not enter the timeline and why. All times are UTC
(`Datetime("us", "UTC")`); MIMIC's local wall-clock times are read as America/New_York, which is
what the MIMIC FHIR export states in its offsets. MIMIC dates are shifted into 2100-2200 by
design, so the future-date check is off for sources marked `dates_shifted`.

FHIR input is validated per resource with `fhir.resources` (R4B models: the closest the installed
8.x release offers to R4 4.0.1; R4B changed no element used here) plus the FHIR JSON rules that
pydantic does not see (id length, empty arrays, absolute Bundle fullUrls, attachment size). A
bad resource is refused and reported with its id and the validator's message; the rest of its
Bundle or NDJSON file continues. NDJSON is read line by line and rows are flushed to Parquet
parts every `chunk_rows`, so a bulk export never has to fit in memory.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import polars as pl

from medai.errors import InputFileError, MedaiError

log = logging.getLogger(__name__)

UTC = "UTC"
TIME = pl.Datetime("us", UTC)
MIMIC_TIMEZONE = "America/New_York"

PATIENT_SCHEMA: dict[str, pl.DataType] = {
    "patient_id": pl.Utf8,
    "identifier": pl.Utf8,
    "birth_time": TIME,
    "sex": pl.Utf8,
    "death_time": TIME,
    "dates_shifted": pl.Boolean,
    "source": pl.Utf8,
}
VISIT_SCHEMA: dict[str, pl.DataType] = {
    "patient_id": pl.Utf8,
    "visit_id": pl.Utf8,
    "identifier": pl.Utf8,
    "start": TIME,
    "end": TIME,
    "visit_class": pl.Utf8,
    "parent_visit_id": pl.Utf8,
}
EVENT_SCHEMA: dict[str, pl.DataType] = {
    "patient_id": pl.Utf8,
    "visit_id": pl.Utf8,
    "time": TIME,
    "kind": pl.Utf8,
    "system": pl.Utf8,
    "code": pl.Utf8,
    "numeric_value": pl.Float64,
    "text_value": pl.Utf8,
    "unit": pl.Utf8,
    "source_id": pl.Utf8,
}
REFUSAL_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.Utf8,
    "location": pl.Utf8,
    "resource_type": pl.Utf8,
    "resource_id": pl.Utf8,
    "reason": pl.Utf8,
}

# Event kinds: what a row means clinically; the tokenizer prefixes codes with their system.
EVENT_KINDS = ("condition", "diagnosis", "observation", "lab", "medication", "procedure", "immunization")

# FHIR code-system URIs -> short names used in tokens and MEDS codes (unknown URIs are kept whole).
CODE_SYSTEMS: dict[str, str] = {
    "http://snomed.info/sct": "SNOMED",
    "http://loinc.org": "LOINC",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD9CM",
    "http://hl7.org/fhir/sid/ndc": "NDC",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://fhir.mimic.mit.edu/CodeSystem/diagnosis-icd10": "ICD10CM",
    "http://fhir.mimic.mit.edu/CodeSystem/diagnosis-icd9": "ICD9CM",
    "http://fhir.mimic.mit.edu/CodeSystem/procedure-icd10": "ICD10PCS",
    "http://fhir.mimic.mit.edu/CodeSystem/procedure-icd9": "ICD9PROC",
    "http://fhir.mimic.mit.edu/CodeSystem/d-labitems": "MIMIC_LAB",
    "http://fhir.mimic.mit.edu/CodeSystem/medication-name": "MIMIC_DRUG",
}

# The resource types that become timeline rows; other types are validated and counted only.
MAPPED_TYPES = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure", "Immunization")

_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


class EHRError(MedaiError):
    """Base class of EHR input errors."""


class FhirParseError(EHRError, ValueError):
    """A FHIR file is not readable JSON/NDJSON; names the file and the position."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: not valid FHIR JSON: {reason}")


class FhirValidationError(EHRError, ValueError):
    """A FHIR resource fails validation; names the resource type, its id and the problems."""

    def __init__(self, resource_type: str, resource_id: str | None, messages: list[str], source: str = ""):
        self.resource_type, self.resource_id, self.messages, self.source = resource_type, resource_id, messages, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{resource_type}/{resource_id or '<no id>'}: " + "; ".join(messages))


class EHRTableError(EHRError, InputFileError, ValueError):
    """A MIMIC-style table or MEDS file is missing columns or unreadable; names the file."""


# --------------------------------------------------------------------------------------------
# The timeline model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One timed clinical fact: what (system, code), when (UTC), and its value with unit."""

    time: datetime
    kind: str
    system: str
    code: str
    numeric_value: float | None = None
    text_value: str | None = None
    unit: str | None = None
    visit_id: str | None = None
    source_id: str | None = None


@dataclass(frozen=True)
class Visit:
    """An encounter/admission with start and end (UTC); ICU stays point to their admission."""

    visit_id: str
    start: datetime | None
    end: datetime | None
    visit_class: str | None = None
    parent_visit_id: str | None = None
    identifier: str | None = None


@dataclass
class PatientTimeline:
    """One patient's visits and events, sorted by time."""

    patient_id: str
    birth_time: datetime | None = None
    sex: str | None = None
    death_time: datetime | None = None
    identifier: str | None = None
    visits: list[Visit] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def age_years(self, when: datetime) -> float | None:
        """Age in years (365.25 days) at `when`, or None when the birth date is unknown."""
        if self.birth_time is None:
            return None
        return (when - self.birth_time).total_seconds() / (365.25 * 86400)


def _empty(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


@dataclass
class EHRTables:
    """The patient-timeline model as tables (polars); what every loader returns."""

    patients: pl.DataFrame = field(default_factory=lambda: _empty(PATIENT_SCHEMA))
    visits: pl.DataFrame = field(default_factory=lambda: _empty(VISIT_SCHEMA))
    events: pl.DataFrame = field(default_factory=lambda: _empty(EVENT_SCHEMA))
    refused: pl.DataFrame = field(default_factory=lambda: _empty(REFUSAL_SCHEMA))

    def write(self, out_dir: str | Path) -> Path:
        """Write the four tables as Parquet (plus refused.csv for people) into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.patients.write_parquet(out / "patients.parquet")
        self.visits.write_parquet(out / "visits.parquet")
        self.events.write_parquet(out / "events.parquet")
        self.refused.write_parquet(out / "refused.parquet")
        self.refused.write_csv(out / "refused.csv")
        return out

    @classmethod
    def read(cls, in_dir: str | Path) -> "EHRTables":
        """Read tables written by `write`; raise EHRTableError naming a missing file."""
        base = Path(in_dir)
        tables = {}
        for name, schema in (("patients", PATIENT_SCHEMA), ("visits", VISIT_SCHEMA), ("events", EVENT_SCHEMA)):
            path = base / f"{name}.parquet"
            if not path.is_file():
                raise EHRTableError(path, "missing: not a timeline folder written by `medai ehr ingest`")
            tables[name] = _conform(pl.read_parquet(path), schema, path)
        refused_path = base / "refused.parquet"
        tables["refused"] = pl.read_parquet(refused_path) if refused_path.is_file() else _empty(REFUSAL_SCHEMA)
        return cls(**tables)

    def concat(self, other: "EHRTables") -> "EHRTables":
        """Return both sources' rows together (patient ids must not collide)."""
        return EHRTables(
            *(pl.concat([a, b], how="vertical") for a, b in zip(self._frames(), other._frames()))
        )

    def _frames(self) -> tuple[pl.DataFrame, ...]:
        return self.patients, self.visits, self.events, self.refused

    def timelines(self, patient_ids: Iterable[str] | None = None) -> Iterator[PatientTimeline]:
        """Yield one PatientTimeline per patient (events and visits sorted by time)."""
        wanted = None if patient_ids is None else set(patient_ids)
        events = self.events.sort(["patient_id", "time", "kind", "system", "code"])
        visits = self.visits.sort(["patient_id", "start"])
        ev_groups = {k[0]: g for k, g in events.group_by(["patient_id"], maintain_order=True)}
        vi_groups = {k[0]: g for k, g in visits.group_by(["patient_id"], maintain_order=True)}
        for row in self.patients.sort("patient_id").iter_rows(named=True):
            pid = row["patient_id"]
            if wanted is not None and pid not in wanted:
                continue
            ev = ev_groups.get(pid)
            vi = vi_groups.get(pid)
            yield PatientTimeline(
                patient_id=pid,
                birth_time=row["birth_time"],
                sex=row["sex"],
                death_time=row["death_time"],
                identifier=row["identifier"],
                visits=[
                    Visit(r["visit_id"], r["start"], r["end"], r["visit_class"], r["parent_visit_id"], r["identifier"])
                    for r in (vi.iter_rows(named=True) if vi is not None else ())
                ],
                events=[
                    Event(
                        r["time"], r["kind"], r["system"], r["code"], r["numeric_value"], r["text_value"],
                        r["unit"], r["visit_id"], r["source_id"],
                    )
                    for r in (ev.iter_rows(named=True) if ev is not None else ())
                ],
            )

    def summary(self) -> dict[str, Any]:
        """Counts for people: patients, visits, events per kind and per system, date range, refusals."""
        ev = self.events
        per_kind = dict(ev.group_by("kind").len().sort("kind").iter_rows()) if ev.height else {}
        per_system = dict(ev.group_by("system").len().sort("len", descending=True).iter_rows()) if ev.height else {}
        reasons = (
            dict(
                self.refused.with_columns(pl.col("reason").str.split(":").list.first().alias("why"))
                .group_by("why").len().sort("len", descending=True).iter_rows()
            )
            if self.refused.height
            else {}
        )
        return {
            "patients": self.patients.height,
            "visits": self.visits.height,
            "events": ev.height,
            "events_per_kind": per_kind,
            "events_per_system": per_system,
            "first_time": ev["time"].min() if ev.height else None,
            "last_time": ev["time"].max() if ev.height else None,
            "refused": self.refused.height,
            "refused_by_reason": reasons,
        }


def _conform(frame: pl.DataFrame, schema: dict[str, pl.DataType], source: str | Path) -> pl.DataFrame:
    """Select and cast `frame` to `schema`; raise EHRTableError naming missing columns."""
    missing = [c for c in schema if c not in frame.columns]
    if missing:
        raise EHRTableError(source, f"missing columns {missing}")
    return frame.select([pl.col(c).cast(t) for c, t in schema.items()])


# --------------------------------------------------------------------------------------------
# FHIR: reading, validation, mapping
# --------------------------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def parse_fhir_time(value: str | None) -> datetime | None:
    """Parse a FHIR date/dateTime/instant into UTC; a date without time is midnight UTC."""
    if not value:
        return None
    text = value.strip()
    try:
        if len(text) == 4:  # YYYY
            return datetime(int(text), 1, 1, tzinfo=timezone.utc)
        if len(text) == 7:  # YYYY-MM
            return datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=timezone.utc)
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:  # FHIR requires an offset when time is given; assume UTC when absent
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _reference_id(ref: dict | None) -> str | None:
    """'Patient/123' -> '123'; 'urn:uuid:abc' -> 'abc' (Synthea transaction bundles)."""
    if not ref or not isinstance(ref, dict):
        return None
    text = ref.get("reference")
    if not text:
        return None
    if text.startswith("urn:uuid:"):
        return text[len("urn:uuid:"):]
    return text.rstrip("/").split("/")[-1]


def _supplementary_problems(node: Any, path: str, problems: list[str], top: bool = True) -> None:
    """FHIR JSON rules pydantic does not check: id syntax/length, empty arrays, attachment size."""
    if isinstance(node, dict):
        if "resourceType" in node and "id" in node and isinstance(node["id"], str) and not _ID_RE.match(node["id"]):
            reason = f"Too long ({len(node['id'])} chars)" if len(node["id"]) > 64 else f"Invalid Characters ('{node['id']}')"
            problems.append(f"{path}.id: Invalid Resource id: {reason}")
        if "data" in node and "size" in node and isinstance(node.get("data"), str) and isinstance(node.get("size"), int):
            try:
                actual = len(base64.b64decode(node["data"], validate=True))
            except ValueError:
                actual = None
            if actual is not None and actual != node["size"]:
                problems.append(f"{path}: Stated Attachment Size {node['size']} does not match actual attachment size {actual}")
        for key, value in node.items():
            if key == "div":  # narrative XHTML is text, not structure
                continue
            _supplementary_problems(value, f"{path}.{key}", problems, top=False)
    elif isinstance(node, list):
        if not node:
            problems.append(f"{path}: Array cannot be empty - the property should not be present if it has no values")
        for i, value in enumerate(node):
            _supplementary_problems(value, f"{path}[{i}]", problems, top=False)


def _pydantic_messages(exc: Exception, resource_type: str) -> list[str]:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        out = []
        for err in errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
            out.append(f"{resource_type}{'.' + loc if loc else ''}: {err.get('msg', '')}")
        return out
    return [f"{resource_type}: {exc}"]


def validate_fhir_resource(data: Any, source: str = "") -> Any:
    """Validate one FHIR resource dict with fhir.resources (R4B) plus JSON rules; return the model.

    Raises FhirValidationError naming the resource type, id and every problem found.
    """
    from fhir.resources.R4B import get_fhir_model_class

    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise FhirValidationError("<unknown>", None, ["not a FHIR resource (no resourceType)"], source)
    rtype, rid = data["resourceType"], data.get("id")
    rid = rid if isinstance(rid, str) else None
    try:
        model_class = get_fhir_model_class(rtype)
    except (KeyError, ValueError) as exc:
        raise FhirValidationError(rtype, rid, [f"unknown resourceType '{rtype}' in FHIR R4"], source) from exc
    problems: list[str] = []
    _supplementary_problems(data, rtype, problems)
    if rtype == "Bundle":
        # Entries are validated one by one by the reader so one bad entry doesn't sink the bundle.
        shell = {k: v for k, v in data.items() if k != "entry"}
        _bundle_problems(data, problems)
        target = shell
    else:
        target = data
    model = None
    try:
        model = model_class.model_validate(target)
    except Exception as exc:  # pydantic.ValidationError and fhir_core's own value errors
        problems = _pydantic_messages(exc, rtype) + problems
    if problems:
        raise FhirValidationError(rtype, rid, problems, source)
    return model


def _bundle_problems(bundle: dict, problems: list[str]) -> None:
    """Bundle rules the reference validator applies: absolute fullUrls, unique ids per type."""
    seen: set[str] = set()
    for i, entry in enumerate(bundle.get("entry") or []):
        if not isinstance(entry, dict):
            problems.append(f"Bundle.entry[{i}]: not an object")
            continue
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and not re.match(r"^(urn:uuid:|urn:oid:|[a-zA-Z][a-zA-Z0-9+.-]*://)", full_url):
            problems.append(f"Bundle.entry[{i}]: The fullUrl must be an absolute URL (not '{full_url}')")
        res = entry.get("resource") or {}
        key = f"{res.get('resourceType')}/{res.get('id')}"
        if res.get("id") and key in seen:
            problems.append(f"Bundle.entry[{i}]: duplicate resource {key}")
        seen.add(key)


@dataclass
class _Located:
    """A resource (or the reason it could not be read) with where it came from."""

    source: str
    location: str
    resource: dict | None
    error: str | None = None


def iter_fhir_file(path: str | Path) -> Iterator[_Located]:
    """Yield every resource in a FHIR JSON/NDJSON file (gz allowed); Bundles yield their entries.

    An unreadable line or file yields one item with `error` set instead of raising, so batch
    ingestion records it and continues.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")):
        yield from _iter_ndjson(path)
        return
    try:
        with _open_text(path) as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
        yield _Located(str(path), "file", None, f"malformed JSON: {exc}")
        return
    yield from _expand(str(path), "file", data)


def _iter_ndjson(path: Path) -> Iterator[_Located]:
    """Yield each line's resources; a bad line (JSON, UTF-8) or a cut-off file is one refusal, not an abort."""
    lineno = 0
    try:
        # bytes, decoded per line: one non-UTF-8 byte costs its line, not the rest of the file
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as handle:
            for lineno, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    data = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    yield _Located(str(path), f"line {lineno}", None, f"not UTF-8: {exc.reason} at byte {exc.start}")
                    continue
                except json.JSONDecodeError as exc:
                    yield _Located(str(path), f"line {lineno}", None, f"malformed JSON: {exc}")
                    continue
                yield from _expand(str(path), f"line {lineno}", data)
    except (EOFError, OSError, zlib.error) as exc:
        # a truncated gzip or an unreadable file: what came before stays, the rest is named as lost
        yield _Located(str(path), f"after line {lineno}", None, f"unreadable: {type(exc).__name__}: {exc}")


def _expand(source: str, location: str, data: Any) -> Iterator[_Located]:
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        yield _Located(source, location, data)  # the Bundle shell itself, validated without its entries
        for i, entry in enumerate(data.get("entry") or []):
            res = entry.get("resource") if isinstance(entry, dict) else None
            yield _Located(source, f"{location} entry[{i}]", res, None if isinstance(res, dict) else "entry has no resource")
    else:
        yield _Located(source, location, data if isinstance(data, dict) else None,
                       None if isinstance(data, dict) else "top level is not a JSON object")


def fhir_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders into the FHIR files they hold (.json, .ndjson, optionally .gz), sorted."""
    out: list[Path] = []
    patterns = ("*.json", "*.json.gz", "*.ndjson", "*.ndjson.gz", "*.jsonl", "*.jsonl.gz")
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted({f for pat in patterns for f in p.rglob(pat)})
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            from medai.errors import DatasetNotFoundError

            raise DatasetNotFoundError(p, "no such FHIR file or folder")
    return out


def _first_coding(concept: dict | None) -> tuple[str, str, str | None] | None:
    """(system short name, code, display) of the first coding that has a code."""
    if not concept:
        return None
    for coding in concept.get("coding") or []:
        if coding.get("code"):
            system = coding.get("system") or "UNKNOWN_SYSTEM"
            return CODE_SYSTEMS.get(system, system), str(coding["code"]), coding.get("display")
    return None


def _period_start(res: dict, *keys: str) -> datetime | None:
    for key in keys:
        value = res.get(key)
        if isinstance(value, str):
            t = parse_fhir_time(value)
            if t is not None:
                return t
        elif isinstance(value, dict) and value.get("start"):
            return parse_fhir_time(value["start"])
    return None


class _RowSink:
    """Accumulates rows per table and flushes them to Parquet parts so memory stays bounded."""

    def __init__(self, parts_dir: Path, chunk_rows: int):
        self.parts_dir, self.chunk_rows = parts_dir, chunk_rows
        self.rows: dict[str, list[dict]] = {"patients": [], "visits": [], "events": [], "refused": []}
        self.counts = dict.fromkeys(self.rows, 0)
        self.schemas = {"patients": PATIENT_SCHEMA, "visits": VISIT_SCHEMA, "events": EVENT_SCHEMA, "refused": REFUSAL_SCHEMA}

    def add(self, table: str, row: dict) -> None:
        self.rows[table].append(row)
        if len(self.rows[table]) >= self.chunk_rows:
            self.flush(table)

    def flush(self, table: str) -> None:
        rows = self.rows[table]
        if not rows:
            return
        frame = pl.DataFrame(rows, schema=self.schemas[table])
        frame.write_parquet(self.parts_dir / f"{table}-{self.counts[table]:06d}.parquet")
        self.counts[table] += 1
        self.rows[table] = []

    def collect(self, table: str) -> pl.LazyFrame:
        self.flush(table)
        parts = sorted(self.parts_dir.glob(f"{table}-*.parquet"))
        if not parts:
            return _empty(self.schemas[table]).lazy()
        return pl.scan_parquet(parts)


def _refusal(source: str, location: str, rtype: str | None, rid: str | None, reason: str) -> dict:
    return {"source": source, "location": location, "resource_type": rtype, "resource_id": rid, "reason": reason}


def _map_resource(res: dict, source: str, sink: _RowSink, stats: dict[str, int]) -> None:
    """Turn one validated resource into timeline rows (or a refusal when it lacks what we need)."""
    rtype, rid = res["resourceType"], res.get("id")
    loc = stats.get("_location", "")
    if rtype == "Patient":
        if not rid:
            # without an id no other resource can reference it, and two such records can't be told apart
            sink.add("refused", _refusal(source, loc, rtype, None, "no id: a Patient must carry an id"))
            return
        identifier = next((i.get("value") for i in res.get("identifier") or [] if i.get("value")), None)
        profiles = " ".join((res.get("meta") or {}).get("profile") or [])
        sink.add("patients", {
            "patient_id": rid,
            "identifier": identifier,
            "birth_time": parse_fhir_time(res.get("birthDate")),
            "sex": res.get("gender"),
            "death_time": parse_fhir_time(res.get("deceasedDateTime")),
            "dates_shifted": "fhir.mimic.mit.edu" in profiles,  # MIMIC shifts dates into 2100-2200
            "source": source,
        })
        return
    subject = _reference_id(res.get("subject") or res.get("patient"))
    if subject is None:
        sink.add("refused", _refusal(source, loc, rtype, rid, "no subject: resource names no patient"))
        return
    if rtype == "Encounter":
        period = res.get("period") or {}
        klass = res.get("class") or {}
        sink.add("visits", {
            "patient_id": subject,
            "visit_id": rid,
            "identifier": next((i.get("value") for i in res.get("identifier") or [] if i.get("value")), None),
            "start": parse_fhir_time(period.get("start")),
            "end": parse_fhir_time(period.get("end")),
            "visit_class": klass.get("code") if isinstance(klass, dict) else None,
            "parent_visit_id": _reference_id(res.get("partOf")),
        })
        return
    visit = _reference_id(res.get("encounter") or res.get("context"))
    kind = {
        "Condition": "condition", "MedicationRequest": "medication", "Procedure": "procedure",
        "Immunization": "immunization", "Observation": "observation",
    }[rtype]
    if rtype == "Condition":
        concept, time = res.get("code"), _period_start(res, "onsetDateTime", "onsetPeriod", "recordedDate")
    elif rtype == "MedicationRequest":
        concept, time = res.get("medicationCodeableConcept"), _period_start(res, "authoredOn")
    elif rtype == "Procedure":
        concept, time = res.get("code"), _period_start(res, "performedDateTime", "performedPeriod")
    elif rtype == "Immunization":
        concept, time = res.get("vaccineCode"), _period_start(res, "occurrenceDateTime")
    else:
        concept, time = res.get("code"), _period_start(res, "effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued")
        categories = {c.get("code") for cat in res.get("category") or [] for c in cat.get("coding") or []}
        if "laboratory" in categories:
            kind = "lab"
    coding = _first_coding(concept)
    if coding is None:
        sink.add("refused", _refusal(source, loc, rtype, rid, "unknown code: no coding with a code"))
        return
    base = {"patient_id": subject, "visit_id": visit, "time": time, "kind": kind, "source_id": rid}
    if rtype != "Observation":
        sink.add("events", {**base, "system": coding[0], "code": coding[1],
                            "numeric_value": None, "text_value": None, "unit": None})
        stats["events"] = stats.get("events", 0) + 1
        return
    # Observations: one event for the value, and one per component (e.g. blood pressure).
    parts = [(coding, res)] if any(k.startswith("value") for k in res) or not res.get("component") else []
    for comp in res.get("component") or []:
        c = _first_coding(comp.get("code"))
        if c is not None:
            parts.append((c, comp))
    for c, holder in parts:
        num, text, unit = _observation_value(holder)
        sink.add("events", {**base, "system": c[0], "code": c[1], "numeric_value": num, "text_value": text, "unit": unit})
        stats["events"] = stats.get("events", 0) + 1


def _observation_value(holder: dict) -> tuple[float | None, str | None, str | None]:
    q = holder.get("valueQuantity")
    if isinstance(q, dict) and q.get("value") is not None:
        return float(q["value"]), None, q.get("unit") or q.get("code")
    cc = _first_coding(holder.get("valueCodeableConcept"))
    if cc is not None:
        return None, f"{cc[0]}/{cc[1]}", None
    for key in ("valueString", "valueBoolean", "valueInteger"):
        if key in holder:
            value = holder[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value), None, None
            return None, str(value), None
    return None, None, None


def ingest_fhir(
    paths: Iterable[str | Path],
    *,
    not_after: datetime | None = None,
    chunk_rows: int = 50_000,
    work_dir: str | Path | None = None,
    progress: bool = False,
) -> EHRTables:
    """Read FHIR Bundles and bulk NDJSON (files or folders) into EHRTables, refusing bad resources.

    `not_after` (default: now, UTC) refuses events dated after it, except for patients whose
    source shifts dates on purpose (MIMIC). Rows stream to Parquet parts in `work_dir` (a temp
    folder by default) every `chunk_rows`, so input size is bounded by disk, not memory.
    """
    files = fhir_files(paths)
    own_tmp = work_dir is None
    parts_dir = Path(tempfile.mkdtemp(prefix="medai-ehr-")) if own_tmp else Path(work_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    sink = _RowSink(parts_dir, chunk_rows)
    stats: dict[str, int] = {}
    seen_ids: set[tuple[str, str]] = set()
    iterator: Iterable[Path] = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="FHIR files", unit="file")
    try:
        for path in iterator:
            for item in iter_fhir_file(path):
                stats["_location"] = item.location
                if item.resource is None:
                    sink.add("refused", _refusal(item.source, item.location, None, None, item.error or "unreadable"))
                    continue
                res = item.resource
                rtype, rid = res.get("resourceType"), res.get("id")
                try:
                    validate_fhir_resource(res)
                except FhirValidationError as exc:
                    sink.add("refused", _refusal(item.source, item.location, exc.resource_type, exc.resource_id,
                                                 "invalid FHIR: " + "; ".join(exc.messages)))
                    continue
                if rtype == "Bundle" or rtype not in MAPPED_TYPES:
                    stats[f"skipped:{rtype}"] = stats.get(f"skipped:{rtype}", 0) + 1
                    continue
                if rid is not None:
                    key = (rtype, rid)
                    if key in seen_ids:
                        sink.add("refused", _refusal(item.source, item.location, rtype, rid,
                                                     "duplicate resource: same type and id seen before"))
                        continue
                    seen_ids.add(key)
                _map_resource(res, item.source, sink, stats)
        tables = EHRTables(
            patients=sink.collect("patients").collect(),
            visits=sink.collect("visits").collect(),
            events=sink.collect("events").collect(),
            refused=sink.collect("refused").collect(),
        )
    finally:
        if own_tmp:
            shutil.rmtree(parts_dir, ignore_errors=True)
    skipped = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("skipped:")}
    if skipped:
        log.info("validated but not mapped to the timeline: %s", skipped)
    return finalize(tables, not_after=not_after)


def finalize(tables: EHRTables, *, not_after: datetime | None = None) -> EHRTables:
    """Apply the timeline rules shared by every loader; refused rows go to `tables.refused`.

    - an event without a time takes its visit's end (diagnoses are coded at discharge), else it
      is refused as 'missing timestamp';
    - events of unknown patients, after `not_after` (unless the patient's dates are shifted),
      or more than a day before birth are refused;
    - exact duplicate events (patient, time, system, code, value, unit) are kept once.
    """
    not_after = not_after or datetime.now(timezone.utc)
    events = tables.events
    visits = tables.visits
    patients = tables.patients.unique("patient_id", keep="first", maintain_order=True)
    refused = [tables.refused]

    visit_end = visits.select(pl.col("visit_id"), pl.col("end").alias("_visit_end"), pl.col("patient_id").alias("_vp"))
    events = events.join(visit_end, on="visit_id", how="left")
    events = events.with_columns(
        pl.when(pl.col("time").is_null() & (pl.col("_vp") == pl.col("patient_id")))
        .then(pl.col("_visit_end")).otherwise(pl.col("time")).alias("time")
    ).drop("_visit_end", "_vp")

    def refuse(mask: pl.Expr, reason: pl.Expr | str) -> None:
        nonlocal events
        bad = events.filter(mask)
        if bad.height:
            reason_expr = reason if isinstance(reason, pl.Expr) else pl.lit(reason)
            refused.append(bad.select(
                pl.lit("timeline rules").alias("source"),
                pl.concat_str([pl.lit("patient "), pl.col("patient_id")]).alias("location"),
                pl.col("kind").alias("resource_type"),
                pl.col("source_id").alias("resource_id"),
                reason_expr.alias("reason"),
            ))
            events = events.filter(~mask)

    refuse(pl.col("time").is_null(), "missing timestamp: no time and no visit end to take it from")
    if patients.height:
        refuse(~pl.col("patient_id").is_in(patients["patient_id"].implode()), "unknown patient: subject not among the Patients read")
    info = patients.select("patient_id", "birth_time", "dates_shifted")
    events = events.join(info, on="patient_id", how="left")
    refuse(
        (pl.col("time") > pl.lit(not_after).cast(TIME)) & ~pl.col("dates_shifted").fill_null(False),
        pl.concat_str([pl.lit("future date: "), pl.col("time").dt.to_string("%Y-%m-%dT%H:%M:%SZ"),
                       pl.lit(f" is after {not_after:%Y-%m-%d}")]),
    )
    refuse(
        pl.col("birth_time").is_not_null() & (pl.col("time") < pl.col("birth_time") - pl.duration(days=1)),
        pl.concat_str([pl.lit("before birth: "), pl.col("time").dt.to_string("%Y-%m-%d")]),
    )
    events = events.drop("birth_time", "dates_shifted")
    key = ["patient_id", "time", "system", "code", "numeric_value", "text_value", "unit"]
    dup_mask = events.select(pl.struct(key).is_duplicated() & ~pl.struct(key).is_first_distinct()).to_series()
    if dup_mask.any():
        dups = events.filter(dup_mask)
        refused.append(dups.select(
            pl.lit("timeline rules").alias("source"),
            pl.concat_str([pl.lit("patient "), pl.col("patient_id")]).alias("location"),
            pl.col("kind").alias("resource_type"),
            pl.col("source_id").alias("resource_id"),
            pl.lit("duplicate event: same patient, time, code and value as an earlier event").alias("reason"),
        ))
        events = events.filter(~dup_mask)
    events = events.select(list(EVENT_SCHEMA)).sort(["patient_id", "time", "kind", "system", "code"])
    refused_all = pl.concat([r.select([pl.col(c).cast(t) for c, t in REFUSAL_SCHEMA.items()]) for r in refused])
    return EHRTables(
        patients=patients.select(list(PATIENT_SCHEMA)),
        visits=visits.unique(["patient_id", "visit_id"], keep="first", maintain_order=True).sort(["patient_id", "start"]),
        events=events,
        refused=refused_all,
    )


# --------------------------------------------------------------------------------------------
# MIMIC-IV tables (polars)
# --------------------------------------------------------------------------------------------

MIMIC_REQUIRED: dict[str, tuple[str, ...]] = {
    "patients": ("subject_id", "gender", "anchor_age", "anchor_year", "dod"),
    "admissions": ("subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type"),
    "diagnoses_icd": ("subject_id", "hadm_id", "icd_code", "icd_version"),
    "procedures_icd": ("subject_id", "hadm_id", "chartdate", "icd_code", "icd_version"),
    "labevents": ("subject_id", "hadm_id", "itemid", "charttime", "value", "valuenum", "valueuom"),
    "prescriptions": ("subject_id", "hadm_id", "starttime", "drug", "ndc"),
}
MIMIC_OPTIONAL = ("icustays",)


def _find_table(root: Path, name: str) -> Path | None:
    for sub in ("hosp", "icu", ""):
        for ext in (".csv.gz", ".csv", ".parquet"):
            path = root / sub / f"{name}{ext}" if sub else root / f"{name}{ext}"
            if path.is_file():
                return path
    return None


def is_mimic_folder(path: str | Path) -> bool:
    """True when `path` holds MIMIC-IV-style tables (admissions or patients).

    Either one is enough: a folder that lost the other (renamed, deleted) is still a MIMIC folder whose
    reader names the missing table, not a FHIR folder that silently yields no patients.
    """
    root = Path(path)
    return root.is_dir() and (_find_table(root, "admissions") is not None or _find_table(root, "patients") is not None)


def _scan_table(root: Path, name: str, required: tuple[str, ...]) -> pl.LazyFrame:
    path = _find_table(root, name)
    if path is None:
        raise EHRTableError(root / "hosp" / f"{name}.csv.gz", f"MIMIC table '{name}' not found")
    if path.suffix == ".parquet":
        lf = pl.scan_parquet(path)
    else:
        # Everything as text first: MIMIC ids and codes ('V707', '0389') must not become numbers.
        lf = pl.scan_csv(path, infer_schema=False)
    cols = lf.collect_schema().names()
    missing = [c for c in required if c not in cols]
    if missing:
        raise EHRTableError(path, f"table '{name}' lacks columns {missing}")
    return lf


def _second_sunday_march_and_first_sunday_november(year: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    mar1 = pl.date(year, 3, 1).cast(pl.Datetime("us"))
    nov1 = pl.date(year, 11, 1).cast(pl.Datetime("us"))
    # polars weekday: Monday=1 .. Sunday=7; days to the next Sunday (0 when already Sunday)
    to_sunday = lambda d: (7 - d.dt.weekday()) % 7  # noqa: E731
    march = mar1 + pl.duration(days=to_sunday(mar1) + 7, hours=2)
    november = nov1 + pl.duration(days=to_sunday(nov1), hours=2)
    return march, november


def _local_time(col: str) -> pl.Expr:
    """MIMIC wall-clock text -> UTC, read as US Eastern time.

    The time-zone database behind polars stops applying daylight saving in the far future, but
    MIMIC's shifted dates lie in 2100-2200 and the MIMIC FHIR export writes them with -04:00 in
    summer. So from 2007 on the US rule (second Sunday of March to first Sunday of November,
    02:00 local; ambiguous hours read as daylight time) is applied directly; earlier dates use
    the America/New_York database entry.
    """
    naive = pl.col(col).str.to_datetime(strict=False, time_unit="us")
    march, november = _second_sunday_march_and_first_sunday_november(naive.dt.year())
    summer = (naive >= march) & (naive < november)
    rule = (naive + pl.when(summer).then(pl.duration(hours=4)).otherwise(pl.duration(hours=5))).dt.replace_time_zone(UTC)
    database = naive.dt.replace_time_zone(MIMIC_TIMEZONE, ambiguous="earliest", non_existent="null")
    database_gap = (naive + pl.duration(hours=1)).dt.replace_time_zone(MIMIC_TIMEZONE, ambiguous="earliest", non_existent="null")
    old = pl.coalesce(database, database_gap).dt.convert_time_zone(UTC)
    return pl.when(naive.is_null()).then(None).when(naive.dt.year() >= 2007).then(rule).otherwise(old)


def ingest_mimic(root: str | Path, *, labs: bool = True, prescriptions: bool = True) -> EHRTables:
    """Read MIMIC-IV hosp tables (CSV, gzip or Parquet) into EHRTables with polars.

    Diagnoses carry no time in MIMIC; they are coded at discharge, so they are timed at the
    admission's discharge (this keeps them out of any prediction made during the stay).
    Procedures are timed at their chart date (midnight local). Birth time is approximated as
    1 January of anchor_year - anchor_age (MIMIC gives no birth date).
    """
    root = Path(root)
    if not root.is_dir():
        from medai.errors import DatasetNotFoundError

        raise DatasetNotFoundError(root, "MIMIC-IV table folder")
    names = [name for name in MIMIC_REQUIRED if (name != "labevents" or labs) and (name != "prescriptions" or prescriptions)]
    try:
        return _read_mimic(root, names)
    except (pl.exceptions.PolarsError, OSError) as exc:
        # polars reads lazily: a cut or corrupt gzip, an empty file or a bad byte shows only when the
        # joined query runs, and its message names no file. Find the table that does not read.
        paths = [_find_table(root, name) for name in (*names, *MIMIC_OPTIONAL)]
        broken = next((path for path in paths if path is not None and not _table_reads(path)), root)
        raise EHRTableError(broken, f"MIMIC table unreadable ({type(exc).__name__}: {exc})") from None


def _table_reads(path: Path) -> bool:
    """True when polars reads the whole table (used only to name the table behind a failed query)."""
    try:
        if path.suffix == ".parquet":
            pl.scan_parquet(path).select(pl.len()).collect()
        else:  # every column decoded (a bad UTF-8 byte shows only then), streamed: memory stays bounded
            pl.scan_csv(path, infer_schema=False).select(pl.all().str.len_bytes().max()).collect(engine="streaming")
    except (pl.exceptions.PolarsError, OSError):
        return False
    return True


def _read_mimic(root: Path, names: list[str]) -> EHRTables:
    """The MIMIC tables under root as EHRTables (polars errors propagate)."""
    scan = {name: _scan_table(root, name, MIMIC_REQUIRED[name]) for name in names}
    patients = scan["patients"].select(
        pl.col("subject_id").alias("patient_id"),
        pl.col("subject_id").alias("identifier"),
        (pl.datetime(pl.col("anchor_year").cast(pl.Int32) - pl.col("anchor_age").cast(pl.Int32), 1, 1)
         + pl.duration(hours=5)).dt.replace_time_zone(UTC).alias("birth_time"),  # 1 Jan, 00:00 EST
        pl.col("gender").replace_strict({"F": "female", "M": "male"}, default="unknown").alias("sex"),
        _local_time("dod").alias("death_time"),
        pl.lit(True).alias("dates_shifted"),
        pl.lit(str(root)).alias("source"),
    ).collect()
    adm = scan["admissions"].collect()
    # In-hospital death time is more precise than dod (a date); keep it when present.
    deaths = adm.filter(pl.col("deathtime").is_not_null() & (pl.col("deathtime") != "")).select(
        pl.col("subject_id").alias("patient_id"), _local_time("deathtime").alias("_death")
    ).group_by("patient_id").agg(pl.col("_death").min())
    patients = patients.join(deaths, on="patient_id", how="left").with_columns(
        pl.coalesce("_death", "death_time").alias("death_time")
    ).drop("_death")
    visits = adm.select(
        pl.col("subject_id").alias("patient_id"),
        pl.col("hadm_id").alias("visit_id"),
        pl.col("hadm_id").alias("identifier"),
        _local_time("admittime").alias("start"),
        _local_time("dischtime").alias("end"),
        pl.col("admission_type").alias("visit_class"),
        pl.lit(None, pl.Utf8).alias("parent_visit_id"),
    )
    icu_path = _find_table(root, "icustays")
    if icu_path is not None:
        icu = _scan_table(root, "icustays", ("subject_id", "hadm_id", "stay_id", "intime", "outtime")).select(
            pl.col("subject_id").alias("patient_id"),
            pl.col("stay_id").alias("visit_id"),
            pl.col("stay_id").alias("identifier"),
            _local_time("intime").alias("start"),
            _local_time("outtime").alias("end"),
            pl.lit("ICU").alias("visit_class"),
            pl.col("hadm_id").alias("parent_visit_id"),
        ).collect()
        visits = pl.concat([visits, icu])
    frames = []
    dx = scan["diagnoses_icd"].select(
        pl.col("subject_id").alias("patient_id"),
        pl.col("hadm_id").alias("visit_id"),
        pl.lit(None, TIME).alias("time"),  # resolved to discharge by finalize()
        pl.lit("diagnosis").alias("kind"),
        pl.concat_str([pl.lit("ICD"), pl.col("icd_version"), pl.lit("CM")]).alias("system"),
        pl.col("icd_code").str.strip_chars().alias("code"),
        pl.lit(None, pl.Float64).alias("numeric_value"),
        pl.lit(None, pl.Utf8).alias("text_value"),
        pl.lit(None, pl.Utf8).alias("unit"),
        pl.concat_str([pl.lit("diagnoses_icd:"), pl.col("hadm_id"), pl.lit(":"), pl.col("seq_num")]).alias("source_id"),
    )
    frames.append(dx)
    px = scan["procedures_icd"].select(
        pl.col("subject_id").alias("patient_id"),
        pl.col("hadm_id").alias("visit_id"),
        _local_time("chartdate").alias("time"),
        pl.lit("procedure").alias("kind"),
        pl.when(pl.col("icd_version") == "9").then(pl.lit("ICD9PROC")).otherwise(pl.lit("ICD10PCS")).alias("system"),
        pl.col("icd_code").str.strip_chars().alias("code"),
        pl.lit(None, pl.Float64).alias("numeric_value"),
        pl.lit(None, pl.Utf8).alias("text_value"),
        pl.lit(None, pl.Utf8).alias("unit"),
        pl.concat_str([pl.lit("procedures_icd:"), pl.col("hadm_id"), pl.lit(":"), pl.col("seq_num")]).alias("source_id"),
    )
    frames.append(px)
    if "labevents" in scan:
        lab = scan["labevents"].select(
            pl.col("subject_id").alias("patient_id"),
            pl.col("hadm_id").alias("visit_id"),
            _local_time("charttime").alias("time"),
            pl.lit("lab").alias("kind"),
            pl.lit("MIMIC_LAB").alias("system"),
            pl.col("itemid").alias("code"),
            pl.col("valuenum").cast(pl.Float64, strict=False).alias("numeric_value"),
            pl.when(pl.col("valuenum").is_null()).then(pl.col("value")).otherwise(None).alias("text_value"),
            pl.col("valueuom").alias("unit"),
            pl.concat_str([pl.lit("labevents:"), pl.col("labevent_id")]).alias("source_id"),
        )
        frames.append(lab)
    if "prescriptions" in scan:
        # NDC when the row has a real one; MIMIC writes '0' for ward stock, so fall back to the drug name.
        rx = scan["prescriptions"].select(
            pl.col("subject_id").alias("patient_id"),
            pl.col("hadm_id").alias("visit_id"),
            _local_time("starttime").alias("time"),
            pl.lit("medication").alias("kind"),
            pl.when(pl.col("ndc").is_not_null() & (pl.col("ndc").str.strip_chars("0") != ""))
            .then(pl.lit("NDC")).otherwise(pl.lit("MIMIC_DRUG")).alias("system"),
            pl.when(pl.col("ndc").is_not_null() & (pl.col("ndc").str.strip_chars("0") != ""))
            .then(pl.col("ndc")).otherwise(pl.col("drug").str.to_lowercase().str.strip_chars()).alias("code"),
            pl.lit(None, pl.Float64).alias("numeric_value"),
            pl.lit(None, pl.Utf8).alias("text_value"),
            pl.lit(None, pl.Utf8).alias("unit"),
            pl.concat_str([pl.lit("prescriptions:"), pl.col("pharmacy_id")]).alias("source_id"),
        )
        frames.append(rx)
    events = pl.concat([f.collect() for f in frames], how="vertical")
    refused = events.filter(pl.col("code").is_null() | (pl.col("code") == "")).select(
        pl.lit(str(root)).alias("source"),
        pl.concat_str([pl.lit("patient "), pl.col("patient_id")]).alias("location"),
        pl.col("kind").alias("resource_type"),
        pl.col("source_id").alias("resource_id"),
        pl.lit("unknown code: empty code").alias("reason"),
    )
    events = events.filter(pl.col("code").is_not_null() & (pl.col("code") != ""))
    tables = EHRTables(
        patients=_conform(patients, PATIENT_SCHEMA, root),
        visits=_conform(visits, VISIT_SCHEMA, root),
        events=_conform(events, EVENT_SCHEMA, root),
        refused=_conform(refused, REFUSAL_SCHEMA, root),
    )
    return finalize(tables)


# --------------------------------------------------------------------------------------------
# MEDS interop
# --------------------------------------------------------------------------------------------

MEDS_BIRTH, MEDS_DEATH = "MEDS_BIRTH", "MEDS_DEATH"
_MEDS_SEP = "//"


def to_meds(tables: EHRTables, out_dir: str | Path, dataset_name: str = "medai") -> Path:
    """Write MEDS (data/*.parquet: subject_id, time, code, numeric_value [+ text_value, unit, visit_id]).

    MEDS needs int64 subject ids; the mapping to medai's patient ids is kept in
    metadata/subject_ids.parquet. Codes are `SYSTEM//CODE`; visits become
    `VISIT//START//<class>` / `VISIT//END//<class>` events carrying their visit_id.
    """
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    ids = tables.patients.select("patient_id").unique(maintain_order=True).sort("patient_id").with_row_index("subject_id")
    ids = ids.with_columns(pl.col("subject_id").cast(pl.Int64))
    meds_cols = ["patient_id", "time", "code", "numeric_value", "text_value", "unit", "visit_id", "parent_visit_id"]
    pat = tables.patients
    rows = [
        pat.filter(pl.col("birth_time").is_not_null()).select(
            "patient_id", pl.col("birth_time").alias("time"), pl.lit(MEDS_BIRTH).alias("code"),
            pl.lit(None, pl.Float32).alias("numeric_value"), pl.col("sex").alias("text_value"),
            pl.lit(None, pl.Utf8).alias("unit"), pl.lit(None, pl.Utf8).alias("visit_id"),
            pl.lit(None, pl.Utf8).alias("parent_visit_id"),
        ),
        pat.filter(pl.col("death_time").is_not_null()).select(
            "patient_id", pl.col("death_time").alias("time"), pl.lit(MEDS_DEATH).alias("code"),
            pl.lit(None, pl.Float32).alias("numeric_value"), pl.lit(None, pl.Utf8).alias("text_value"),
            pl.lit(None, pl.Utf8).alias("unit"), pl.lit(None, pl.Utf8).alias("visit_id"),
            pl.lit(None, pl.Utf8).alias("parent_visit_id"),
        ),
        # Sex without a birth date still has to survive the round trip: a static (time-null) row.
        pat.filter(pl.col("birth_time").is_null() & pl.col("sex").is_not_null()).select(
            "patient_id", pl.lit(None, TIME).alias("time"), pl.concat_str([pl.lit("SEX//"), pl.col("sex")]).alias("code"),
            pl.lit(None, pl.Float32).alias("numeric_value"), pl.lit(None, pl.Utf8).alias("text_value"),
            pl.lit(None, pl.Utf8).alias("unit"), pl.lit(None, pl.Utf8).alias("visit_id"),
            pl.lit(None, pl.Utf8).alias("parent_visit_id"),
        ),
    ]
    for edge, col in (("START", "start"), ("END", "end")):
        rows.append(tables.visits.filter(pl.col(col).is_not_null()).select(
            "patient_id", pl.col(col).alias("time"),
            pl.concat_str([pl.lit(f"VISIT//{edge}//"), pl.col("visit_class").fill_null("UNKNOWN")]).alias("code"),
            pl.lit(None, pl.Float32).alias("numeric_value"), pl.col("identifier").alias("text_value"),
            pl.lit(None, pl.Utf8).alias("unit"), "visit_id", "parent_visit_id",
        ))
    rows.append(tables.events.select(
        "patient_id", "time",
        pl.concat_str([pl.col("kind").str.to_uppercase(), pl.lit(_MEDS_SEP), pl.col("system"), pl.lit(_MEDS_SEP),
                       pl.col("code")]).alias("code"),
        pl.col("numeric_value").cast(pl.Float32), "text_value", "unit", "visit_id",
        pl.lit(None, pl.Utf8).alias("parent_visit_id"),
    ))
    data = pl.concat([r.select(meds_cols) for r in rows]).join(ids, on="patient_id", how="inner")
    data = data.select(
        "subject_id", pl.col("time").dt.replace_time_zone(None).alias("time"), "code", "numeric_value",
        "text_value", "unit", "visit_id", "parent_visit_id",
    ).sort(["subject_id", "time"], nulls_last=False)
    data.write_parquet(out / "data" / "data_0.parquet")
    ids.select("subject_id", "patient_id").write_parquet(out / "metadata" / "subject_ids.parquet")
    (out / "metadata" / "dataset.json").write_text(json.dumps({
        "dataset_name": dataset_name, "dataset_version": "1", "etl_name": "medai.io.ehr", "etl_version": "0.1.0",
        "meds_version": "0.3.3", "time_zone": "UTC",
    }, indent=2))
    data.group_by("code").len().sort("code").select("code", pl.lit(None, pl.Utf8).alias("description"),
                                                    pl.lit(None, pl.List(pl.Utf8)).alias("parent_codes")
                                                    ).write_parquet(out / "metadata" / "codes.parquet")
    return out


def from_meds(meds_dir: str | Path) -> EHRTables:
    """Read a MEDS folder (data/**/*.parquet) back into EHRTables; times are read as UTC.

    Codes written by `to_meds` map back exactly; foreign MEDS codes `A//B//C` become
    kind 'observation', system 'A', code 'B//C' (a single-part code gets system 'MEDS').
    """
    base = Path(meds_dir)
    files = sorted((base / "data").rglob("*.parquet"))
    if not files:
        raise EHRTableError(base / "data", "no MEDS data/*.parquet files")
    data = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    for col in ("subject_id", "time", "code", "numeric_value"):
        if col not in data.columns:
            raise EHRTableError(files[0], f"MEDS data lacks column '{col}'")
    for col in ("text_value", "unit", "visit_id", "parent_visit_id"):
        if col not in data.columns:
            data = data.with_columns(pl.lit(None, pl.Utf8).alias(col))
    id_map_path = base / "metadata" / "subject_ids.parquet"
    if id_map_path.is_file():
        data = data.join(pl.read_parquet(id_map_path), on="subject_id", how="left")
        data = data.with_columns(pl.coalesce("patient_id", pl.col("subject_id").cast(pl.Utf8)).alias("patient_id"))
    else:
        data = data.with_columns(pl.col("subject_id").cast(pl.Utf8).alias("patient_id"))
    t = data["time"].dtype
    time_expr = pl.col("time").dt.replace_time_zone(UTC) if getattr(t, "time_zone", None) is None else pl.col("time").dt.convert_time_zone(UTC)
    data = data.with_columns(time_expr.cast(TIME).alias("time"))
    births = data.filter(pl.col("code") == MEDS_BIRTH).group_by("patient_id").agg(
        pl.col("time").min().alias("birth_time"), pl.col("text_value").first().alias("sex_b"))
    deaths = data.filter(pl.col("code") == MEDS_DEATH).group_by("patient_id").agg(pl.col("time").min().alias("death_time"))
    sexes = data.filter(pl.col("code").str.starts_with("SEX//")).group_by("patient_id").agg(
        pl.col("code").first().str.strip_prefix("SEX//").alias("sex_s"))
    patients = (data.select("patient_id").unique().join(births, on="patient_id", how="left")
                .join(deaths, on="patient_id", how="left").join(sexes, on="patient_id", how="left")
                .with_columns(pl.coalesce("sex_b", "sex_s").alias("sex"), pl.lit(None, pl.Utf8).alias("identifier"),
                              pl.lit(None, pl.Boolean).alias("dates_shifted"), pl.lit(str(base)).alias("source")))
    vis = data.filter(pl.col("code").str.starts_with("VISIT//"))
    vis = vis.with_columns(
        pl.col("code").str.split("//").list.get(1).alias("edge"),
        pl.col("code").str.split("//").list.slice(2).list.join("//").alias("visit_class"),
    )
    visits = (vis.filter(pl.col("edge") == "START").select("patient_id", "visit_id", pl.col("text_value").alias("identifier"),
                                                            pl.col("time").alias("start"), "visit_class", "parent_visit_id")
              .join(vis.filter(pl.col("edge") == "END").select("patient_id", "visit_id", pl.col("time").alias("end")),
                    on=["patient_id", "visit_id"], how="full", coalesce=True)
              .with_columns(pl.when(pl.col("visit_class") == "UNKNOWN").then(None).otherwise(pl.col("visit_class")).alias("visit_class")))
    ev = data.filter(~pl.col("code").str.starts_with("VISIT//") & ~pl.col("code").is_in([MEDS_BIRTH, MEDS_DEATH])
                     & ~pl.col("code").str.starts_with("SEX//"))
    parts = pl.col("code").str.split("//")
    n = parts.list.len()
    own = pl.col("_k").is_in([k.upper() for k in EVENT_KINDS]) & (n >= 3)
    ev = ev.with_columns(parts.list.get(0).alias("_k"))
    events = ev.select(
        "patient_id", "visit_id", "time",
        pl.when(own).then(pl.col("_k").str.to_lowercase()).otherwise(pl.lit("observation")).alias("kind"),
        pl.when(own).then(parts.list.get(1)).when(n >= 2).then(parts.list.get(0)).otherwise(pl.lit("MEDS")).alias("system"),
        pl.when(own).then(parts.list.slice(2).list.join("//")).when(n >= 2).then(parts.list.slice(1).list.join("//"))
        .otherwise(pl.col("code")).alias("code"),
        pl.col("numeric_value").cast(pl.Float64), "text_value", "unit", pl.lit(None, pl.Utf8).alias("source_id"),
    )
    return EHRTables(
        patients=_conform(patients, PATIENT_SCHEMA, base),
        visits=_conform(visits, VISIT_SCHEMA, base).sort(["patient_id", "start"]),
        events=_conform(events, EVENT_SCHEMA, base).sort(["patient_id", "time", "kind", "system", "code"]),
        refused=_empty(REFUSAL_SCHEMA),
    )


# --------------------------------------------------------------------------------------------
# One entry point for the CLI
# --------------------------------------------------------------------------------------------


def detect_source(path: str | Path) -> str:
    """Return 'mimic', 'meds', 'timeline' or 'fhir' for a path (folder or file)."""
    p = Path(path)
    if p.is_dir():
        if is_mimic_folder(p):
            return "mimic"
        if (p / "data").is_dir() and (p / "metadata").is_dir():
            return "meds"
        if (p / "events.parquet").is_file():
            return "timeline"
    return "fhir"


def ingest(paths: Iterable[str | Path], *, not_after: datetime | None = None, progress: bool = False) -> EHRTables:
    """Ingest FHIR files/folders, MIMIC table folders and MEDS folders (detected) into one EHRTables."""
    fhir_paths: list[Path] = []
    result: EHRTables | None = None
    for p in map(Path, paths):
        kind = detect_source(p)
        part = None
        if kind == "mimic":
            part = ingest_mimic(p)
        elif kind == "meds":
            part = from_meds(p)
        elif kind == "timeline":
            part = EHRTables.read(p)
        else:
            fhir_paths.append(p)
        if part is not None:
            result = part if result is None else result.concat(part)
    if fhir_paths:
        part = ingest_fhir(fhir_paths, not_after=not_after, progress=progress)
        result = part if result is None else result.concat(part)
    return result if result is not None else EHRTables()


def validate_fhir_file(path: str | Path) -> list[str]:
    """Validate every resource in one FHIR file; return the problems found (empty when valid)."""
    problems = []
    for item in iter_fhir_file(path):
        if item.resource is None:
            problems.append(f"{item.location}: {item.error}")
            continue
        try:
            validate_fhir_resource(item.resource)
        except FhirValidationError as exc:
            problems.append(f"{item.location}: {exc}")
    return problems
