"""Image classification on MedMNIST `.npz` files or image folders with a labels CSV."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from medai.io.datasets import check_format, load_dataset
from medai.io.images import read_image
from medai.pipelines.metrics import classification_metrics
from medai.pipelines.tasks import Task, TaskData, item_generator, register_task

# Inputs are scaled to [-1, 1] (mean = std = 0.5), what the packaged ImageNet weights expect.
MEAN, STD = 0.5, 0.5


@dataclass
class ClassificationOptions:
    """`data.options` of the classification task."""

    format: str = "auto"  # an images format of medai.io.datasets (medmnist, image_csv), or detected from the path
    task: Literal["binary", "multiclass", "multilabel", "ordinal"] | None = None  # None: read from the file
    image_size: int | None = None  # resize to this (None: keep the file's size)
    channels: int | None = None  # force 1 or 3 channels (None: the file's)
    augment: bool = True  # flips and padded random crops on the train split
    image_column: str = "image"
    label_column: str = "label"
    split_column: str = "split"

    def __post_init__(self) -> None:
        check_format(self.format, "images")


class ImageClassificationDataset(Dataset):
    """uint8 images (arrays or files) -> normalised float tensors (C, H, W) and integer labels."""

    def __init__(self, images: Any, labels: np.ndarray, channels: int, image_size: int | None,
                 augment: bool, seed: int, from_files: bool = False):
        self.images, self.labels = images, labels
        self.channels, self.image_size = channels, image_size
        self.augment, self.seed, self.from_files = augment, seed, from_files
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of an epoch (called by the engine)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def _load(self, index: int) -> torch.Tensor:
        array = read_image(self.images[index], self.channels) if self.from_files else self.images[index]
        x = torch.from_numpy(np.ascontiguousarray(array)).float().div_(255)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        if x.shape[0] != self.channels:
            x = x.mean(0, keepdim=True) if self.channels == 1 else x.expand(self.channels, -1, -1)
        if self.image_size and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)[0]
        return x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._load(index)
        if self.augment:
            g = item_generator(self.seed, self.epoch, index)
            if torch.rand(1, generator=g) < 0.5:
                x = x.flip(-1)
            pad = max(1, x.shape[-1] // 14)
            h, w = x.shape[-2:]
            padded = F.pad(x[None], (pad, pad, pad, pad), mode="reflect")[0]
            top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
            x = padded[:, top:top + h, left:left + w]
        x = (x - MEAN) / STD
        return x, torch.from_numpy(self.labels[index])


@register_task("classification")
class ClassificationTask(Task):
    """Binary, multi-class, ordinal (as classes) and multi-label image classification."""

    default_monitor = "val_auroc"
    default_monitor_mode = "max"
    options_cls = ClassificationOptions

    def setup(self, data_cfg: Any, seed: int) -> TaskData:
        """Read the dataset (medai.io.datasets, kind "images") and build train/val/test datasets."""
        opts: ClassificationOptions = self.options
        data = load_dataset(data_cfg.path, kind="images", **vars(opts))
        if data.meta["spatial_dims"] != 2:
            raise ValueError(f"{data.path}: 3D MedMNIST volumes need a 3D model task, not 2D classification")
        task, num_classes = data.meta["task"], data.meta["num_classes"]
        channels = opts.channels or data.meta["channels"]
        splits = {name: data.split(name) for name in data.splits}
        self.task_type, self.num_classes = task, num_classes
        datasets = {
            split: ImageClassificationDataset(items.images, items.labels, channels, opts.image_size,
                                              opts.augment and split == "train", seed, items.from_files)
            for split, items in splits.items()
        }
        train_labels = splits["train"].labels
        weights = None
        if task != "multilabel":
            counts = np.bincount(train_labels[:, 0], minlength=num_classes).astype(float)
            weights = (1.0 / np.maximum(counts, 1))[train_labels[:, 0]]
        info = {
            "task_type": task,
            "num_classes": num_classes,
            "class_names": data.meta["class_names"],
            "channels": channels,
            "class_counts_train": np.bincount(train_labels[:, 0], minlength=num_classes).tolist()
            if task != "multilabel" else train_labels.sum(0).tolist(),
            "model_kwargs": {"num_classes": num_classes, "in_chans": channels},
        }
        return TaskData(datasets, info, weights)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy (BCE-with-logits for multi-label)."""
        x, y = batch
        logits = model(x)
        if self.task_type == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, y.float()), {}
        return F.cross_entropy(logits, y[:, 0]), {}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Any) -> dict[str, np.ndarray]:
        """Class probabilities and targets of one batch."""
        x, y = batch
        logits = model(x).float()
        prob = torch.sigmoid(logits) if self.task_type == "multilabel" else logits.softmax(-1)
        return {"prob": prob.cpu().numpy(), "target": y.cpu().numpy()}

    def metrics(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """AUROC, AUPRC, accuracy, balanced accuracy, F1, ECE."""
        return classification_metrics(predictions["target"], predictions["prob"], self.task_type)
