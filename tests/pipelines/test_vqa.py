"""The VQA evaluation job (conditions, CIs, resume) on real VQA-RAD."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from medai.pipelines.vqa import VQAEvalConfig, evaluate_vqa_rad
from tests.models.tiny_vlms import tiny_lm_path, tiny_vlm  # noqa: F401


def test_yes_no_profile_separates_a_prior_from_reading():
    from medai.pipelines.vqa import yes_no_profile

    items = [SimpleNamespace(is_closed=True, answer_norm=a) for a in ("yes", "yes", "no", "no", "left")]
    always_no = yes_no_profile(items, ["No", "no.", "No", "no", "left"])
    assert always_no == {"n": 4, "yes_rate": 0.0, "acc_when_yes": 0.0, "acc_when_no": 100.0}
    reads = yes_no_profile(items, ["Yes, there is", "yes", "no", "No", "right"])
    assert reads == {"n": 4, "yes_rate": 50.0, "acc_when_yes": 100.0, "acc_when_no": 100.0}


def test_evaluation_job_runs_all_conditions_and_resumes(tiny_vlm, vqa_rad_path, tmp_path):
    cfg = VQAEvalConfig(data_root=vqa_rad_path, out_dir=tmp_path, limit=6, batch_size=3, max_new_tokens=2, n_boot=50)
    cfg.conditions.append("blind_trained")
    with pytest.raises(ValueError, match="question-only model"):
        evaluate_vqa_rad(tiny_vlm, cfg)
    results = evaluate_vqa_rad(tiny_vlm, cfg, blind_model=tiny_vlm)
    assert results["n_test"] == 6
    for condition in ("majority", "image", "blank", "noise", "blind", "image+vcd", "blind_trained"):
        acc = results["conditions"][condition]["closed_acc"]
        assert 0 <= acc["ci_low"] <= acc["value"] <= acc["ci_high"] <= 100
    assert {"image - blind", "image - blind_trained", "image+vcd - blind_trained"} <= set(results["paired_closed_acc"])
    lines = (tmp_path / "predictions_image.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all("prediction" in json.loads(x) for x in lines)
    assert "MEVF+BAN" in (tmp_path / "summary.md").read_text()
    assert "| image | " in (tmp_path / "summary.md").read_text().split("says yes")[1]
    for condition in ("majority", "image", "blind_trained"):
        profile = results["conditions"][condition]["yes_no"]
        assert profile["n"] >= 1 and 0 <= profile["yes_rate"] <= 100
    evaluate_vqa_rad(tiny_vlm, cfg, blind_model=tiny_vlm)  # resumes: nothing is answered twice
    assert len((tmp_path / "predictions_image.jsonl").read_text().splitlines()) == 6
    cfg.model_source = "runs/another/checkpoints/best"  # another model must not inherit these predictions
    with pytest.raises(ValueError, match="predictions_image.jsonl holds predictions of"):
        evaluate_vqa_rad(tiny_vlm, cfg, blind_model=tiny_vlm)


def test_templated_evaluation_scores_each_condition(tiny_vlm, breastmnist_path, tmp_path):
    import itertools

    from medai.pipelines.templated_vqa import breastmnist_questions
    from medai.pipelines.vqa import evaluate_templated

    questions = list(itertools.islice(breastmnist_questions(breastmnist_path), 4))
    results = evaluate_templated(tiny_vlm, questions, ("image", "blank", "blind", "blind_trained"), max_new_tokens=2,
                                 n_boot=20, blind_model=tiny_vlm, out_dir=tmp_path)
    assert results["templated"] and results["n"] == 4
    assert json.loads((tmp_path / "summary.json").read_text()) == results
    for condition in ("majority", "image", "blank", "blind", "blind_trained"):
        m = results["conditions"][condition]
        assert 0 <= m["ci_low"] <= m["accuracy"] <= m["ci_high"] <= 100
        assert set(m["per_template"]) == {"breastmnist_malignant"}
    majority = "yes" if [q.answer for q in questions].count("yes") > 2 else "no"
    assert results["conditions"]["majority"]["accuracy"] == 100 * np.mean([q.answer == majority for q in questions])
    from medai.pipelines.vqa import format_templated

    assert "| blind_trained |" in format_templated(results)
    assert (tmp_path / "summary.md").read_text() == format_templated(results)
