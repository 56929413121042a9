"""Folders of 2D images with a labels CSV (columns: image path, label, optional split)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medai.errors import DatasetNotFoundError
from medai.io.medmnist import DatasetFormatError


@dataclass
class ImageTable:
    """Image paths and integer labels per split, with the class names in label order."""

    splits: dict[str, tuple[list[Path], np.ndarray]]
    class_names: list[str]


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """Read an image file to uint8 (H, W) for 1 channel or (H, W, 3) for 3."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert("L" if channels == 1 else "RGB"))  # writable: torch.from_numpy needs it
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetFormatError(path, f"unreadable image ({exc})") from exc


def load_image_table(
    csv_path: str | Path,
    image_root: str | Path | None = None,
    image_column: str = "image",
    label_column: str = "label",
    split_column: str = "split",
) -> ImageTable:
    """Read a labels CSV; labels may be names or integers; rows without a split go to 'train'."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetNotFoundError(csv_path, "labels CSV")
    root = Path(image_root) if image_root else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise DatasetFormatError(csv_path, "no rows")
    for column in (image_column, label_column):
        if column not in rows[0]:
            raise DatasetFormatError(csv_path, f"missing column '{column}' (found {list(rows[0])})")
    raw = [r[label_column].strip() for r in rows]
    names = sorted(set(raw), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
    index = {name: i for i, name in enumerate(names)}
    grouped: dict[str, tuple[list[Path], list[int]]] = {}
    for lineno, (row, label) in enumerate(zip(rows, raw), start=2):
        path = root / row[image_column]
        if not path.is_file():
            raise DatasetNotFoundError(path, f"{csv_path}:{lineno}")
        split = (row.get(split_column) or "train").strip() or "train"
        paths, labels = grouped.setdefault(split, ([], []))
        paths.append(path)
        labels.append(index[label])
    splits = {s: (p, np.asarray(l, dtype=np.int64)[:, None]) for s, (p, l) in grouped.items()}
    return ImageTable(splits, names)
