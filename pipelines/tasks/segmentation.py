"""3D semantic segmentation of NIfTI volumes (MSD layout: images/, labels/) for the fine-tuning engine.

Training items are random ROI crops (MONAI transforms, Dice + cross-entropy loss); validation
items are whole volumes, scored by sliding-window inference with Gaussian blending, Dice and
HD95 (mm) per label. Any images/ + labels/ NIfTI folder works (`medai.io.datasets.volumes`):
without a split file the cases are split by the run's seed (and the split is kept in the run's
info), without configured labels they come from the folder's `dataset.json` or its label volumes.
Crops are drawn from a generator seeded by (seed, epoch, item), so resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medai.io.datasets import load_dataset
from medai.pipelines.segmentation import label_metrics, sliding_window_logits
from medai.pipelines.tasks import Task, TaskData, item_seed, register_task


@dataclass
class SegmentationOptions:
    """`data.options` of the segmentation task."""

    split_file: Path | None = None  # None: a seeded split of the folder's labelled cases
    val_fraction: float = 0.2  # used only without a split file
    roi_size: tuple[int, int, int] = (32, 48, 32)
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    labels: dict[int, str] | None = None  # None: from dataset.json or the label volumes
    overlap: float = 0.5  # sliding-window overlap at validation
    val_cases: int = 0  # 0: every validation case


class VolumeDataset(Dataset):
    """Preprocessed volumes held in memory; train items are seeded random crops, others whole volumes."""

    def __init__(self, records: list[dict[str, str]], options: SegmentationOptions, train: bool, seed: int):
        from medai.transforms.volume import segmentation_transforms

        labels = (0, *labels_of(options))
        preprocess = segmentation_transforms("val", options.roi_size, options.spacing_mm, labels=labels)
        # Volumes are small (MSD hippocampus: ~60k voxels); loading once keeps epochs cheap.
        self.items = [preprocess(r) for r in records]
        self.cases = [r["case"] for r in records]
        self.train, self.seed, self.epoch = train, seed, 0
        self.augment = _train_augment(options.roi_size) if train else None

    def set_epoch(self, epoch: int) -> None:
        """Select the crop draw of an epoch (called by the engine)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        if self.augment is not None:
            self.augment.set_random_state(seed=item_seed(self.seed, self.epoch, index))
            item = self.augment(dict(item))
        return {"image": torch.as_tensor(item["image"]).float(), "label": torch.as_tensor(item["label"]).long(),
                "index": torch.tensor(index)}


def _train_augment(roi_size):
    from monai import transforms as mt

    keys = ["image", "label"]
    return mt.Compose([
        mt.SpatialPadd(keys, spatial_size=tuple(roi_size)),
        mt.RandSpatialCropd(keys, roi_size=tuple(roi_size), random_size=False),
        mt.RandScaleIntensityd("image", factors=0.1, prob=0.5),
        mt.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
    ])


@register_task("segmentation")
class SegmentationTask(Task):
    """Multi-label 3D segmentation (labels 0..K, 0 = background): Dice + CE, Dice/HD95 per label."""

    default_monitor = "val_dice_mean"
    default_monitor_mode = "max"
    options_cls = SegmentationOptions

    def setup(self, data_cfg: Any, seed: int) -> TaskData:
        """Read the cases and their split (medai.io.datasets, kind "volumes") and load train/val volumes."""
        opts: SegmentationOptions = self.options
        data = load_dataset(data_cfg.path, kind="volumes", seed=seed, **vars(opts))
        opts.labels = data.meta["labels"]
        val = data.split("val")
        datasets = {
            "train": VolumeDataset(data.split("train"), opts, True, seed),
            "val": VolumeDataset(val[: opts.val_cases] if opts.val_cases else val, opts, False, seed),
        }
        info = {
            "labels": labels_of(opts),
            "split": data.meta["split"],
            "roi_size": list(opts.roi_size),
            "cases": {name: ds.cases for name, ds in datasets.items()},
            "model_kwargs": {"in_channels": 1, "out_channels": 1 + len(opts.labels)},
        }
        return TaskData(datasets, info, None, _collate)

    def _logits(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        if model.training:
            return model(image)
        return sliding_window_logits(model, image, self.options.roi_size, self.options.overlap)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Dice + cross-entropy on crops (training) or whole volumes by sliding window (evaluation)."""
        from monai.losses import DiceCELoss

        logits = self._logits(model, batch["image"])
        return DiceCELoss(to_onehot_y=True, softmax=True)(logits.float(), batch["label"]), {}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Any) -> dict[str, np.ndarray]:
        """Per-volume Dice and HD95 (mm) of every label, and the item index."""
        logits = sliding_window_logits(model, batch["image"], self.options.roi_size, self.options.overlap)
        prediction = logits.argmax(1)
        labels = labels_of(self.options)
        rows = []
        for i in range(prediction.shape[0]):
            # Score each volume in its own extent: the zero padding that batched it with larger
            # volumes is not part of the scan, and a label predicted there would count against it.
            x, y, z = (int(v) for v in batch["shape"][i])
            # Volumes were resampled to options.spacing_mm, so that is the voxel size HD95 uses.
            rows.append(label_metrics(prediction[i, :x, :y, :z].cpu(), batch["label"][i, 0, :x, :y, :z].cpu(),
                                      list(self.options.spacing_mm), labels))
        out = {key: np.array([row[key] for row in rows], dtype=np.float64) for key in rows[0]}
        out["index"] = batch["index"].cpu().numpy()
        return out

    def metrics(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """Mean Dice and HD95 per label over volumes (HD95 undefined on empty masks is left out)."""
        result = {}
        for key, values in predictions.items():
            if key.startswith(("dice_", "hd95_")):
                finite = values[np.isfinite(values)]
                result[key] = float(finite.mean()) if finite.size else float("nan")
        dice = [v for k, v in result.items() if k.startswith("dice_")]
        result["dice_mean"] = float(np.mean(dice)) if dice else float("nan")
        return result


def labels_of(options: SegmentationOptions) -> dict[int, str]:
    """The configured or discovered foreground labels as {int value: name}."""
    if options.labels is None:
        raise ValueError("segmentation labels are not known yet (SegmentationTask.setup discovers them)")
    return {int(k): v for k, v in options.labels.items()}


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack crops; whole volumes of different sizes are zero-padded to the largest, their own shapes kept."""
    shapes = np.array([item["image"].shape[1:] for item in items])
    target = shapes.max(0)
    batch: dict[str, list[torch.Tensor]] = {"image": [], "label": [], "index": [],
                                            "shape": [torch.as_tensor(s) for s in shapes]}
    for item in items:
        pad = [(0, int(t - s)) for s, t in zip(item["image"].shape[1:], target)]
        flat = [p for pair in reversed(pad) for p in pair]
        batch["image"].append(torch.nn.functional.pad(item["image"], flat))
        batch["label"].append(torch.nn.functional.pad(item["label"], flat))
        batch["index"].append(item["index"])
    return {k: torch.stack(v) for k, v in batch.items()}
