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


class InputFileError(MedaiError):
    """An input file cannot be used; the message is '<path>: <reason>' (never patient identifiers)."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


class DicomError(InputFileError):
    """A DICOM file or series cannot be used; names the file (never patient identifiers) and the reason."""


class DicomReadError(DicomError):
    """The file is not readable DICOM: not DICOM at all, truncated, no preamble, malformed elements."""


class DicomNotImageError(DicomError):
    """The file is valid DICOM but not an image (SR, presentation state, SEG asked for as a volume ...)."""

    def __init__(self, path: str | Path, sop_class: str, reason: str = ""):
        self.sop_class = sop_class
        super().__init__(path, reason or f"SOP class '{sop_class}' holds no image pixels")


class DicomNoPixelDataError(DicomError):
    """An image SOP instance without Pixel Data (or with pixel attributes missing)."""


class DicomDecodeError(DicomError):
    """The pixel data cannot be decoded; names the transfer syntax."""

    def __init__(self, path: str | Path, transfer_syntax: str, reason: str):
        self.transfer_syntax = transfer_syntax
        super().__init__(path, f"cannot decode pixels ({transfer_syntax}): {reason}")


class DicomSeriesError(DicomError):
    """Instances do not form one consistent volume (orientation, size, duplicates, no geometry)."""


class PacsError(MedaiError):
    """A PACS request failed; names the server and says what to check (URL, auth, TLS, AE title)."""

    def __init__(self, server: str, reason: str):
        self.server, self.reason = server, reason
        super().__init__(f"{server}: {reason}")


class InvalidVolumeError(MedaiError, ValueError):
    """An image or label volume cannot be segmented as given (not 3D, bad spacing, empty, NaN)."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path or '<in-memory volume>'}: {reason}")


class ModelInputError(MedaiError, ValueError):
    """A tensor given to a model has the wrong shape, channel count, size or non-finite values."""


class ModelContractError(MedaiError, TypeError):
    """A model cannot serve where it was asked to (e.g. as a feature extractor); names it and says what it lacks."""

    def __init__(self, model: str, reason: str):
        self.model, self.reason = model, reason
        super().__init__(f"model '{model}': {reason}")


class UnknownNameError(MedaiError, KeyError):
    """A name looked up in a registry (model, task, dataset format, converter) is not registered; says what is."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""
