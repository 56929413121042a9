"""MONAI dictionary transform that loads a DICOM series (folder, file list or SeriesRecord) with its geometry."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from medai.io.dicom import DicomVolume, SeriesRecord, load_series
from medai.utils import optional_import

monai_transforms = optional_import("monai.transforms", "MONAI DICOM transforms", extra="train")


def volume_to_metatensor(volume: DicomVolume, *, channel_first: bool = True, dtype=None):
    """A MONAI MetaTensor [C, i, j, k] with the RAS affine and the series metadata (space RAS)."""
    import torch
    from monai.data import MetaTensor
    from monai.utils import SpaceKeys

    array = volume.array
    if array.ndim == 3:
        array = array[None] if channel_first else array
    else:  # RGB: channel last in DicomVolume -> first
        array = np.moveaxis(array, -1, 0) if channel_first else array
    if array.dtype == np.uint16:
        array = array.astype(np.int32)  # torch has no uint16 arithmetic
    if volume.affine_ras is None:
        # No made-up geometry: a pixel-space affine from spacing, and the meta says so.
        affine = np.diag(list(volume.spacing_mm) + [1.0])
    else:
        affine = volume.affine_ras
    meta: dict[str, Any] = dict(volume.metadata)
    meta.update(
        {
            "space": SpaceKeys.RAS,
            "original_affine": affine,
            "spacing_mm": np.asarray(volume.spacing_mm),
            "spatial_shape": np.asarray(volume.array.shape[:3]),
            "original_channel_dim": 0 if channel_first else "no_channel",
            "geometry": volume.geometry,
            "dicom_warnings": list(volume.warnings),
            "sop_instance_uids": volume.sop_instance_uids,
            "filename_or_obj": volume.frames[0].path if volume.frames else "",
        }
    )
    tensor = torch.as_tensor(array, dtype=dtype)
    return MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


class LoadDicomSeriesd(monai_transforms.MapTransform):
    """Load the DICOM series at ``data[key]`` into a channel-first MetaTensor (RAS affine, series metadata).

    ``data[key]`` may be a series folder, a list of files, or a SeriesRecord from scan_folder. With
    ``require_geometry`` (default) a series without patient geometry raises instead of getting a
    made-up affine. The DicomVolume itself is kept under ``f"{key}_dicom"`` when ``keep_volume``.
    """

    def __init__(self, keys, *, strict: bool = False, require_geometry: bool = True, keep_volume: bool = False,
                 dtype=None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.strict, self.require_geometry, self.keep_volume, self.dtype = strict, require_geometry, keep_volume, dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medai.errors import DicomSeriesError

        d = dict(data)
        for key in self.key_iterator(d):
            source: str | Path | Sequence[str | Path] | SeriesRecord = d[key]
            volume = load_series(source, strict=self.strict)
            if self.require_geometry and volume.affine_lps is None:
                raise DicomSeriesError(str(source), f"no patient geometry ({volume.geometry}); pass require_geometry=False for pixel-space use")
            d[key] = volume_to_metatensor(volume, dtype=self.dtype)
            if self.keep_volume:
                d[f"{key}_dicom"] = volume
        return d
