"""EHR ingestion on the real shared data: HL7 examples, Synthea bundles, MIMIC-IV demo tables and FHIR export."""

from __future__ import annotations

import copy
import gzip
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from medai.io.ehr import (
    EHRTables,
    FhirValidationError,
    from_meds,
    ingest,
    ingest_fhir,
    ingest_mimic,
    to_meds,
    validate_fhir_file,
    validate_fhir_resource,
)

log = logging.getLogger(__name__)

# Invalid HL7 examples that fhir.resources (with medai's extra JSON rules) cannot see, with the
# reference validator's outcome; the data card lists the same cases.
NOT_DETECTED = {"risk-assessment-probability-range.json": "Constraint failed: ras-2: 'Must be <= 100'"}
# Caught only by medai's supplementary rules, not by fhir.resources alone.
SUPPLEMENTARY_ONLY = {
    "attachment-with-wrong-size.json", "bundle-duplicate-id.json", "empty-array.json",
    "patient-id-bad-3.json", "resource-invalid-id-2.json",
}


@pytest.fixture(scope="module")
def mimic_tables(mimic_iv_demo_path: Path) -> EHRTables:
    return ingest_mimic(mimic_iv_demo_path)


@pytest.fixture(scope="module")
def mimic_fhir_tables(mimic_iv_fhir_demo_partial_path: Path) -> EHRTables:
    return ingest_fhir([mimic_iv_fhir_demo_partial_path])


def _synthea_files(path: Path, n: int) -> list[Path]:
    return sorted((path / "bundles").glob("*.json.gz"))[:n]


# ---- HL7 examples ----------------------------------------------------------------------------

def test_every_valid_hl7_example_is_accepted(hl7_fhir_r4_examples_path: Path):
    files = sorted((hl7_fhir_r4_examples_path / "valid").glob("*.json"))
    assert len(files) == 21
    for f in files:
        assert validate_fhir_file(f) == [], f.name


def test_invalid_hl7_examples_are_refused_naming_resource_and_problem(hl7_fhir_r4_examples_path: Path):
    files = sorted((hl7_fhir_r4_examples_path / "invalid").glob("*.json"))
    assert len(files) == 17
    expected_dir = hl7_fhir_r4_examples_path / "invalid" / "expected_outcomes"
    missed = {}
    for f in files:
        problems = validate_fhir_file(f)
        if not problems:
            missed[f.name] = True
            continue
        text = " ".join(problems)
        data = None
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            assert "malformed JSON" in text and "line 15" in text, (f.name, text)
            continue
        assert data["resourceType"] in text, (f.name, text)  # the resource is named
        # The element the reference validator blames is named too.
        stem = f.stem
        outcome = next((p for p in expected_dir.glob(f"R4.{stem}*") if p.name.startswith(f"R4.{stem}-") or p.name.startswith(f"R4.{stem} ")), None)
        if outcome is not None:
            issue = json.loads(outcome.read_text())["issue"][0]
            element = (issue.get("expression") or [""])[0].split(".")[-1].split("[")[0].split("/")[0]
            if element and element not in ("Patient", "Location", "Bundle", "entry"):
                assert element in text, (f.name, element, text)
    assert set(missed) == set(NOT_DETECTED), missed


