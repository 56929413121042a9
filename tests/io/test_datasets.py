"""The dataset-format registry: every registered format read from real shared files, detection, splits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medai.io.datasets import check_format, format_names, load_dataset
from medai.io.datasets.bags import bag_splits, stratified_cv_split
from medai.io.datasets.volumes import make_split, read_split
from medai.io.medmnist import DatasetFormatError

SPLIT_FILE = Path("configs/splits/msd_task04_hippocampus.json")
# Each registered format is read from real files by a test below; a new format without one fails here.
TESTED = {"medmnist", "image_csv", "mil_toolbox", "bag_csv", "sicapv2", "clam_h5", "medmnist_bags", "nifti_pairs",
          "vqa_rad", "ehr_timelines"}


def test_every_registered_format_is_tested_here():
    assert set(format_names()) == TESTED
    assert format_names("images") == ["image_csv", "medmnist"]


def test_medmnist_by_name_and_pattern_keeps_official_splits_as_views(shared_data, breastmnist_path):
    by_name = load_dataset("breastmnist", kind="images")  # a shared dataset's name
    data = load_dataset(breastmnist_path, kind="images")  # *.npz read as images
    assert by_name.path == data.path and data.format == "medmnist"
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 546, "val": 78, "test": 156}
    assert {k: data.meta[k] for k in ("task", "num_classes", "channels", "spatial_dims")} == {
        "task": "binary", "num_classes": 2, "channels": 1, "spatial_dims": 2}
    val = data.split("val")
    assert np.shares_memory(val.images, data.items.images) and not val.from_files  # a view, not a copy
    with np.load(breastmnist_path) as archive:
        np.testing.assert_array_equal(val.images, archive["val_images"])
        np.testing.assert_array_equal(data.split("test").labels[:, 0], archive["test_labels"][:, 0])


def test_image_csv_reads_real_images_with_named_labels_and_splits(breastmnist_path, tmp_path):
    from PIL import Image

    with np.load(breastmnist_path) as archive:
        images, labels = archive["train_images"][:6], archive["train_labels"][:6, 0]
    rows = [["file", "diagnosis", "fold"]]
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        rows.append([f"{i}.png", ["malignant", "benign"][label], "val" if i == 4 else "test" if i == 5 else ""])
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    data = load_dataset(tmp_path / "labels.csv", kind="images", image_column="file", label_column="diagnosis",
                        split_column="fold")
    assert data.format == "image_csv" and list(data.splits) == ["train", "val", "test"]
    assert data.meta["class_names"] == ["benign", "malignant"] and data.meta["task"] == "binary"
    train = data.split("train")
    assert train.from_files and [p.name for p in train.images] == ["0.png", "1.png", "2.png", "3.png"]
    np.testing.assert_array_equal(train.labels[:, 0], 1 - labels[:4])  # benign (label 1) is class 0 by name


def test_mil_toolbox_bags_have_no_own_split_and_get_cross_validation(mil_classic_path):
    data = load_dataset(mil_classic_path / "musk1" / "musk1.mat", kind="bags")
    assert data.format == "mil_toolbox" and data.splits == {}
    assert len(data.items) == 92 and sum(b.num_instances for b in data.items) == 476
    assert data.meta == {"num_classes": 2, "in_features": 166}
    labels = np.array([b.label for b in data.items])
    for key, index in bag_splits(data, folds=10, fold=2, seed=1).items():
        np.testing.assert_array_equal(index, stratified_cv_split(labels, 10, 2, 1, 0.1)[key])


def test_bag_csv_and_clam_h5_hold_the_same_real_bags(mil_classic_path, tmp_path):
    import h5py

    bags = load_dataset(mil_classic_path / "musk1" / "musk1.mat", "mil_toolbox").items[:6]
    rows = [["bag_id", "label", *(f"f{j}" for j in range(bags[0].features.shape[1]))]]
    rows += [[b.bag_id, b.label, *x] for b in bags for x in b.features.tolist()]
    with open(tmp_path / "bags.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    folder = tmp_path / "features"
    folder.mkdir()
    for b in bags:
        with h5py.File(folder / f"{b.bag_id}.h5", "w") as handle:
            handle["features"] = b.features
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"{b.bag_id},{b.label}\n" for b in bags))
    (tmp_path / "splits.csv").write_text("slide_id,split\n" + "".join(
        f"{b.bag_id},{['train', 'train', 'train', 'train', 'val', 'test'][i]}\n" for i, b in enumerate(bags)))
    from_csv = load_dataset(tmp_path / "bags.csv", kind="bags")
    from_h5 = load_dataset(folder, kind="bags", labels_csv=tmp_path / "labels.csv", splits_csv=tmp_path / "splits.csv")
    assert (from_csv.format, from_h5.format) == ("bag_csv", "clam_h5")
    for read in (from_csv.items, from_h5.items):
        assert [(b.bag_id, b.label) for b in read] == [(b.bag_id, b.label) for b in bags]
        for got, want in zip(read, bags):
            np.testing.assert_allclose(got.features, want.features, rtol=1e-6)
    assert {k: v.tolist() for k, v in from_h5.splits.items()} == {"train": [0, 1, 2, 3], "val": [4], "test": [5]}
    with pytest.raises(ValueError, match="labels_csv"):
        load_dataset(folder, kind="bags")


def test_sicapv2_folder_is_detected(mil_sicapv2_128d_path):
    data = load_dataset(mil_sicapv2_128d_path, kind="bags")
    assert data.format == "sicapv2" and len(data.items) == 30
    assert sum(b.num_instances for b in data.items) == 2713 and sum(b.label for b in data.items) == 21
    assert all(b.coords is not None for b in data.items)


def test_medmnist_bags_keep_the_images_official_splits(breastmnist_path):
    data = load_dataset(breastmnist_path, kind="bags", n_bags=60, bag_size=4)  # *.npz read as bags
    assert data.format == "medmnist_bags" and data.meta["in_features"] == 28 * 28
    for name, index in data.splits.items():
        assert {data.items[i].meta["split"] for i in index} == {name}
    assert bag_splits(data, folds=5, fold=4) is data.splits  # the bags' own split wins over cross-validation


def test_nifti_pairs_with_the_committed_split(msd_hippocampus_path):
    data = load_dataset(msd_hippocampus_path, kind="volumes", split_file=SPLIT_FILE, labels={1: "anterior", 2: "posterior"})
    committed = read_split(SPLIT_FILE)
    assert data.format == "nifti_pairs" and data.meta["split"]["source"] == str(SPLIT_FILE)
    assert [r["case"] for r in data.split("val")] == committed["val"]
    record = data.split("train")[0]
    assert record["case"] == committed["train"][0] and Path(record["label"]).parent.name == "labels"


def test_committed_split_is_reproducible_and_disjoint(msd_hippocampus_path):
    committed = read_split(SPLIT_FILE)
    assert committed == make_split(msd_hippocampus_path, committed["val_fraction"], committed["seed"])
    assert len(committed["train"]) == 160 and len(committed["val"]) == 40
    assert not set(committed["train"]) & set(committed["val"])


def test_overlapping_split_is_refused(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a", "b"], "val": ["b"]}))
    with pytest.raises(ValueError, match="both train and val"):
        read_split(path)


def test_vqa_rad_validation_holds_out_whole_training_images(vqa_rad_path):
    data = load_dataset(vqa_rad_path, kind="vqa", val_fraction=0.1, seed=0)
    train, val, test = (data.split(name) for name in ("train", "val", "test"))
    assert data.format == "vqa_rad" and len(test) == 451 and val
    assert {it.split for it in train + val} == {"train"} and {it.split for it in test} == {"test"}
    assert not {it.image_path.name for it in train} & {it.image_path.name for it in val}
    assert {it.image_path.name for it in val} == set(data.meta["held_out_images"])
    other = load_dataset(vqa_rad_path, "vqa_rad", val_fraction=0.1, seed=1)
    assert other.meta["held_out_images"] != data.meta["held_out_images"]  # the run's seed draws it


def test_ehr_timelines_are_split_by_patient_and_stratified_by_death(mimic_iv_demo_path):
    data = load_dataset(mimic_iv_demo_path, kind="ehr", split_fractions=(0.6, 0.2, 0.2), split_seed=0)
    assert data.format == "ehr_timelines" and len(data.items) == 100
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 60, "val": 20, "test": 20}
    for index in data.splits.values():  # the 15 deaths reach every split
        assert any(data.items[i].death_time is not None for i in index)


def test_unknown_format_and_no_match_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown images dataset format 'npz'"):
        check_format("npz", "images")
    with pytest.raises(ValueError, match="unknown bags dataset format 'medmnist'"):  # a format of another kind
        check_format("medmnist", "bags")
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(DatasetFormatError, match="no images dataset format matches"):
        load_dataset(tmp_path / "notes.txt", kind="images")
