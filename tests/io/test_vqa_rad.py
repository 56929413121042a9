"""VQA-RAD loading on the real annotation file: official split, defects fixed, no test leakage."""

from __future__ import annotations

import json

import pytest

from medai.errors import DatasetNotFoundError
from medai.io.vqa_rad import VQADatasetError, load_vqa_rad, majority_answers, normalize_answer


def test_official_split_counts_and_cleaning(vqa_rad_path):
    items = load_vqa_rad(vqa_rad_path)
    test = [it for it in items if it.split == "test"]
    train = [it for it in items if it.split == "train"]
    assert len(test) == 451
    assert sum(it.is_closed for it in test) == 272 and sum(not it.is_closed for it in test) == 179
    # 1,797 published train pairs minus 3 repeated triplets and 1 copy of a test triplet
    assert len(train) == 1793
    assert {it.answer_type for it in items} == {"CLOSED", "OPEN"}  # "CLOSED " fixed
    test_triplets = {(it.image_path.name, it.question.lower(), it.answer_norm) for it in test}
    assert not any((it.image_path.name, it.question.lower(), it.answer_norm) in test_triplets for it in train)
    assert all(it.image_path.is_file() for it in items[:20])


def test_answers_are_normalised_and_majority_from_train(vqa_rad_path):
    train = load_vqa_rad(vqa_rad_path, "train")
    assert all(it.answer_norm == it.answer_norm.lower() for it in train)
    assert normalize_answer("Yes.") == "yes" and normalize_answer(" The  Left lung ") == "left lung"
    assert normalize_answer(3) == "3"
    assert majority_answers(train)["CLOSED"] in ("yes", "no")


def test_malformed_annotation_files_name_the_record(tmp_path):
    with pytest.raises(DatasetNotFoundError):
        load_vqa_rad(tmp_path)
    (tmp_path / "VQA_RAD Dataset Public.json").write_text("{not json")
    with pytest.raises(VQADatasetError, match="not valid JSON"):
        load_vqa_rad(tmp_path)
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps([{"qid": 7, "question": "q"}]))
    with pytest.raises(VQADatasetError, match=r"record 7.*missing keys"):
        load_vqa_rad(tmp_path)
    rec = {"qid": 8, "phrase_type": "freeform", "image_name": "x.jpg", "question": "q", "answer": "yes",
           "answer_type": "MAYBE"}
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps([rec]))
    with pytest.raises(VQADatasetError, match="neither CLOSED nor OPEN"):
        load_vqa_rad(tmp_path)
    rec["answer_type"] = "OPEN"
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps([rec]))
    with pytest.raises(VQADatasetError, match="x.jpg not found"):
        load_vqa_rad(tmp_path)
