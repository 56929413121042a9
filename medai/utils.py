"""Small shared helpers: lazy optional imports, hashing, seeding."""

from __future__ import annotations

import hashlib
import importlib
import os
import random
from pathlib import Path
from types import ModuleType

from medai.errors import OptionalDependencyError


def optional_import(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """Import an optional module or raise OptionalDependencyError with an install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OptionalDependencyError(module.split(".")[0], feature, extra) from exc


def is_installed(module: str) -> bool:
    """Return True when `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) RNGs."""
    import numpy as np
    import torch

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def cache_dir() -> Path:
    """Return medai's cache folder (MEDAI_CACHE, default ~/.cache/medai), created if needed."""
    root = Path(os.environ.get("MEDAI_CACHE", Path.home() / ".cache" / "medai"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def repo_root() -> Path:
    """Return the source checkout's root (the folder holding pyproject.toml)."""
    return Path(__file__).resolve().parent.parent
