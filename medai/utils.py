"""Small shared helpers: lazy optional imports, hashing, seeding, atomic writes, shipped files."""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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


def file_identity(path: str | Path) -> list[list]:
    """[name, size, mtime_ns] of a file, or of every file under a folder (sorted): cheap, and changes when the content does."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[p.name if p == path else str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


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


def temporary_sibling(path: str | Path) -> Path:
    """Return a unique hidden temporary name beside `path`: `.<name>.<pid>.<random>.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def previous_copy(path: str | Path) -> Path:
    """Return where `replace_folder` keeps the previous copy of `path` while it swaps folders."""
    path = Path(path)
    return path.with_name(path.name + ".old")


def replace_folder(new: Path, final: Path) -> None:
    """Move folder `new` onto `final` so that one complete copy is on disk at every moment.

    A folder cannot be renamed over a non-empty one, so the old copy first moves aside to
    `previous_copy(final)`; a crash between the two renames leaves it there for readers to find.
    """
    old = previous_copy(final)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    new.rename(final)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def atomic_write(path: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file or a folder into; on success it becomes `path`.

    The temporary (`temporary_sibling`) lies in the same folder, so the final rename is atomic and
    readers never see half a file; on an exception it is removed and `path` is left untouched. A
    folder replaces an existing `path` through `replace_folder`. With `keep_existing`, a `path` that
    another process finished meanwhile is kept and ours dropped (for caches, where both are equal).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if keep_existing and path.exists():
            return
        if tmp.is_dir():
            replace_folder(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def shipped_file(relative: str | Path) -> Path:
    """Return a file shipped inside the installed medai package, e.g. 'configs/breastmnist_resnet18.yaml'.

    The first part names medai's data package (checkpoints, configs, data_cards: `medai.<part>`),
    found through importlib.resources, so a wheel installed anywhere finds its own files.
    """
    from importlib.resources import files

    package, _, rest = Path(relative).as_posix().partition("/")
    if not rest:
        raise ValueError(f"'{relative}' names no file inside a medai data package (e.g. configs/x.yaml)")
    try:
        root = files(f"medai.{package}")
    except ModuleNotFoundError:
        raise FileNotFoundError(f"medai ships no package '{package}' (looking for {relative})") from None
    path = Path(str(root.joinpath(rest)))
    if not path.is_file():
        raise FileNotFoundError(f"medai ships no file {relative} (looked at {path})")
    return path


def repo_root() -> Path | None:
    """Return the source checkout's root (holding pyproject.toml), or None when medai runs installed from a wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "models").is_dir() else None
