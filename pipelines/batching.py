"""How the engine batches a split: seeded, resumable batch order, loaders, and moving batches to a device.

Training (`pipelines.finetune`) and evaluation (`pipelines.evaluate`) draw batches the same way,
so a split is predicted in the order the engine validated it.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medai.pipelines.train_config import DataConfig


class EpochSampler(Sampler[list[int]]):
    """Batches of indices drawn from (seed, epoch): shuffled, or class-balanced with replacement.

    Each process takes every world_size-th batch, so replicas see disjoint data; `start_batch`
    skips batches already trained on before a resume.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True,
                 weights: np.ndarray | None = None, rank: int = 0, world_size: int = 1,
                 limit_batches: int | None = None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.limit_batches = limit_batches
        self.shuffle, self.weights = shuffle, weights
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's draw and how many of this process's batches to skip."""
        self.epoch, self.start_batch = epoch, start_batch

    def all_batches(self) -> list[list[int]]:
        """This process's batches for the current epoch."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            w = torch.as_tensor(self.weights, dtype=torch.double)
            order = torch.multinomial(w, self.n, replacement=True, generator=g).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        usable = len(batches) - len(batches) % self.world_size if self.world_size > 1 else len(batches)
        mine = batches[:usable][self.rank::self.world_size]
        return mine[: self.limit_batches] if self.limit_batches else mine

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.all_batches()[self.start_batch:])

    def __len__(self) -> int:
        return max(0, len(self.all_batches()) - self.start_batch)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


def make_loader(dataset: Dataset, batch_sampler: Sampler, cfg: DataConfig, collate_fn: Any, seed: int) -> DataLoader:
    """DataLoader over a batch sampler with seeded workers."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_fn,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def move_to(batch: Any, device: torch.device) -> Any:
    """Move tensors inside nested lists/tuples/dicts to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch
