"""The dataset-format registry: a format name or file pattern -> a builder returning items and splits.

A builder reads one on-disk layout through the readers in `medai.io` and returns a
`DatasetSplits`: every item (arrays or records with metadata, no tensors), the item indices of
each split, and what the format knows about the data (classes, labels, where a split came from).
Formats belong to a kind (what their items are: labelled images, MIL bags, volumes, VQA items,
EHR timelines), so the same file can be read as different kinds (a MedMNIST `.npz` as images or
as MedMNIST-bags). Format modules in this package register themselves with `register_format`
and import their readers lazily, so importing the registry costs nothing heavy.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medai.errors import DatasetNotFoundError
from medai.io.medmnist import DatasetFormatError
from medai.registry import Registry


@dataclass
class DatasetSplits:
    """Items of a dataset, the item indices of each split, and facts about the data (`meta`)."""

    format: str
    path: Path
    items: Sequence[Any]
    splits: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Sequence[Any]:
        """The items of split `name`, in index order (an item container's own `subset` when it has one)."""
        index = self.splits[name]
        subset = getattr(self.items, "subset", None)
        return subset(index) if subset is not None else [self.items[i] for i in index]


@dataclass(frozen=True)
class DatasetFormat:
    """A registered format: its builder, the kind of items it yields, and whether a path looks like it."""

    name: str
    kind: str
    build: Callable[..., DatasetSplits]
    matches: Callable[[Path], bool]


FORMATS: Registry[DatasetFormat] = Registry("dataset format")


def register_format(name: str, kind: str, matches: Callable[[Path], bool]) -> Callable[[Callable], Callable]:
    """Function decorator registering a builder `fn(path, **options) -> DatasetSplits` as format `name`."""

    def wrap(fn: Callable[..., DatasetSplits]) -> Callable[..., DatasetSplits]:
        FORMATS.add(name, DatasetFormat(name, kind, fn, matches))
        return fn

    return wrap


def file_named(*patterns: str) -> Callable[[Path], bool]:
    """A `matches` test: the path is a file whose name matches one of the shell patterns."""
    return lambda path: path.is_file() and any(path.match(p) for p in patterns)


def folder_with(*patterns: str) -> Callable[[Path], bool]:
    """A `matches` test: the path is a folder holding an entry matching every one of the shell patterns."""
    return lambda path: path.is_dir() and all(next(path.glob(p), None) is not None for p in patterns)


def _register_all() -> None:
    """Import every format module of this package (each registers its formats on import)."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")


def format_names(kind: str | None = None) -> list[str]:
    """Registered format names, of one kind or all."""
    _register_all()
    return [name for name in FORMATS if kind is None or FORMATS.get(name).kind == kind]


def check_format(name: str, kind: str) -> None:
    """Raise ValueError unless `name` is "auto" or a registered format of `kind` (options' early check)."""
    if name != "auto" and name not in format_names(kind):
        raise ValueError(f"unknown {kind} dataset format '{name}' (known: auto, {', '.join(format_names(kind))})")


def resolve_source(source: str | Path, what: str = "dataset") -> Path:
    """A named shared dataset (medai.io.data.DATASETS) or a path -> an existing path."""
    from medai.io.data import DATASETS, dataset_path

    path = Path(source)
    if not path.exists() and str(source) in DATASETS:
        return dataset_path(str(source))
    if not path.exists():
        raise DatasetNotFoundError(path, f"{what}: a path or the name of a shared dataset")
    return path


def detect_format(path: Path, kind: str) -> str:
    """The first registered format of `kind` (in name order) whose file pattern the path matches."""
    for name in format_names(kind):
        if FORMATS.get(name).matches(path):
            return name
    raise DatasetFormatError(path, f"no {kind} dataset format matches; name one of {', '.join(format_names(kind))}")


def load_dataset(source: str | Path, format: str = "auto", kind: str | None = None, **options: Any) -> DatasetSplits:
    """Read a dataset by format name, or by the first format of `kind` whose file pattern the path matches.

    `source` is a path or the name of a shared dataset. A task passes every option it has; each
    builder takes the ones its signature names (the task's options dataclass has already refused
    unknown keys).
    """
    _register_all()
    if kind is not None:
        check_format(format, kind)
    elif format == "auto":
        raise ValueError("format 'auto' needs the kind of items to detect among")
    path = resolve_source(source, f"{kind or format} dataset")
    entry = FORMATS.get(detect_format(path, kind) if format == "auto" else format)
    accepted = inspect.signature(entry.build).parameters
    return entry.build(path, **{k: v for k, v in options.items() if k in accepted})
