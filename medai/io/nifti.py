"""NIfTI image/label folders: pairing by file name, reading with spacing in mm."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medai.errors import DatasetNotFoundError, InputFileError
from medai.utils import optional_import

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class NiftiReadError(InputFileError, ValueError):
    """A NIfTI file cannot be read or has unusable geometry; names the file."""


@dataclass
class NiftiVolume:
    """Voxel array (x, y, z[, ...]) with spacing in mm and the RAS affine from the header."""

    array: np.ndarray
    spacing_mm: tuple[float, ...]
    affine: np.ndarray
    path: Path


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def pair_nifti_folder(root: str | Path, images: str = "images", labels: str = "labels") -> list[dict[str, Path]]:
    """Return [{'image', 'label', 'id'}] for files present in both sub-folders, sorted by id."""
    root = Path(root)
    image_dir, label_dir = root / images, root / labels
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetNotFoundError(folder, "NIfTI folder dataset needs images/ and labels/ sub-folders")
    found_labels = {
        _stem(p): p for p in label_dir.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")
    }
    pairs = []
    for path in sorted(image_dir.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(NIFTI_SUFFIXES):
            continue
        stem = _stem(path)
        if stem in found_labels:
            pairs.append({"id": stem, "image": path, "label": found_labels[stem]})
    if not pairs:
        raise DatasetNotFoundError(root, "no image/label pairs with matching names")
    return pairs


def read_nifti(path: str | Path) -> NiftiVolume:
    """Read a NIfTI file; raise NiftiReadError for unreadable files, NaNs or a singular affine."""
    nib = optional_import("nibabel", "reading NIfTI", "train")
    path = Path(path)
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise NiftiReadError(path, f"unreadable NIfTI ({exc})") from exc
    if array.ndim < 2:
        raise NiftiReadError(path, f"expected an image of 2 or more dimensions, got shape {array.shape}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise NiftiReadError(path, "singular affine: voxel spacing or orientation is missing")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise NiftiReadError(path, "contains NaN or infinite values")
    spacing = tuple(float(s) for s in image.header.get_zooms()[: array.ndim])
    return NiftiVolume(array, spacing, affine, path)
