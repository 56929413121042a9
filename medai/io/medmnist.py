"""MedMNIST-format `.npz` files as first-class datasets: splits, classes, channels, task.

A MedMNIST file holds `{train,val,test}_images` and `{...}_labels`. The task is read from the
labels: one integer column with 2 values is binary, more is multi-class, several 0/1 columns are
multi-label. Ordinal sets (RetinaMNIST) look multi-class, so the known MedMNIST names and an
explicit `task` argument override the inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medai.errors import DatasetNotFoundError, InputFileError

Task = Literal["binary", "multiclass", "multilabel", "ordinal"]
SPLITS = ("train", "val", "test")
# MedMNIST's own task labels for the sets whose task cannot be read from the labels alone.
KNOWN_TASKS: dict[str, Task] = {"retinamnist": "ordinal", "chestmnist": "multilabel"}


class DatasetFormatError(InputFileError, ValueError):
    """A dataset file is present but not in the expected format; names the file and the problem."""


@dataclass
class ArraySplit:
    """Images (N, [D,] H, W[, C]) uint8 and labels (N, L) of one split."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class MedMNISTData:
    """All splits of a MedMNIST file with what was inferred about it."""

    path: Path
    splits: dict[str, ArraySplit]
    task: Task
    num_classes: int  # outputs the model needs (1 for binary as a logit pair is not used)
    channels: int
    spatial_dims: int

    def class_counts(self, split: str = "train") -> np.ndarray:
        """Return per-class counts of a split (per column for multi-label)."""
        labels = self.splits[split].labels
        if self.task == "multilabel":
            return labels.sum(0)
        return np.bincount(labels[:, 0].astype(int), minlength=self.num_classes)


def infer_task(labels: np.ndarray, name: str = "") -> tuple[Task, int]:
    """Return (task, number of classes) read from a label array and the dataset's name."""
    stem = name.lower()
    for known, task in KNOWN_TASKS.items():
        if stem.startswith(known):
            if task == "multilabel":
                return task, labels.shape[1]
            return task, int(labels.max()) + 1
    if labels.ndim == 2 and labels.shape[1] > 1:
        return "multilabel", labels.shape[1]
    n = int(labels.max()) + 1
    return ("binary" if n <= 2 else "multiclass"), max(n, 2)


def load_medmnist(path: str | Path, task: Task | None = None) -> MedMNISTData:
    """Read a MedMNIST `.npz` (any subset); raise DatasetFormatError naming what is missing."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(path, "MedMNIST .npz file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as exc:
        raise DatasetFormatError(path, f"not a readable .npz ({exc})") from exc
    missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in arrays]
    if missing:
        raise DatasetFormatError(path, f"missing arrays {missing} (found {sorted(arrays)})")
    splits = {}
    for s in SPLITS:
        images, labels = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if labels.ndim == 1:
            labels = labels[:, None]
        if len(images) != len(labels):
            raise DatasetFormatError(path, f"{s}: {len(images)} images but {len(labels)} labels")
        splits[s] = ArraySplit(images, labels.astype(np.int64))
    inferred, n = infer_task(np.concatenate([splits[s].labels for s in SPLITS]), path.stem)
    sample = splits["train"].images
    if sample.ndim == 4 and sample.shape[-1] == 3:
        channels, dims = 3, 2
    elif sample.ndim == 4:
        channels, dims = 1, 3
    elif sample.ndim == 3:
        channels, dims = 1, 2
    else:
        raise DatasetFormatError(path, f"unexpected image array shape {sample.shape}")
    return MedMNISTData(path, splits, task or inferred, n, channels, dims)
