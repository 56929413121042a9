"""Multiple-instance bags: MIL-toolbox `.mat`, bag CSV, SICAPv2 tables, CLAM HDF5 folders, MedMNIST-bags.

Items are `MILBag` records (medai.io.mil_bags). A dataset's own split comes from a
`slide_id,split` file (`splits_csv`) or from the bags themselves (MedMNIST-bags keep the
official image splits); bags without one get `splits == {}`, and the caller draws stratified
k-fold cross-validation splits with `bag_splits`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medai.io.datasets.base import DatasetSplits, file_named, folder_with, register_format
from medai.io.mil_bags import MILBag, MILDataError


def _bag_dataset(name: str, path: Path, bags: list[MILBag], splits_csv: Path | None) -> DatasetSplits:
    """Bags with their own split (a splits CSV first, else the bags' meta "split"); meta: classes, feature width."""
    from medai.io.mil_bags import read_splits

    if not bags:
        raise MILDataError(path, "no bags")
    splits: dict[str, np.ndarray] = {}
    if splits_csv is not None:
        by_id = {b.bag_id: i for i, b in enumerate(bags)}
        named = read_splits(splits_csv)
        missing = [s for ids in named.values() for s in ids if s not in by_id]
        if missing:
            raise MILDataError(splits_csv, f"slides without bags: {missing[:5]}")
        splits = {k: np.array([by_id[s] for s in ids], dtype=int) for k, ids in named.items()}
    elif all(b.meta.get("split") for b in bags):
        named_per_bag = np.array([b.meta["split"] for b in bags])
        splits = {k: np.flatnonzero(named_per_bag == k) for k in ("train", "val", "test")}
        if not len(splits["train"]) or not len(splits["test"]):
            raise MILDataError(path, f"bags carry their split, but train or test is empty: {sorted(set(named_per_bag))}")
    labels = np.array([b.label for b in bags])
    meta = {"num_classes": int(max(2, labels.max() + 1)), "in_features": int(bags[0].features.shape[1])}
    return DatasetSplits(name, path, bags, splits, meta)


@register_format("mil_toolbox", kind="bags", matches=file_named("*.mat"))
def mil_toolbox(path: Path, splits_csv: Path | None = None) -> DatasetSplits:
    """A MIL-toolbox `.mat` set (Musk, Fox, Tiger): label 1 = positive."""
    from medai.io.mil_bags import read_mil_toolbox_mat

    return _bag_dataset("mil_toolbox", path, read_mil_toolbox_mat(path), splits_csv)


@register_format("bag_csv", kind="bags", matches=file_named("*.csv"))
def bag_csv(path: Path, splits_csv: Path | None = None) -> DatasetSplits:
    """A bag CSV (one instance per row: bag_id, label, feature columns)."""
    from medai.io.mil_bags import read_bag_csv

    return _bag_dataset("bag_csv", path, read_bag_csv(path), splits_csv)


@register_format("sicapv2", kind="bags", matches=folder_with("Test.csv"))
def sicapv2(path: Path, splits_csv: Path | None = None) -> DatasetSplits:
    """SICAPv2 slide bags of 128-d patch features, with patch coordinates and Gleason grades."""
    from medai.io.mil_bags import read_sicapv2_bags

    return _bag_dataset("sicapv2", path, read_sicapv2_bags(path), splits_csv)


@register_format("clam_h5", kind="bags", matches=folder_with("*.h5"))
def clam_h5(path: Path, labels_csv: Path | None = None, splits_csv: Path | None = None) -> DatasetSplits:
    """A folder of CLAM/TRIDENT `<slide_id>.h5` feature files, labelled by a `slide_id,label` CSV."""
    from medai.io.mil_bags import read_clam_bags

    if labels_csv is None:
        raise MILDataError(path, "HDF5 feature folders need data.options.labels_csv (slide_id,label)")
    return _bag_dataset("clam_h5", path, read_clam_bags(path, labels_csv), splits_csv)


@register_format("medmnist_bags", kind="bags", matches=file_named("*.npz"))
def medmnist_bags(path: Path, n_bags: int = 200, bag_size: int = 10, bag_size_sd: float = 2.0,
                  prevalence: float = 0.5, positive_class: int = 1, splits_csv: Path | None = None) -> DatasetSplits:
    """MedMNIST-bags (Ilse et al.'s MNIST-bags style) from a MedMNIST `.npz`, split as its images are."""
    from medai.io.medmnist import load_medmnist
    from medai.io.mil_bags import build_medmnist_bags

    data = load_medmnist(path)
    total = sum(len(split.labels) for split in data.splits.values())
    bags = []
    # Bags of each official split draw only that split's images, so no image is in a train bag and a test
    # bag; a fixed bag-building seed gives every model and training seed the same bags.
    for offset, (name, split) in enumerate(data.splits.items()):
        n = max(2, round(n_bags * len(split.labels) / total))
        for bag in build_medmnist_bags(split.images, split.labels, n, bag_size, bag_size_sd, prevalence,
                                       positive_class, seed=offset, prefix=f"{name}_bag"):
            bag.meta["split"] = name
            bags.append(bag)
    return _bag_dataset("medmnist_bags", path, bags, splits_csv)


def stratified_cv_split(labels: np.ndarray, folds: int, fold: int, seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Return {train, val, test} index arrays: fold `fold` of a stratified k-fold as test, a stratified val carve-out."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_val, test = list(splitter.split(np.zeros(len(labels)), labels))[fold]
    n_val = max(len(np.unique(labels)), int(round(val_fraction * len(train_val))))
    train, val = train_test_split(train_val, test_size=n_val, stratify=labels[train_val], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def bag_splits(data: DatasetSplits, folds: int = 10, fold: int = 0, seed: int = 0,
               val_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """{train, val, test} bag indices: the data's own split when it has one, else stratified cross-validation."""
    if data.splits:
        return data.splits
    labels = np.array([b.label for b in data.items])
    return stratified_cv_split(labels, folds, fold, seed, val_fraction)
