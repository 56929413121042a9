"""EHR tokenizer and task derivation: hand-countable tokens, save/load identity, UNK, no look-ahead."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from medai.io.ehr import Event, PatientTimeline, Visit, ingest_fhir, ingest_mimic
from medai.transforms.ehr import (
    CLS,
    TASK_TOKENS,
    TOKEN_TYPES,
    UNK,
    EHRTokenizer,
    derive_task_samples,
    frequent_dx_groups,
    interval_token,
)
from medai.io.datasets.ehr import split_patients

T0 = datetime(2020, 1, 1, 8, 0, tzinfo=timezone.utc)


def _timeline() -> PatientTimeline:
    """Two hospital stays 10 days apart, hand-countable: 3 events then 2 events."""
    v1 = Visit("v1", T0, T0 + timedelta(days=3), "IMP")
    icu = Visit("icu1", T0 + timedelta(hours=2), T0 + timedelta(days=1), "ICU", parent_visit_id="v1")
    v2 = Visit("v2", T0 + timedelta(days=13), T0 + timedelta(days=15), "IMP")
    events = [
        Event(T0 + timedelta(hours=1), "lab", "LOINC", "2345-7", numeric_value=90.0, unit="mg/dL", visit_id="v1"),
        Event(T0 + timedelta(hours=3), "lab", "LOINC", "2345-7", numeric_value=250.0, unit="mg/dL", visit_id="icu1"),
        Event(T0 + timedelta(days=3), "diagnosis", "ICD10CM", "E11.9", visit_id="v1"),
        Event(T0 + timedelta(days=13, hours=1), "medication", "RXNORM", "860975", visit_id="v2"),
        Event(T0 + timedelta(days=15), "diagnosis", "ICD10CM", "I10", visit_id="v2"),
    ]
    return PatientTimeline("p1", birth_time=datetime(1960, 1, 1, tzinfo=timezone.utc), sex="female",
                           visits=[v1, icu, v2], events=events)


@pytest.fixture(scope="module")
def tokenizer() -> EHRTokenizer:
    return EHRTokenizer(n_bins=2).fit([_timeline()])


def test_interval_tokens_cover_weeks_months_and_long_term():
    assert interval_token(timedelta(days=0)) == "[W_0]"
    assert interval_token(timedelta(days=10)) == "[W_1]"
    assert interval_token(timedelta(days=27)) == "[W_3]"
    assert interval_token(timedelta(days=29)) == "[M_0]"
    assert interval_token(timedelta(days=45)) == "[M_1]"
    assert interval_token(timedelta(days=389)) == "[M_12]"
    assert interval_token(timedelta(days=390)) == "[LT]"
    assert interval_token(timedelta(days=400)) == "[LT]"


def test_hand_countable_sequence(tokenizer: EHRTokenizer):
    tok = tokenizer.tokenize(_timeline())
    # median of {90, 250} = 170 splits the two glucose values into Q0 and Q1
    assert tok.tokens == [
        CLS, "[VS]", "LOINC/2345-7_Q0", "LOINC/2345-7_Q1", "ICD10CM/E11.9", "[VE]",
        "[W_1]", "[VS]", "RXNORM/860975", "ICD10CM/I10", "[VE]",
    ]
    assert tok.visit_orders == [0, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2]
    assert tok.visit_segments == [0, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2]
    assert tok.type_ids[:3] == [TOKEN_TYPES["cls"], TOKEN_TYPES["visit_start"], TOKEN_TYPES["lab"]]
    assert tok.event_index == [-1, -1, 0, 1, 2, -1, -1, -1, 3, 4, -1]
    assert tok.ages[2] == pytest.approx((T0 + timedelta(hours=1) - datetime(1960, 1, 1, tzinfo=timezone.utc)).total_seconds() / (365.25 * 86400))


def test_fhir_bundle_to_timeline_to_tokens(tmp_path: Path):
    import json

    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p", "birthDate": "1970-06-01"}},
        {"fullUrl": "urn:uuid:e1", "resource": {"resourceType": "Encounter", "id": "e1", "status": "finished",
         "class": {"code": "IMP"}, "subject": {"reference": "urn:uuid:p"},
         "period": {"start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00Z"}}},
        {"fullUrl": "urn:uuid:c1", "resource": {"resourceType": "Condition", "id": "c1", "subject": {"reference": "urn:uuid:p"},
         "encounter": {"reference": "urn:uuid:e1"}, "onsetDateTime": "2020-01-01T06:00:00Z",
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}}},
        {"fullUrl": "urn:uuid:o1", "resource": {"resourceType": "Observation", "id": "o1", "status": "final",
         "subject": {"reference": "urn:uuid:p"}, "encounter": {"reference": "urn:uuid:e1"},
         "effectiveDateTime": "2020-01-01T07:00:00Z", "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
         "valueQuantity": {"value": 8.1, "unit": "%"}}},
        {"fullUrl": "urn:uuid:e2", "resource": {"resourceType": "Encounter", "id": "e2", "status": "finished",
         "class": {"code": "AMB"}, "subject": {"reference": "urn:uuid:p"},
         "period": {"start": "2020-03-01T00:00:00Z", "end": "2020-03-01T01:00:00Z"}}},
        {"fullUrl": "urn:uuid:m1", "resource": {"resourceType": "MedicationRequest", "id": "m1", "status": "active",
         "intent": "order", "subject": {"reference": "urn:uuid:p"}, "encounter": {"reference": "urn:uuid:e2"},
         "authoredOn": "2020-03-01T00:30:00Z",
         "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975"}]}}},
    ]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(bundle))
    tables = ingest_fhir([path])
    assert (tables.patients.height, tables.visits.height, tables.events.height, tables.refused.height) == (1, 2, 3, 0)
    timeline = next(tables.timelines())
    tok = EHRTokenizer().fit([timeline]).tokenize(timeline)
    # 2020-01-02 -> 2020-03-01 is 59 days: month 1
    assert tok.tokens == [CLS, "[VS]", "SNOMED/44054006", "LOINC/4548-4_Q0", "[VE]", "[M_1]", "[VS]", "RXNORM/860975", "[VE]"]


def test_save_load_identity(tokenizer: EHRTokenizer, tmp_path: Path):
    tokenizer.save(tmp_path / "tok")
    loaded = EHRTokenizer.load(tmp_path / "tok")
    assert loaded.vocab == tokenizer.vocab and loaded.bin_edges == tokenizer.bin_edges
    a = tokenizer.encode(tokenizer.tokenize(_timeline()))
    b = loaded.encode(loaded.tokenize(_timeline()))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # The Hugging Face fast tokenizer reads the same ids from the text form.
    text = " ".join(tokenizer.tokenize(_timeline()).tokens)
    assert loaded.hf_tokenizer()(text)["input_ids"] == a["input_ids"].tolist()


def test_unknown_codes_map_to_unk(tokenizer: EHRTokenizer):
    tl = _timeline()
    tl.events.append(Event(T0 + timedelta(days=14), "diagnosis", "ICD10CM", "Z99.9", visit_id="v2"))
    tl.events.sort(key=lambda e: e.time)
    enc = tokenizer.encode(tokenizer.tokenize(tl))
    unk = tokenizer.vocab[UNK]
    assert (enc["input_ids"] == unk).sum() == 1
    assert enc["type_ids"][enc["input_ids"] == unk][0] == TOKEN_TYPES["unk"]


def test_truncation_keeps_head_and_most_recent(tokenizer: EHRTokenizer):
    enc = tokenizer.encode(tokenizer.tokenize(_timeline(), task="readmission_30d"), max_length=4)
    assert enc["input_ids"][0] == tokenizer.vocab[TASK_TOKENS["readmission_30d"]]
    full = tokenizer.encode(tokenizer.tokenize(_timeline(), task="readmission_30d"))
    np.testing.assert_array_equal(enc["input_ids"][1:], full["input_ids"][-3:])


def test_cutoff_drops_later_events_and_leaves_open_visit_open(tokenizer: EHRTokenizer):
    tok = tokenizer.tokenize(_timeline(), cutoff=T0 + timedelta(hours=24))
    assert tok.tokens == [CLS, "[VS]", "LOINC/2345-7_Q0", "LOINC/2345-7_Q1"]  # no [VE]: the stay is ongoing


def test_tasks_on_synthetic_timeline():
    tl = dataclasses.replace(_timeline(), death_time=T0 + timedelta(days=40))
    samples = {(s.task, s.visit_id): s for s in derive_task_samples(tl, list(TASK_TOKENS), dx_groups=["ICD10:I", "ICD10:E"])}
    assert samples[("los_gt_7d", "v1")].labels == (0.0,)
    assert samples[("mortality_inhospital", "v1")].cutoff == T0 + timedelta(hours=24)
    assert samples[("readmission_30d", "v1")].labels == (1.0,)  # v2 starts 10 days after discharge
    assert samples[("next_visit_dx", "v1")].labels == (1.0, 0.0)  # v2 has I10, no E code
    assert samples[("mortality_30d", "v2")].labels == (1.0,)  # death 25 days after v2 ends
    assert ("next_visit_dx", "v2") not in samples


@pytest.fixture(scope="module")
def mimic_timelines(mimic_iv_demo_path: Path):
    return list(ingest_mimic(mimic_iv_demo_path).timelines())


def test_no_event_after_prediction_time_reaches_the_input(mimic_timelines):
    """Every task's input on real MIMIC data only holds events up to its cutoff; a planted later event changes nothing."""
    split = split_patients([t.patient_id for t in mimic_timelines])
    train = [t for t in mimic_timelines if split[t.patient_id] == "train"]
    tok = EHRTokenizer().fit(train)
    groups = frequent_dx_groups(train)
    by_id = {t.patient_id: t for t in mimic_timelines}
    n_checked = 0
    for tl in mimic_timelines[:12]:
        for s in derive_task_samples(tl, list(TASK_TOKENS), groups):
            tokd = tok.tokenize(tl, cutoff=s.cutoff, task=s.task)
            times = [tl.events[i].time for i in tokd.event_index if i >= 0]
            assert all(t <= s.cutoff for t in times)
            assert max(tokd.time_stamps) <= (s.cutoff - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds() / 86400 + 1e-3
            # Plant a strongly predictive event right after the cutoff: the input must not change.
            planted = dataclasses.replace(by_id[tl.patient_id], events=sorted(
                tl.events + [Event(s.cutoff + timedelta(seconds=1), "diagnosis", "ICD10CM", "R99", visit_id=s.visit_id)],
                key=lambda e: e.time))
            again = tok.tokenize(planted, cutoff=s.cutoff, task=s.task)
            assert again.tokens == tokd.tokens
            n_checked += 1
    assert n_checked > 25


def test_vocabulary_comes_from_training_patients_only(mimic_timelines):
    split = split_patients([t.patient_id for t in mimic_timelines])
    assert set(split.values()) == {"train", "val", "test"}
    train = [t for t in mimic_timelines if split[t.patient_id] == "train"]
    test = [t for t in mimic_timelines if split[t.patient_id] == "test"]
    tok = EHRTokenizer().fit(train)
    train_concepts = {tok.event_token(e) for t in train for e in t.events}
    test_only = {tok.event_token(e) for t in test for e in t.events} - train_concepts
    assert test_only, "the split should leave some codes unseen in training"
    assert not test_only & set(tok.vocab)
