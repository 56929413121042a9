"""MIL task on the shared engine, cross-validation splits, attention maps, benchmark runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medai.models import registry as models
from medai.pipelines.mil_heatmaps import attention_grid, attention_maps, save_attention_maps
from medai.io.datasets import load_dataset
from medai.io.datasets.bags import bag_splits, stratified_cv_split
from medai.pipelines.tasks.mil import collate_bags


def test_cv_splits_are_disjoint_stratified_and_cover_every_bag(mil_classic_path):
    labels = np.array([b.label for b in load_dataset(mil_classic_path / "musk1" / "musk1.mat", kind="bags").items])
    tests = []
    for fold in range(10):
        split = stratified_cv_split(labels, 10, fold, seed=0, val_fraction=0.1)
        parts = [set(split[k].tolist()) for k in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(set.union(*parts)) == len(labels)
        assert abs(labels[split["test"]].mean() - labels.mean()) < 0.15
        tests += split["test"].tolist()
    assert sorted(tests) == list(range(len(labels)))  # every bag is tested exactly once
    assert not np.array_equal(stratified_cv_split(labels, 10, 0, 1, 0.1)["test"], stratified_cv_split(labels, 10, 0, 0, 0.1)["test"])


def test_batches_keep_bags_unpadded():
    items = [(torch.zeros(3, 4), torch.tensor([1]), 0), (torch.zeros(7, 4), torch.tensor([0]), 5)]
    batch = collate_bags(items)
    assert [b[0].shape[0] for b in batch] == [3, 7] and batch[1][2].item() == 5


def test_engine_trains_and_evaluates_a_mil_fold(mil_classic_path, tmp_path):
    from medai.pipelines.finetune import finetune
    from medai.pipelines.train_config import DataConfig, ModelConfig, TrainConfig, TrainerConfig

    cfg = TrainConfig(
        task="mil",
        model=ModelConfig(name="acmil_aem", kwargs={"hidden_features": 32, "attention_features": 16}),
        data=DataConfig(path=mil_classic_path / "musk1" / "musk1.mat", batch_size=1,
                        options={"folds": 5, "fold": 1, "standardize": True}),
        trainer=TrainerConfig(epochs=2, n_boot=20, deterministic=False),
        output_dir=tmp_path,
        run_name="musk1",
    )
    result = finetune(cfg)
    assert len(result.history) == 2 and "val_selection_score" in result.history[-1]
    report = result.test_report
    assert report["n_items"] == 19  # one fifth of 92 bags (stratified)
    for name in ("auroc", "balanced_accuracy", "f1", "auroc_plus_f1"):
        assert np.isfinite(report["metrics"][name]["value"])


@pytest.mark.parametrize("name", ["acmil", "transmil"])
def test_attention_maps_cover_every_patch(name, mil_sicapv2_128d_path, tmp_path):
    from medai.io.mil_bags import read_sicapv2_bags

    bag = read_sicapv2_bags(mil_sicapv2_128d_path)[0]
    kwargs = {"dim": 32, "heads": 4, "landmarks": 16} if name == "transmil" else {}
    model = models.create_model(name, in_features=128, **kwargs)
    model.train()  # attention maps are always taken in eval mode, without STKIM masking
    maps = attention_maps(model, bag.features, bag.coords, top_k=5)
    assert model.training, "the model's mode is restored"
    k = 5 if name == "acmil" else 1
    assert maps.branch_scores.shape == (k, bag.num_instances)
    np.testing.assert_allclose(maps.branch_scores.sum(axis=1), 1.0, rtol=1e-5)
    best = maps.branch_scores[0, maps.top_indices[0]]
    assert np.all(np.diff(best) <= 0) and best[0] == maps.branch_scores[0].max()
    path = save_attention_maps(maps, tmp_path / "bag.npz", model=name)
    saved = np.load(path)
    np.testing.assert_array_equal(saved["coords"], bag.coords)
    grid = attention_grid(maps.slide_scores, bag.coords)
    assert np.isfinite(grid).sum() == bag.num_instances  # one cell per patch, none overwritten


def test_attention_maps_of_a_large_bag_are_chunked():
    model = models.create_model("abmil", in_features=16).eval()
    features = torch.randn(150_000, 16)
    maps = attention_maps(model, features)
    assert maps.branch_scores.shape == (1, 150_000)
    np.testing.assert_allclose(maps.branch_scores.sum(), 1.0, rtol=1e-4)


@pytest.mark.slow
def test_benchmark_runner_writes_a_table(mil_classic_path, tmp_path):
    from medai.pipelines.mil_benchmark import BenchmarkSettings, run_mil_benchmark

    settings = BenchmarkSettings(models=("abmil",), folds=3, seeds=(0,), epochs=1, n_boot=50)
    results = run_mil_benchmark(mil_classic_path / "musk1" / "musk1.mat", settings, tmp_path)
    assert 0.0 <= results["models"]["abmil"]["per_seed"][0]["accuracy"]["value"] <= 1.0
    assert "| abmil | 0 |" in (tmp_path / "results.md").read_text()


def test_fast_binary_metrics_equal_scikit_learn():
    from medai.pipelines.metrics import classification_metrics
    from medai.pipelines.mil_benchmark import HEADLINE, headline_metrics

    rng = np.random.default_rng(0)
    for n in (5, 30, 200):
        target = rng.integers(0, 2, n)
        prob = rng.dirichlet([1, 1], n)
        prob[: n // 4, 1] = prob[n // 4 : 2 * (n // 4), 1]  # ties in the scores
        prob[:, 0] = 1 - prob[:, 1]
        fast = headline_metrics({"prob": prob, "target": target}, "binary")
        slow = classification_metrics(target, prob, "binary")
        for name in HEADLINE:
            assert fast[name] == pytest.approx(slow[name], abs=1e-12), name


def test_medmnist_bags_keep_official_splits_apart(breastmnist_path, tmp_path):
    from medai.io.medmnist import load_medmnist
    from medai.pipelines.mil_benchmark import BenchmarkSettings, run_mil_benchmark
    options = {"format": "medmnist_bags", "n_bags": 120, "bag_size": 6, "positive_class": 0}
    dataset = load_dataset(breastmnist_path, kind="bags", **options)
    bags = dataset.items
    splits = bag_splits(dataset, folds=10, fold=3)  # folds do not apply to the images' own split
    data = load_medmnist(breastmnist_path)
    sizes = {name: len(split.labels) for name, split in data.splits.items()}
    for name, index in splits.items():
        assert {bags[i].meta["split"] for i in index} == {name}
        assert all(bags[i].bag_id.startswith(f"{name}_bag") for i in index)
        assert abs(len(index) - 120 * sizes[name] / sum(sizes.values())) <= 1
        for i in index:  # every instance is an image of that split only: no image is in a train and a test bag
            expected = data.splits[name].images[bags[i].meta["image_indices"]].reshape(len(bags[i].features), -1)
            np.testing.assert_allclose(bags[i].features, expected / 255.0, rtol=1e-6)
    settings = BenchmarkSettings(models=("abmil",), folds=10, seeds=(0,), epochs=1, n_boot=20, standardize=False,
                                 data_options=options)
    results = run_mil_benchmark(breastmnist_path, settings, tmp_path)
    assert results["split"] == "fixed" and results["settings"]["folds"] == 1
    assert results["n_test_bags"] == len(splits["test"])
    assert "own train/val/test split" in (tmp_path / "results.md").read_text()
