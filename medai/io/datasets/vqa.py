"""VQA-RAD question-answer items with the official test split and a validation split held out by image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medai.io.datasets.base import DatasetSplits, folder_with, register_format
from medai.io.vqa_rad import QA_FILE, VQAItem, load_vqa_rad


def held_out_images(items: list[VQAItem], fraction: float, seed: int) -> set[str]:
    """Names of a seeded `fraction` of the items' images, held out for validation with all their questions."""
    images = sorted({it.image_path.name for it in items})
    rng = np.random.default_rng(seed)
    return set(rng.choice(images, size=max(1, round(fraction * len(images))), replace=False).tolist())


@register_format("vqa_rad", kind="vqa", matches=folder_with(QA_FILE))
def vqa_rad(path: Path, val_fraction: float = 0.1, seed: int = 0) -> DatasetSplits:
    """VQA-RAD's official train/test split (medai.io.vqa_rad), validation images drawn from train by `seed`."""
    items = load_vqa_rad(path)
    train = [i for i, it in enumerate(items) if it.split == "train"]
    held = held_out_images([items[i] for i in train], val_fraction, seed)
    splits = {
        "train": np.array([i for i in train if items[i].image_path.name not in held], dtype=int),
        "val": np.array([i for i in train if items[i].image_path.name in held], dtype=int),
        "test": np.array([i for i, it in enumerate(items) if it.split == "test"], dtype=int),
    }
    return DatasetSplits("vqa_rad", path, items, splits, {"held_out_images": sorted(held)})
