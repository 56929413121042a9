"""NIfTI image/label folders (MSD layout: images/, labels/), their train/validation split and labels.

Items are MONAI data dicts `{'case', 'image', 'label'}` (paths). The split comes from a split
file (`split_file`, JSON with `train` and `val` case ids) or is drawn from the labelled cases
by a seed; the labels from the caller, else the folder's `dataset.json`, else the values in the
training label volumes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medai.errors import DatasetNotFoundError, InvalidVolumeError
from medai.io.datasets.base import DatasetSplits, folder_with, register_format
from medai.io.nifti import pair_nifti_folder


def _pairs(dataset_dir: str | Path) -> dict[str, dict[str, Path]]:
    """{case id: {'image', 'label'}} for the labelled cases of an images/ + labels/ folder (.nii or .nii.gz)."""
    return {pair["id"]: pair for pair in pair_nifti_folder(dataset_dir)}


def list_cases(dataset_dir: str | Path) -> list[str]:
    """Case ids (file stems) that have both images/<id>.nii[.gz] and labels/<id>.nii[.gz], sorted."""
    return sorted(_pairs(dataset_dir))


def make_split(dataset_dir: str | Path, val_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """A seeded random train/validation split of the labelled cases, as a JSON-ready dict."""
    cases = list_cases(dataset_dir)
    if len(cases) < 2:
        raise DatasetNotFoundError(dataset_dir, f"found {len(cases)} labelled case(s); a split needs at least 2")
    shuffled = cases[:]
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(cases) * val_fraction))
    return {
        "dataset": Path(dataset_dir).name,
        "seed": seed,
        "val_fraction": val_fraction,
        "train": sorted(shuffled[n_val:]),
        "val": sorted(shuffled[:n_val]),
    }


def write_split(split: dict[str, Any], path: str | Path) -> Path:
    """Write a split file (JSON); return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=1) + "\n")
    return path


def read_split(path: str | Path) -> dict[str, list[str]]:
    """Read a split file; raise DatasetNotFoundError when absent, ValueError when train/val overlap."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(path, "split file")
    split = json.loads(path.read_text())
    overlap = set(split["train"]) & set(split["val"])
    if overlap:
        raise ValueError(f"{path}: cases in both train and val: {sorted(overlap)[:5]}")
    return split


def case_records(dataset_dir: str | Path, cases: Sequence[str], with_label: bool = True) -> list[dict[str, str]]:
    """MONAI data dicts {'image', 'label', 'case'} for the given case ids."""
    pairs = _pairs(dataset_dir)
    records = []
    for case in cases:
        if case not in pairs:
            raise DatasetNotFoundError(Path(dataset_dir) / "images" / f"{case}.nii.gz", f"case {case} (image and label)")
        record = {"case": case, "image": str(pairs[case]["image"])}
        if with_label:
            record["label"] = str(pairs[case]["label"])
        records.append(record)
    return records


def discover_labels(dataset_dir: str | Path, cases: Sequence[str] | None = None) -> dict[int, str]:
    """Foreground labels {value: name}: from an MSD `dataset.json` when present, else the values in the label files."""
    root = Path(dataset_dir)
    manifest = root / "dataset.json"
    if manifest.is_file():
        names = json.loads(manifest.read_text()).get("labels", {})
        found = {int(k): str(v) for k, v in names.items() if int(k) != 0}
        if found:
            return found
    import nibabel as nib

    pairs = _pairs(root)
    values: set[int] = set()
    for case in cases if cases is not None else sorted(pairs):
        data = np.asanyarray(nib.load(str(pairs[case]["label"])).dataobj)
        if not np.allclose(data, np.round(data)):
            raise InvalidVolumeError(pairs[case]["label"], "label volume holds non-integer values")
        values.update(int(v) for v in np.unique(data))
    foreground = sorted(v for v in values if v != 0)
    if not foreground:
        raise InvalidVolumeError(root / "labels", "no foreground label in any label volume")
    return {value: f"label_{value}" for value in foreground}


@register_format("nifti_pairs", kind="volumes", matches=folder_with("images", "labels"))
def nifti_pairs(path: Path, split_file: Path | None = None, val_fraction: float = 0.2, seed: int = 0,
                labels: dict[int, str] | None = None) -> DatasetSplits:
    """Labelled cases of an images/ + labels/ folder, split train/val; meta: labels and where the split came from."""
    split = read_split(split_file) if split_file is not None else make_split(path, val_fraction, seed)
    records = case_records(path, [*split["train"], *split["val"]])
    n_train = len(split["train"])
    meta = {
        "labels": labels if labels is not None else discover_labels(path, split["train"]),
        "split": {"source": str(split_file) if split_file else f"seeded split (seed {seed})",
                  "train": split["train"], "val": split["val"]},
    }
    splits = {"train": np.arange(n_train), "val": np.arange(n_train, len(records))}
    return DatasetSplits("nifti_pairs", path, records, splits, meta)
