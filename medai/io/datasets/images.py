"""Labelled 2D images: MedMNIST `.npz` files and image folders with a labels CSV."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medai.io.datasets.base import DatasetSplits, file_named, register_format


@dataclass
class LabelledImages:
    """Images (a uint8 array (N, H, W[, C]) or N image files) with integer labels (N, L)."""

    images: np.ndarray | list[Path]
    labels: np.ndarray

    @property
    def from_files(self) -> bool:
        """True when the images are files still to be read."""
        return not isinstance(self.images, np.ndarray)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, np.ndarray]:
        return self.images[index], self.labels[index]

    def subset(self, index: np.ndarray) -> LabelledImages:
        """The items at `index`; a contiguous run is a view, not a copy (splits of a large array stay shared)."""
        if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
            at: slice | np.ndarray = slice(int(index[0]), int(index[0]) + len(index))
            return LabelledImages(self.images[at], self.labels[at])
        images = self.images[index] if not self.from_files else [self.images[i] for i in index]
        return LabelledImages(images, self.labels[index])


def _stacked(parts: dict[str, tuple[Any, np.ndarray]]) -> tuple[LabelledImages, dict[str, np.ndarray]]:
    """Per-split (images, labels) -> one LabelledImages and each split's contiguous index range."""
    splits, start = {}, 0
    for name, (_, labels) in parts.items():
        splits[name] = np.arange(start, start + len(labels))
        start += len(labels)
    first = next(iter(parts.values()))[0]
    if isinstance(first, np.ndarray):
        images: np.ndarray | list[Path] = np.concatenate([images for images, _ in parts.values()])
    else:
        images = [path for paths, _ in parts.values() for path in paths]
    return LabelledImages(images, np.concatenate([labels for _, labels in parts.values()])), splits


@register_format("medmnist", kind="images", matches=file_named("*.npz"))
def medmnist(path: Path, task: str | None = None) -> DatasetSplits:
    """A MedMNIST `.npz` with its official train/val/test splits; meta: task, classes, channels, spatial dims."""
    from medai.io.medmnist import load_medmnist

    data = load_medmnist(path, task=task)  # type: ignore[arg-type]
    items, splits = _stacked({name: (split.images, split.labels) for name, split in data.splits.items()})
    meta = {"task": data.task, "num_classes": data.num_classes, "channels": data.channels,
            "spatial_dims": data.spatial_dims, "class_names": [str(i) for i in range(data.num_classes)]}
    return DatasetSplits("medmnist", path, items, splits, meta)


@register_format("image_csv", kind="images", matches=file_named("*.csv"))
def image_csv(path: Path, task: str | None = None, image_column: str = "image", label_column: str = "label",
              split_column: str = "split") -> DatasetSplits:
    """Image files listed in a labels CSV (paths relative to it; rows without a split are train)."""
    from medai.io.images import load_image_table

    table = load_image_table(path, None, image_column, label_column, split_column)
    items, splits = _stacked(table.splits)
    num_classes = max(2, len(table.class_names))
    # Files are read as RGB unless the task asks for one channel.
    meta = {"task": task or ("binary" if num_classes == 2 else "multiclass"), "num_classes": num_classes,
            "channels": 3, "spatial_dims": 2, "class_names": table.class_names}
    return DatasetSplits("image_csv", path, items, splits, meta)
