"""Patch coordinates and features on disk: one HDF5 file per slide, in CLAM's and TRIDENT's layout.

Layout (readable by CLAM, TRIDENT and slide encoders such as TITAN that take their files)::

    <slide_id>.h5
      coords    int64 (N, 2)   top-left (x, y) of each patch in level-0 pixels
      features  float32 (N, D) one embedding per patch, row i belongs to coords[i]  (feature files only)

    attributes of `coords` (also copied onto the file root):
      patch_size         int    pixels of the square patch the encoder saw (after resizing)
      patch_level        int    pyramid level the pixels were read from
      patch_size_level0  int    side of the patch in level-0 pixels (= stride of the grid, no overlap)
      level0_mpp         float  level-0 µm/px of the slide (user-given when the file had none)
      mpp                float  µm/px of the patch as the encoder saw it (target resolution)
      target_magnification, level0_magnification  float  10 / mpp, the usual 0.25 µm/px = 40x convention
      downsample         float  level0 px per patch px (patch_size_level0 / patch_size)
      level_dim          (w, h) level-0 dimensions; name: slide id; mpp_source: 'vendor' or 'user'
    attributes of `features` (feature files): encoder, pretrained, feature_dim

A coordinates-only file (stage `patch`) has `coords` alone; a feature file (stage `extract`)
has both. Files are written to a temporary name and renamed into place, so a file with the
final name is always complete. `read_patch_features` is what MIL training reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medai.errors import InputFileError, MedaiError
from medai.utils import atomic_write, optional_import

COORDS_ATTRS = ("patch_size", "patch_level", "patch_size_level0", "level0_mpp", "mpp")


class PatchFileError(InputFileError):
    """A patch coordinates/features HDF5 file is missing, incomplete or malformed; names the file."""


@dataclass
class PatchGrid:
    """Patch top-left corners in level-0 px and how to read them."""

    coords: np.ndarray  # int64 (N, 2)
    patch_size: int
    patch_level: int
    patch_size_level0: int
    level0_mpp: float
    mpp: float
    level_dim: tuple[int, int]
    name: str
    mpp_source: str = "vendor"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def read_size(self) -> int:
        """Side in px at `patch_level` covering one patch (resized to patch_size afterwards)."""
        return int(self.extra["read_size"])

    def attrs(self) -> dict[str, Any]:
        """Return the HDF5 attributes of `coords`."""
        return {
            "patch_size": int(self.patch_size),
            "patch_level": int(self.patch_level),
            "patch_size_level0": int(self.patch_size_level0),
            "level0_mpp": float(self.level0_mpp),
            "mpp": float(self.mpp),
            "target_magnification": 10.0 / float(self.mpp),
            "level0_magnification": 10.0 / float(self.level0_mpp),
            "downsample": float(self.patch_size_level0) / float(self.patch_size),
            "level_dim": np.asarray(self.level_dim, dtype=np.int64),
            "name": self.name,
            "mpp_source": self.mpp_source,
            **{k: v for k, v in self.extra.items()},
        }


def write_coords_h5(path: str | Path, grid: PatchGrid) -> Path:
    """Write a coordinates-only HDF5 file atomically; return its path."""
    h5py = optional_import("h5py", "patch HDF5 files", "wsi")
    path = Path(path)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as handle:
        dset = handle.create_dataset(
            "coords", data=np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2)
        )
        for key, value in grid.attrs().items():
            dset.attrs[key] = value
            handle.attrs[key] = value
    return path


def read_coords_h5(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Return (coords int64 (N, 2) level-0 px, attributes) from a CLAM/TRIDENT/medai patch file."""
    h5py = optional_import("h5py", "patch HDF5 files", "wsi")
    path = Path(path)
    if not path.is_file():
        raise PatchFileError(path, "no such file")
    try:
        with h5py.File(path, "r") as handle:
            if "coords" not in handle:
                raise PatchFileError(path, f"no 'coords' dataset (has: {', '.join(handle.keys())})")
            coords = handle["coords"][()]
            attrs = {**dict(handle.attrs), **dict(handle["coords"].attrs)}
    except OSError as exc:
        raise PatchFileError(path, f"not a readable HDF5 file ({exc})") from exc
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise PatchFileError(path, f"coords must be (N, 2), got {coords.shape}")
    missing = [k for k in ("patch_size", "patch_level") if k not in attrs]
    if missing:
        raise PatchFileError(path, f"coords lacks attribute(s) {missing}")
    if "patch_size_level0" not in attrs:
        # CLAM files: patch_size is at patch_level; level-0 size follows from the level's downsample.
        if "downsample" in attrs and np.size(attrs["downsample"]) == 2:
            attrs["patch_size_level0"] = int(
                round(int(attrs["patch_size"]) * float(np.asarray(attrs["downsample"])[0]))
            )
        elif int(attrs["patch_level"]) == 0:
            attrs["patch_size_level0"] = int(attrs["patch_size"])
    return coords.astype(np.int64), {k: _plain(v) for k, v in attrs.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_patch_features(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return (features float32 (N, D), coords int64 (N, 2) level-0 px, attributes) of one slide."""
    h5py = optional_import("h5py", "patch HDF5 files", "wsi")
    path = Path(path)
    coords, attrs = read_coords_h5(path)
    with h5py.File(path, "r") as handle:
        if "features" not in handle:
            raise PatchFileError(
                path, "no 'features' dataset: a coordinates-only file, run `medai slides extract`"
            )
        features = handle["features"][()]
        attrs.update({k: _plain(v) for k, v in handle["features"].attrs.items()})
    if features.ndim != 2 or features.shape[0] != coords.shape[0]:
        raise PatchFileError(path, f"features {features.shape} do not match coords {coords.shape}")
    return features.astype(np.float32, copy=False), coords, attrs


def is_complete_feature_file(path: str | Path) -> bool:
    """True when `path` is a readable feature file whose features and coords match (a finished slide)."""
    try:
        h5py = optional_import("h5py", "patch HDF5 files", "wsi")
        with h5py.File(path, "r") as handle:
            return (
                "features" in handle
                and "coords" in handle
                and handle["features"].shape[0] == handle["coords"].shape[0]
                and bool(handle.attrs.get("complete", False))
            )
    except (OSError, MedaiError):
        return False