def test_fhir_resources_alone_misses_exactly_the_supplementary_cases(hl7_fhir_r4_examples_path: Path):
    from fhir.resources.R4B import get_fhir_model_class

    missed = set()
    for f in sorted((hl7_fhir_r4_examples_path / "invalid").glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        try:
            get_fhir_model_class(data["resourceType"]).model_validate(data)
            missed.add(f.name)
        except Exception:
            pass
    assert missed == SUPPLEMENTARY_ONLY | set(NOT_DETECTED)


def test_validation_error_names_type_id_and_problem():
    with pytest.raises(FhirValidationError) as info:
        validate_fhir_resource({"resourceType": "Observation", "id": "obs-1", "status": "final",
                                "code": {"text": "x"}, "effectiveDateTime": "2020-13-45"})
    assert "Observation/obs-1" in str(info.value) and "effectiveDateTime" in str(info.value)


# ---- Synthea bundles --------------------------------------------------------------------------

def test_synthea_bundle_round_trip_matches_hand_count(synthea_r4_path: Path):
    path = _synthea_files(synthea_r4_path, 1)[0]
    bundle = json.loads(gzip.open(path).read())
    resources = [e["resource"] for e in bundle["entry"]]
    by_type = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], []).append(r)
    # Counted independently from the raw JSON: one event per coded resource, one per observation
    # value, plus one per coded component.
    n_obs = sum((1 if any(k.startswith("value") for k in o) or not o.get("component") else 0)
                + len(o.get("component") or []) for o in by_type.get("Observation", []))
    expected_events = n_obs + sum(len(by_type.get(t, [])) for t in ("Condition", "MedicationRequest", "Procedure", "Immunization"))
    tables = ingest_fhir([path])
    assert tables.refused.height == 0
    assert tables.patients.height == 1 and tables.visits.height == len(by_type["Encounter"])
    dups = tables.refused.filter(pl.col("reason").str.starts_with("duplicate")).height
    assert tables.events.height + dups == expected_events
    timeline = next(tables.timelines())
    assert timeline.patient_id == by_type["Patient"][0]["id"]
    assert [e.time for e in timeline.events] == sorted(e.time for e in timeline.events)
    # urn:uuid references resolve: every event's visit is one of the patient's encounters.
    visit_ids = {v.visit_id for v in timeline.visits}
    assert all(e.visit_id in visit_ids for e in timeline.events)


def test_planted_invalid_resource_is_reported_and_the_rest_loads(synthea_r4_path: Path, tmp_path: Path):
    path = _synthea_files(synthea_r4_path, 1)[0]
    bundle = json.loads(gzip.open(path).read())
    clean = ingest_fhir([path])
    planted = copy.deepcopy(bundle)
    victim = next(e["resource"] for e in planted["entry"] if e["resource"]["resourceType"] == "Condition")
    victim["onsetDateTime"] = "not-a-date"
    bad = tmp_path / "planted.json"
    bad.write_text(json.dumps(planted))
    tables = ingest_fhir([bad])
    assert tables.refused.height == 1
    row = tables.refused.row(0, named=True)
    assert row["resource_id"] == victim["id"] and row["resource_type"] == "Condition"
    assert "onsetDateTime" in row["reason"]
    assert tables.events.height == clean.events.height - 1
    assert tables.visits.height == clean.visits.height


