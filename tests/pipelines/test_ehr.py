"""EHR jobs: prepared task data on the real MIMIC demo, per-task metrics, explanations, the experiment
(pipelines/ehr_data.py, tasks/ehr.py, ehr_baselines.py, ehr_experiment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medai.pipelines.ehr_data import (
    EHRDataOptions,
    PreparedEHR,
    classifier_layout,
    encode_sample,
    prepare_ehr,
    pretraining_windows,
    task_counts,
)
from medai.pipelines.ehr_experiment import explain_sample
from medai.pipelines.tasks.ehr import multitask_metrics
from medai.transforms.ehr import CLS, TASK_TOKENS, EHRTokenizer

TASKS = ["mortality_inhospital", "los_gt_7d", "readmission_30d", "next_visit_dx"]


@pytest.fixture(scope="module")
def prepared(mimic_iv_demo_path: Path, tmp_path_factory) -> PreparedEHR:
    out = tmp_path_factory.mktemp("prepared")
    return prepare_ehr([mimic_iv_demo_path], EHRDataOptions(tasks=TASKS, max_length=64), out_dir=out)


def test_multitask_metrics_hand_computed():
    layout = classifier_layout(["los_gt_7d", "next_visit_dx"], ["g1", "g2"])
    assert layout == {"los_gt_7d": (0, 1), "next_visit_dx": (1, 3)}
    preds = {
        "task_index": np.array([0, 0, 0, 0, 1, 1, 1]),
        "targets": np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]], float),
        # los: positives 0.9, 0.4; negatives 0.5, 0.1 -> 3 of 4 pairs ordered: AUROC 0.75
        "probs": np.array([[0.9, 0, 0], [0.5, 0, 0], [0.4, 0, 0], [0.1, 0, 0],
                           [0, 0.8, 0.1], [0, 0.2, 0.9], [0, 0.7, 0.3]]),
    }
    m = multitask_metrics(preds, layout)
    assert m["los_gt_7d_auroc"] == pytest.approx(0.75)
    # g1: positives .8,.7 vs negative .2 -> 1.0; g2: positives .9,.3 vs negative .1 -> 1.0
    assert m["next_visit_dx_auroc"] == pytest.approx(1.0)
    assert m["mean_auroc"] == pytest.approx(0.875)


def test_prepared_splits_layout_and_artifacts(prepared: PreparedEHR, tmp_path_factory):
    splits = prepared.splits
    assert set(splits.values()) == {"train", "val", "test"} and len(splits) == 100
    for split in ("train", "val", "test"):  # stratified: deaths reach every split
        assert any(prepared.timelines[p].death_time is not None for p, s in splits.items() if s == split)
    counts = task_counts(prepared)
    assert set(counts) == set(TASKS)
    assert sum(n for n, _ in counts["mortality_inhospital"].values()) == 244
    assert sum(p for _, p in counts["mortality_inhospital"].values()) == 14
    assert list(prepared.layout) == TASKS and prepared.num_labels == 3 + len(prepared.dx_groups)


def test_encoded_sample_has_task_token_and_only_its_targets(prepared: PreparedEHR):
    sample = next(s for s in prepared.samples if s.task == "readmission_30d")
    enc = encode_sample(prepared, sample)
    assert enc["input_ids"][0] == prepared.tokenizer.vocab[TASK_TOKENS["readmission_30d"]]
    assert len(enc["input_ids"]) <= 64
    start, stop = prepared.layout["readmission_30d"]
    assert enc["target_mask"].sum() == stop - start and enc["target_mask"][start] == 1
    tl = prepared.timelines[sample.patient_id]
    assert all(tl.events[i].time <= sample.cutoff for i in enc["event_index"] if i >= 0)


def test_pretraining_windows_cover_train_patients_only(prepared: PreparedEHR):
    windows = pretraining_windows(prepared, "train")
    cls = prepared.tokenizer.vocab[CLS]
    assert windows and all(w["input_ids"][0] == cls and len(w["input_ids"]) <= 64 for w in windows)
    n_train_tokens = sum(len(EHRTokenizer.tokenize(prepared.tokenizer, tl)) - 1
                         for p, tl in prepared.timelines.items() if prepared.splits[p] == "train")
    assert sum(len(w["input_ids"]) - 1 for w in windows) == n_train_tokens  # every token once


def test_integrated_gradients_are_complete_and_map_to_events(prepared: PreparedEHR):
    from medai.models import create_model

    torch.manual_seed(0)
    model = create_model("ehr_transformer_small", vocab_size=len(prepared.tokenizer), num_labels=prepared.num_labels,
                         d_model=32, n_layers=1, n_heads=4, time_embeddings_size=8, dropout=0.0).eval()
    sample = next(s for s in prepared.samples_of("test") if s.task == "mortality_inhospital")
    rows = explain_sample(model, prepared, sample, steps=64)
    batch_tokens = [r["token"] for r in rows]
    assert batch_tokens[0] == TASK_TOKENS["mortality_inhospital"]
    events = [r for r in rows if "code" in r]
    assert events and all(r["time"] <= sample.cutoff for r in events)
    total = sum(r["attribution"] for r in rows)
    from medai.transforms.ehr import pad_batch

    enc = prepared.tokenizer.encode(prepared.tokenizer.tokenize(prepared.timelines[sample.patient_id],
                                                                cutoff=sample.cutoff, task=sample.task), 64)
    batch = pad_batch([enc])
    with torch.no_grad():
        f_x = float(model.classify(batch)[0, 0])
        emb = model.embeddings.concept_embeddings(batch["input_ids"])
        f_0 = float(model.classify(batch, concept_embeds=torch.zeros_like(emb))[0, 0])
    assert total == pytest.approx(f_x - f_0, abs=0.02 + 0.05 * abs(f_x - f_0))


@pytest.mark.slow
def test_experiment_runs_end_to_end(mimic_iv_demo_path: Path, tmp_path: Path):
    from medai.pipelines.ehr_experiment import EHRExperimentConfig, NeuralModelSpec, StageSpec, run_ehr_experiment

    cfg = EHRExperimentConfig(
        data_path=mimic_iv_demo_path, options={"tasks": TASKS, "max_length": 32},
        models=[NeuralModelSpec("ehr_transformer_small", {"d_model": 32, "n_layers": 1, "n_heads": 4})],
        pretrain=StageSpec(epochs=1, limit_train_batches=2), finetune=StageSpec(epochs=1, limit_train_batches=3),
        n_boot=20, output_dir=tmp_path,
    )
    results = run_ehr_experiment(cfg)
    assert set(results["models"]) == {"ehr_transformer_small", "logistic_regression", "gradient_boosting"}
    for model in results["models"].values():
        assert {"los_gt_7d_auroc", "mean_auroc"} <= set(model["test"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert "explanation" in report and (tmp_path / "explanation.md").is_file()
    assert "los_gt_7d AUROC" in (tmp_path / "report.md").read_text()
