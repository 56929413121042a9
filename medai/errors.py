"""Typed errors raised where input enters medai; batch code catches them per item."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


class MedaiError(Exception):
    """Base class of every error medai raises on purpose."""


class ConfigError(MedaiError, ValueError):
    """A configuration file or override is malformed; names the file and the key."""

    def __init__(self, reason: str, source: str | Path | None = None, key: str | None = None):
        self.reason, self.source, self.key = reason, source, key
        where = f"{source}: " if source else ""
        at = f"key '{key}': " if key else ""
        super().__init__(f"{where}{at}{reason}")


class DatasetNotFoundError(MedaiError, FileNotFoundError):
    """A dataset or data file is not where medai looked; names the path."""

    def __init__(self, path: str | Path, hint: str = ""):
        self.path = Path(path)
        super().__init__(f"data not found: {path}" + (f" ({hint})" if hint else ""))


class CheckpointError(MedaiError):
    """A checkpoint cannot be loaded into a model; names the file and the offending keys."""

    def __init__(
        self,
        path: str | Path,
        reason: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
    ):
        self.path = Path(path)
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)
        self.mismatched = sorted(mismatched)
        parts = [f"{path}: {reason}"]
        for label, keys in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("shape mismatches", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... (+{len(keys) - 20})" if len(keys) > 20 else "")
                parts.append(f"{label} ({len(keys)}): {shown}")
        super().__init__("; ".join(parts))


class OptionalDependencyError(MedaiError, ImportError):
    """An optional package is needed for a feature; says what to install."""

    def __init__(self, package: str, feature: str, extra: str | None = None):
        hint = f"pip install 'medai[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the optional package '{package}': {hint}")


class InvalidVolumeError(MedaiError, ValueError):
    """An image or label volume cannot be segmented as given (not 3D, bad spacing, empty, NaN)."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path or '<in-memory volume>'}: {reason}")


class ModelInputError(MedaiError, ValueError):
    """A tensor given to a model has the wrong shape, channel count, size or non-finite values."""