def test_ndjson_streams_in_chunks_and_skips_bad_lines(synthea_r4_path: Path, tmp_path: Path):
    # Bulk-export layout: one resource type per NDJSON file, as $export writes it.
    out = tmp_path / "export"
    out.mkdir()
    per_type: dict[str, list[str]] = {}
    for path in _synthea_files(synthea_r4_path, 2):
        for entry in json.loads(gzip.open(path).read())["entry"]:
            per_type.setdefault(entry["resource"]["resourceType"], []).append(json.dumps(entry["resource"]))
    per_type["Observation"].insert(3, '{"resourceType": "Observation", "id": "broken"')  # malformed line
    for rtype, lines in per_type.items():
        (out / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n")
    big = ingest_fhir([out], chunk_rows=100_000)
    small = ingest_fhir([out], chunk_rows=50, work_dir=tmp_path / "parts")
    assert len(list((tmp_path / "parts").glob("events-*.parquet"))) > 5  # really flushed in parts
    assert big.events.equals(small.events) and big.visits.equals(small.visits)
    bundles = ingest_fhir(_synthea_files(synthea_r4_path, 2))
    assert big.events.height == bundles.events.height
    malformed = big.refused.filter(pl.col("reason").str.starts_with("malformed JSON"))
    assert malformed.height == 1 and malformed["location"][0] == "line 4"


def test_bad_events_missing_time_future_duplicate_unknown_code(tmp_path: Path):
    # Synthetic: the real data has none of these faults (and must not, for the other tests).
    pid = "p1"
    entries = [
        {"resourceType": "Patient", "id": pid, "birthDate": "1980-01-01", "gender": "female"},
        {"resourceType": "Observation", "id": "o-ok", "status": "final", "subject": {"reference": f"Patient/{pid}"},
         "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}, "effectiveDateTime": "2020-01-01T10:00:00Z",
         "valueQuantity": {"value": 13.1, "unit": "g/dL"}},
        {"resourceType": "Observation", "id": "o-dup", "status": "final", "subject": {"reference": f"Patient/{pid}"},
         "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}, "effectiveDateTime": "2020-01-01T10:00:00Z",
         "valueQuantity": {"value": 13.1, "unit": "g/dL"}},
        {"resourceType": "Observation", "id": "o-notime", "status": "final", "subject": {"reference": f"Patient/{pid}"},
         "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}, "valueQuantity": {"value": 12.0}},
        {"resourceType": "Observation", "id": "o-future", "status": "final", "subject": {"reference": f"Patient/{pid}"},
         "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}, "effectiveDateTime": "2999-01-01"},
        {"resourceType": "Condition", "id": "c-nocode", "subject": {"reference": f"Patient/{pid}"},
         "code": {"text": "something"}, "onsetDateTime": "2019-01-01"},
        {"resourceType": "Condition", "id": "c-orphan", "subject": {"reference": "Patient/nobody"},
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}, "onsetDateTime": "2019-01-01"},
        {"resourceType": "Condition", "id": "c-prebirth", "subject": {"reference": f"Patient/{pid}"},
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}, "onsetDateTime": "1970-01-01"},
    ]
    path = tmp_path / "bad.ndjson"
    path.write_text("\n".join(json.dumps(e) for e in entries))
    tables = ingest_fhir([path], not_after=datetime(2025, 1, 1, tzinfo=timezone.utc))
    assert tables.events["source_id"].to_list() == ["o-ok"]
    reasons = {r["resource_id"]: r["reason"].split(":")[0] for r in tables.refused.iter_rows(named=True)}
    assert reasons == {"o-dup": "duplicate event", "o-notime": "missing timestamp", "o-future": "future date",
                       "c-nocode": "unknown code", "c-orphan": "unknown patient", "c-prebirth": "before birth"}


def _synthea_ndjson(synthea_r4_path: Path, out: Path) -> dict[str, list[str]]:
    """Write two Synthea bundles as bulk-export NDJSON (one file per resource type); return the lines."""
    out.mkdir()
    per_type: dict[str, list[str]] = {}
    for path in _synthea_files(synthea_r4_path, 2):
        for entry in json.loads(gzip.open(path).read())["entry"]:
            per_type.setdefault(entry["resource"]["resourceType"], []).append(json.dumps(entry["resource"]))
    for rtype, lines in per_type.items():
        (out / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n")
    return per_type


def test_truncated_gzip_and_non_utf8_line_cost_only_themselves(synthea_r4_path: Path, tmp_path: Path):
    """A cut-off .ndjson.gz and a line with a non-UTF-8 byte are refused by name; every other file loads."""
    out = tmp_path / "export"
    per_type = _synthea_ndjson(synthea_r4_path, out)
    clean = ingest_fhir([out])
    # a non-UTF-8 byte inside one Condition line: that line is refused, the file's other lines load
    lines = (out / "Condition.ndjson").read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"resourceType"', b'"resourceType\xff"', 1)
    (out / "Condition.ndjson").write_bytes(b"\n".join(lines))
    # a gzip cut in the middle: the lines before the cut load, the loss is named
    blob = gzip.compress(("\n".join(per_type["Observation"]) + "\n").encode())
    (out / "Observation.ndjson").unlink()
    (out / "Observation.ndjson.gz").write_bytes(blob[: len(blob) // 2])
    tables = ingest_fhir([out])
    reasons = tables.refused["reason"].to_list()
    assert any(r.startswith("not UTF-8") for r in reasons), reasons
    assert any(r.startswith("unreadable: EOFError") for r in reasons), reasons
    assert tables.patients.height == clean.patients.height
    assert 0 < tables.events.height < clean.events.height
    conditions = clean.events.filter(pl.col("kind") == "condition").height
    assert tables.events.filter(pl.col("kind") == "condition").height == conditions - 1


def test_cli_ingest_survives_a_truncated_gzip(synthea_r4_path: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from medai.cli import app

    out = tmp_path / "export"
    per_type = _synthea_ndjson(synthea_r4_path, out)
    blob = gzip.compress(("\n".join(per_type["Observation"]) + "\n").encode())
    (out / "Observation.ndjson").unlink()
    (out / "Observation.ndjson.gz").write_bytes(blob[:200])
    result = CliRunner().invoke(app, ["ehr", "ingest", str(out), "--out", str(tmp_path / "timeline")])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert (tmp_path / "timeline").is_dir() and any((tmp_path / "timeline").iterdir())


def test_patient_without_id_is_refused_not_counted(tmp_path: Path):
    entries = [
        {"resourceType": "Patient", "id": "p1", "birthDate": "1980-01-01", "gender": "female",
         "identifier": [{"value": "MRN-1"}]},
        {"resourceType": "Patient", "birthDate": "1980-01-01", "gender": "female", "identifier": [{"value": "MRN-1"}]},
    ]
    path = tmp_path / "patients.ndjson"
    path.write_text("\n".join(json.dumps(e) for e in entries))
    tables = ingest_fhir([path])
    assert tables.patients["patient_id"].to_list() == ["p1"]
    assert tables.summary()["patients"] == 1
    assert tables.refused["reason"].to_list() == ["no id: a Patient must carry an id"]


# ---- MIMIC-IV tables and FHIR export ----------------------------------------------------------

def test_mimic_tables_counts(mimic_tables: EHRTables, mimic_iv_demo_path: Path):
    assert mimic_tables.patients.height == 100
    visits = mimic_tables.visits
    assert visits.filter(pl.col("parent_visit_id").is_null()).height == 275
    assert visits.filter(pl.col("visit_class") == "ICU").height == 140
    dx = mimic_tables.events.filter(pl.col("kind") == "diagnosis")
    raw_dx = pl.read_csv(mimic_iv_demo_path / "hosp" / "diagnoses_icd.csv.gz", infer_schema=False)
    assert dx.height == raw_dx.height == 4506  # no diagnosis is lost or duplicated
    # Diagnoses are coded at discharge: each is timed at its admission's end.
    joined = dx.join(visits.select("visit_id", "end"), on="visit_id")
    assert (joined["time"] == joined["end"]).all()
    deaths = mimic_tables.patients.filter(pl.col("death_time").is_not_null()).height
    assert deaths >= 15  # at least the 15 in-hospital deaths
    assert mimic_tables.events["time"].null_count() == 0
    assert mimic_tables.events["time"].dtype == pl.Datetime("us", "UTC")


def test_mimic_fhir_export_cross_checks_with_tables(mimic_tables: EHRTables, mimic_fhir_tables: EHRTables):
    fhir, tab = mimic_fhir_tables, mimic_tables
    assert fhir.patients.height == 100 and fhir.refused.height == 0
    fhir_subjects = set(fhir.patients["identifier"].to_list())
    shared = fhir_subjects & set(tab.patients["patient_id"].to_list())
    assert len(shared) == 96
    # Admissions of shared patients: the same hadm_ids, at the same instants once both are in UTC.
    fhir_adm = (fhir.visits.filter(pl.col("parent_visit_id").is_null())
                .join(fhir.patients.select("patient_id", pl.col("identifier").alias("subject")), on="patient_id")
                .filter(pl.col("subject").is_in(list(shared))))
    tab_adm = tab.visits.filter(pl.col("parent_visit_id").is_null() & pl.col("patient_id").is_in(list(shared)))
    both = fhir_adm.join(tab_adm, left_on="identifier", right_on="visit_id", suffix="_tab")
    only_fhir = set(fhir_adm["identifier"]) - set(tab_adm["visit_id"])
    only_tab = set(tab_adm["visit_id"]) - set(fhir_adm["identifier"])
    same_start = (both["start"] == both["start_tab"]).mean()
    log.info("admissions: %d matched, %d only in FHIR, %d only in tables; start equal in %.1f%%",
             both.height, len(only_fhir), len(only_tab), 100 * same_start)
    assert both.height >= 0.9 * tab_adm.height
    assert same_start == 1.0  # US Eastern daylight saving applied as the export does
    # Diagnoses per matched admission: same ICD codes (known difference: the export is an older release).
    fhir_dx = (fhir.events.join(fhir.visits.select("visit_id", pl.col("identifier").alias("hadm")), on="visit_id")
               .select("hadm", "system", "code").unique())
    tab_dx = tab.events.filter(pl.col("kind") == "diagnosis").select(pl.col("visit_id").alias("hadm"), "system", "code").unique()
    matched = set(both["identifier"].to_list())
    f_set = {tuple(r) for r in fhir_dx.filter(pl.col("hadm").is_in(list(matched))).iter_rows()}
    t_set = {tuple(r) for r in tab_dx.filter(pl.col("hadm").is_in(list(matched))).iter_rows()}
    agreement = len(f_set & t_set) / len(f_set | t_set)
    log.info("diagnosis codes on matched admissions: %d shared, %d only FHIR, %d only tables (Jaccard %.3f)",
             len(f_set & t_set), len(f_set - t_set), len(t_set - f_set), agreement)
    assert agreement > 0.95
    # Known differences, asserted so a change is noticed (the data card lists them):
    pat = fhir.patients.join(tab.patients, left_on="identifier", right_on="patient_id", suffix="_tab")
    # the export has a full birth date; the tables only anchor_year - anchor_age (read as 1 January)
    years = (pat["birth_time"] - pat["birth_time_tab"]).dt.total_days() / 365.25
    assert years.min() >= 0 and years.max() < 1
    # the export gives the date of death only (midnight UTC); the tables the time (in hospital) or dod
    died = pat.filter(pl.col("death_time").is_not_null() | pl.col("death_time_tab").is_not_null())
    assert died["death_time"].null_count() == died["death_time_tab"].null_count() == 0 and died.height == 30
    assert ((died["death_time"] - died["death_time_tab"]).dt.total_hours().abs() < 28).all()
    assert (pat["sex"] == pat["sex_tab"]).all()


def test_meds_round_trip(mimic_fhir_tables: EHRTables, tmp_path: Path):
    tables = mimic_fhir_tables
    out = to_meds(tables, tmp_path / "meds")
    data = pl.read_parquet(out / "data" / "data_0.parquet")
    assert data.schema["subject_id"] == pl.Int64 and data.schema["numeric_value"] == pl.Float32
    assert data["time"].dtype == pl.Datetime("us")
    back = from_meds(out)
    cols = ["patient_id", "visit_id", "time", "kind", "system", "code"]
    assert back.events.select(cols).sort(cols).equals(tables.events.select(cols).sort(cols))
    vcols = ["patient_id", "visit_id", "start", "end", "visit_class", "parent_visit_id", "identifier"]
    assert back.visits.select(vcols).sort(vcols).equals(tables.visits.select(vcols).sort(vcols))
    pcols = ["patient_id", "birth_time", "sex", "death_time"]
    assert back.patients.select(pcols).sort("patient_id").equals(tables.patients.select(pcols).sort("patient_id"))


def test_ingest_detects_sources_and_writes_report(mimic_iv_demo_path: Path, hl7_fhir_r4_examples_path: Path, tmp_path: Path):
    tables = ingest([mimic_iv_demo_path, hl7_fhir_r4_examples_path / "invalid"])
    tables.write(tmp_path)
    back = EHRTables.read(tmp_path)
    assert back.patients.height == 101  # 100 MIMIC + the one valid Patient inside an invalid Bundle
    assert back.events.height == tables.events.height
    refused = pl.read_csv(tmp_path / "refused.csv")
    assert refused.filter(pl.col("source").str.contains("invalid")).height == 16


def test_cli_ingest_and_summary(mimic_iv_fhir_demo_partial_path: Path, hl7_fhir_r4_examples_path: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from medai.cli import app

    out = tmp_path / "timeline"
    result = CliRunner().invoke(app, ["ehr", "ingest", str(mimic_iv_fhir_demo_partial_path),
                                      str(hl7_fhir_r4_examples_path / "invalid"), "--out", str(out), "--meds"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "101 patients" in result.output and "16 refused" in result.output
    refused = pl.read_csv(out / "refused.csv")
    assert set(refused["resource_id"].drop_nulls()) >= {"example", "bad-id_1", "f003"}
    assert (out / "meds" / "data" / "data_0.parquet").is_file()
    summary = CliRunner().invoke(app, ["ehr", "summary", str(out)], env={"COLUMNS": "200"})
    assert summary.exit_code == 0 and "ICD10CM" in summary.output and "2110-" in summary.output


@pytest.mark.parametrize("table,damage", [("admissions", "cut"), ("patients", "empty"), ("diagnoses_icd", "bad_utf8")])
def test_an_unreadable_mimic_table_is_named_not_a_traceback(mimic_iv_demo_path: Path, tmp_path: Path, table, damage):
    """Found by the hostile-input harness: polars reads lazily, so a cut gzip, an empty file or a non-UTF-8
    byte surfaced as OSError / NoDataError / ComputeError tracebacks from the joined query, naming no file."""
    from typer.testing import CliRunner

    from medai.cli import app
    from medai.errors import InputFileError

    hosp = tmp_path / "mimic" / "hosp"
    hosp.mkdir(parents=True)
    for name in ("patients", "admissions", "diagnoses_icd", "procedures_icd", "labevents", "prescriptions"):
        (hosp / f"{name}.csv.gz").write_bytes((mimic_iv_demo_path / "hosp" / f"{name}.csv.gz").read_bytes())
    target = hosp / f"{table}.csv.gz"
    data = target.read_bytes()
    if damage == "cut":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        target.write_bytes(b"")
    else:
        lines = gzip.decompress(data).split(b"\n")
        target.write_bytes(gzip.compress(b"\n".join([*lines[:5], b"\xff\xfe" + lines[5], *lines[6:]])))
    with pytest.raises(InputFileError) as info:
        ingest_mimic(tmp_path / "mimic")
    assert info.value.path == target
    result = CliRunner().invoke(app, ["ehr", "ingest", str(tmp_path / "mimic"), "--out", str(tmp_path / "out")],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 2 and f"{table}.csv.gz" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_mimic_folder_missing_its_admissions_table_is_named_not_read_as_fhir(mimic_iv_demo_path: Path, tmp_path: Path):
    """Found by the hostile-input harness: with admissions renamed (here to .json.gz) the folder was no longer
    detected as MIMIC, was read as FHIR, and ingest exited 0 with the folder's 100 patients silently missing."""
    from typer.testing import CliRunner

    from medai.cli import app

    hosp = tmp_path / "mimic" / "hosp"
    hosp.mkdir(parents=True)
    for name in ("patients", "diagnoses_icd", "procedures_icd", "labevents", "prescriptions"):
        (hosp / f"{name}.csv.gz").write_bytes((mimic_iv_demo_path / "hosp" / f"{name}.csv.gz").read_bytes())
    (hosp / "admissions.json.gz").write_bytes((mimic_iv_demo_path / "hosp" / "admissions.csv.gz").read_bytes())
    result = CliRunner().invoke(app, ["ehr", "ingest", str(tmp_path / "mimic"), "--out", str(tmp_path / "out")],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "MIMIC table 'admissions' not found" in result.output, result.output
