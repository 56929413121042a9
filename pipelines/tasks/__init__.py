"""Task plug-ins for the shared fine-tuning engine.

A task reads its dataset through `medai.io.datasets` and turns the items into tensors, builds the
model, computes the training loss, and turns model outputs into per-item predictions and metrics. The engine
(`pipelines.finetune`) owns everything else: devices, precision, accumulation, checkpoints,
resume, logging. Register a task with `@register_task("name")` in `pipelines/tasks/<name>.py` (or
`<prefix>.py` for names `<prefix>_...`): `get_task` imports only that module, so a run imports only
what its task needs.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medai.registry import Registry


@dataclass
class TaskData:
    """What a task's setup yields: datasets by split, facts for the model, sample weights."""

    datasets: dict[str, Dataset]
    info: dict[str, Any] = field(default_factory=dict)
    # per-item weights of the train split for class-balanced sampling (None: uniform)
    train_sample_weights: np.ndarray | None = None
    collate_fn: Callable | None = None


class Task(ABC):
    """Base class of a training task; subclasses implement setup, loss, predict, metrics."""

    name: str = ""
    # metric the engine selects the best checkpoint by, and whether higher is better
    default_monitor: str = "val_loss"
    default_monitor_mode: str = "min"
    # dataclass validating the config's `data.options` for this task (None: no options)
    options_cls: type | None = None

    def __init__(self, options: dict[str, Any]):
        self.options = options

    @abstractmethod
    def setup(self, data_cfg: Any, seed: int) -> TaskData:
        """Build the datasets of every split from the config's data section."""

    def build_model(self, model_cfg: Any, info: dict[str, Any]) -> nn.Module:
        """Build the model through the registry; `info` fills e.g. num_classes and in_chans."""
        from medai.models import create_model

        kwargs = {k: v for k, v in info.get("model_kwargs", {}).items() if k not in model_cfg.kwargs}
        return create_model(model_cfg.name, pretrained=model_cfg.pretrained, **kwargs, **model_cfg.kwargs)

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the training loss of one batch and scalar logs."""

    @abstractmethod
    def predict(self, model: nn.Module, batch: Any) -> dict[str, np.ndarray]:
        """Return per-item outputs of one batch as arrays (targets, scores, ...)."""

    @abstractmethod
    def metrics(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """Return headline metrics of concatenated predictions."""


TASKS: Registry[type[Task]] = Registry("task")


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one item's augmentation in one epoch: independent of workers, batch order and resume."""
    return zlib.crc32(f"{seed}:{epoch}:{index}".encode())


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch generator seeded by `item_seed`."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, index))


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a Task subclass under `name`."""

    def wrap(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS.add(name, cls)
        return cls

    return wrap


def _import_task_module(name: str) -> None:
    """Import the module that registers task `name`: `tasks/<name>.py`, else the module of its prefix
    (`ehr_pretrain` lives in `tasks/ehr.py`); an unknown name imports every task module, so the
    registry's error can list them all."""
    import medai.pipelines.tasks as package

    parts = name.split("_")
    for end in range(len(parts), 0, -1):
        module = "_".join(parts[:end])
        if importlib.util.find_spec(f"{package.__name__}.{module}") is not None:
            importlib.import_module(f"{package.__name__}.{module}")
            if name in TASKS:
                return
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def get_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """Instantiate the registered task `name`, importing only the module that registers it."""
    if name not in TASKS:
        _import_task_module(name)
    return TASKS.get(name)(dict(options or {}))
