"""Slide-level multiple-instance classification: one bag per batch through the shared engine.

Bags come from any bags format of `medai.io.datasets` (MIL-toolbox .mat, bag CSV, SICAPv2 tables,
CLAM HDF5 folders with a labels CSV, MedMNIST-bags). Splits are the data's own (a `slide_id,split`
file, MedMNIST-bags' image splits), or are drawn as stratified k-fold cross-validation (fold `fold`
of `folds` is the test set, a stratified `val_fraction` of the rest the validation set; `split_seed`
picks the repetition).
The best epoch is chosen by validation AUROC + F1, as the ACMIL authors do (ties broken by NLL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medai.io.datasets import check_format, load_dataset
from medai.io.datasets.bags import bag_splits
from medai.io.mil_bags import MILBag
from medai.transforms.mil import subsample_instances
from medai.models.mil import mil_loss
from medai.pipelines.metrics import classification_metrics
from medai.pipelines.tasks import Task, TaskData, item_seed, register_task


@dataclass
class MILOptions:
    """`data.options` of the MIL task."""

    format: str = "auto"  # a bags format of medai.io.datasets, or detected from the path
    labels_csv: Path | None = None  # clam_h5: slide_id,label
    splits_csv: Path | None = None  # slide_id,split; None: stratified k-fold below
    folds: int = 10
    fold: int = 0
    split_seed: int = 0  # which repetition of the cross-validation
    val_fraction: float = 0.1
    standardize: bool = False  # z-score features with train-split statistics (classic MIL sets)
    max_instances: int | None = None  # train-time subsampling cap
    min_fraction: float = 1.0  # train-time random subset of at least this share of each bag
    aem_anneal_epochs: int | None = None  # cosine schedule length for AEM (None: per model config)
    # medmnist_bags: bags built from a MedMNIST .npz's train+val+test images (Ilse et al.'s MNIST-bags style)
    n_bags: int = 200
    bag_size: int = 10
    bag_size_sd: float = 2.0
    prevalence: float = 0.5
    positive_class: int = 1  # the abnormal class: 0 (malignant) for BreastMNIST, 1 (pneumonia) for PneumoniaMNIST

    def __post_init__(self) -> None:
        check_format(self.format, "bags")


class MILBagDataset(Dataset):
    """Bags -> (features (N, D) float32 tensor, label (1,) long tensor, bag index); train-time subsampling."""

    def __init__(self, bags: list[MILBag], mean: np.ndarray | None, std: np.ndarray | None,
                 max_instances: int | None, min_fraction: float, augment: bool, seed: int):
        self.bags, self.mean, self.std = bags, mean, std
        self.max_instances, self.min_fraction = max_instances, min_fraction
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the subsampling draw of an epoch (called by the engine)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        bag = self.bags[index]
        features = bag.features
        if self.augment and (self.max_instances or self.min_fraction < 1.0):
            rng = np.random.default_rng(item_seed(self.seed, self.epoch, index))
            features = features[subsample_instances(len(features), self.max_instances, rng, self.min_fraction)]
        if self.mean is not None:
            features = (features - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), torch.tensor([bag.label]), index


def collate_bags(items: list) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A batch is a list of bags, each (features (N_i, D), label (1,), index (1,)): N varies, nothing is padded."""
    return [(features, label, torch.tensor([index])) for features, label, index in items]


@register_task("mil")
class MILTask(Task):
    """Bag classification (binary or multi-class) with ABMIL / ACMIL / AEM / TransMIL."""

    default_monitor = "val_selection_score"
    default_monitor_mode = "max"
    options_cls = MILOptions

    def setup(self, data_cfg: Any, seed: int) -> TaskData:
        """Read the bags, split them, and build the datasets."""
        opts: MILOptions = self.options
        data = load_dataset(data_cfg.path, kind="bags", **vars(opts))
        bags: list[MILBag] = data.items
        labels = np.array([b.label for b in bags])
        splits = bag_splits(data, opts.folds, opts.fold, opts.split_seed, opts.val_fraction)
        mean = std = None
        if opts.standardize:
            train_features = np.concatenate([bags[i].features for i in splits["train"]])
            mean, std = train_features.mean(0), train_features.std(0) + 1e-6
        datasets = {
            split: MILBagDataset([bags[i] for i in idx], mean, std, opts.max_instances, opts.min_fraction,
                                 augment=split == "train", seed=seed)
            for split, idx in splits.items() if len(idx)
        }
        self.num_classes = data.meta["num_classes"]
        self.task_type = "binary" if self.num_classes == 2 else "multiclass"
        self._train = datasets["train"]
        counts = np.bincount(labels[splits["train"]], minlength=self.num_classes)
        weights = (1.0 / np.maximum(counts, 1))[labels[splits["train"]]]
        info = {
            "task_type": self.task_type,
            "num_classes": self.num_classes,
            "in_features": data.meta["in_features"],
            "split_sizes": {k: int(len(v)) for k, v in splits.items()},
            "split_bag_ids": {k: [bags[i].bag_id for i in v] for k, v in splits.items()},
            "class_counts_train": counts.tolist(),
            "model_kwargs": {"num_classes": self.num_classes, "in_features": data.meta["in_features"]},
        }
        return TaskData(datasets, info, weights, collate_fn=collate_bags)

    def _progress(self) -> float:
        epochs = self.options.aem_anneal_epochs
        return min(1.0, self._train.epoch / epochs) if epochs else 0.0

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over the batch's bags of slide CE (+ branch CE and diversity for ACMIL, + AEM term when enabled)."""
        core = getattr(model, "module", model)
        total, logs = 0.0, {}
        for features, label, _ in batch:
            loss, logs = mil_loss(core, model(features), label, self._progress())
            total = total + loss / len(batch)
        return total, logs

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Any) -> dict[str, np.ndarray]:
        """Class probabilities (B, C), targets (B,) and bag indices (B,) of the batch's bags."""
        prob = torch.cat([model(features)["logits"].float().softmax(-1) for features, _, _ in batch])
        target = torch.cat([label for _, label, _ in batch])
        index = torch.cat([index for _, _, index in batch])
        return {"prob": prob.cpu().numpy(), "target": target.cpu().numpy(), "index": index.cpu().numpy()}

    def metrics(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """AUROC, AUPRC, accuracy, balanced accuracy, F1, ECE, NLL, AUROC + F1 and the selection score.

        The best epoch is chosen as ACMIL does, by AUROC + F1; on the small validation sets of MIL
        benchmarks that sum often ties at its maximum from the first epoch, so ties are broken by
        lower NLL (selection_score = AUROC + F1 - 0.001 * NLL, NLL capped at 100).
        """
        target = predictions["target"].reshape(-1).astype(int)
        prob = predictions["prob"]
        out = classification_metrics(target, prob, self.task_type)
        nll = float(-np.log(np.clip(prob[np.arange(len(target)), target], 1e-12, 1.0)).mean())
        out["nll"] = nll
        out["auroc_plus_f1"] = out["auroc"] + out["f1"]
        out["selection_score"] = out["auroc_plus_f1"] - 1e-3 * min(nll, 100.0)
        return out
