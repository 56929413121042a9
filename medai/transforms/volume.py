"""MONAI dictionary transforms for 3D segmentation volumes (NIfTI or DICOM-derived).

`CheckVolumed` validates a loaded image/label pair at the boundary (shape, spacing metadata,
emptiness, NaN/inf, label values) and raises InvalidVolumeError naming the file. The
builders return the MONAI pipelines used for training, validation and inference, so every
job applies the same spacing and intensity normalisation.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch

from medai.errors import InvalidVolumeError, MedaiError


def _source(data: Mapping, key: Hashable) -> str | None:
    meta = getattr(data[key], "meta", None) or data.get(f"{key}_meta_dict", {})
    return str(meta.get("filename_or_obj")) if meta.get("filename_or_obj") is not None else None


def _spacing_mm(volume) -> np.ndarray:
    """Voxel spacing in mm from a MetaTensor's affine (column norms of the 3x3 part)."""
    affine = getattr(volume, "affine", None)
    if affine is None:
        return np.ones(3)
    affine = np.asarray(affine, dtype=np.float64)
    return np.linalg.norm(affine[:3, :3], axis=0)


class CheckVolumed:
    """Validate channel-first 3D volumes: (1, X, Y, Z), finite, non-empty, sane spacing, known labels."""

    def __init__(
        self,
        image_key: str = "image",
        label_key: str | None = "label",
        labels: Sequence[int] = (0, 1, 2),
        spacing_range_mm: tuple[float, float] = (0.05, 20.0),
    ):
        self.image_key, self.label_key = image_key, label_key
        self.labels = set(int(v) for v in labels)
        self.spacing_range_mm = spacing_range_mm

    def __call__(self, data: Mapping) -> dict:
        """Return `data` unchanged, or raise InvalidVolumeError naming the file and the problem."""
        data = dict(data)
        image = data[self.image_key]
        path = _source(data, self.image_key)
        if image.ndim != 4 or image.shape[0] != 1:
            raise InvalidVolumeError(path, f"expected one 3D volume (1, X, Y, Z), got shape {tuple(image.shape)}")
        if min(image.shape[1:]) < 2:
            raise InvalidVolumeError(path, f"a 3D volume needs >= 2 voxels per axis, got {tuple(image.shape[1:])}")
        values = torch.as_tensor(image)
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise InvalidVolumeError(path, f"{bad} NaN/inf voxel(s)")
        if values.max() == values.min():
            raise InvalidVolumeError(path, f"empty volume: every voxel equals {float(values.max()):g}")
        spacing = _spacing_mm(image)
        low, high = self.spacing_range_mm
        if not np.all(np.isfinite(spacing)) or np.any(spacing < low) or np.any(spacing > high):
            raise InvalidVolumeError(
                path, f"voxel spacing {np.round(spacing, 4).tolist()} mm outside [{low}, {high}] (bad affine/pixdim)"
            )
        if self.label_key is not None and self.label_key in data:
            label = data[self.label_key]
            label_path = _source(data, self.label_key)
            if tuple(label.shape) != tuple(image.shape):
                raise InvalidVolumeError(
                    label_path, f"label shape {tuple(label.shape)} differs from image {tuple(image.shape)}"
                )
            found = set(torch.unique(torch.as_tensor(label)).long().tolist())
            unknown = sorted(found - self.labels)
            if unknown:
                raise InvalidVolumeError(label_path, f"unexpected label values {unknown} (known {sorted(self.labels)})")
            label_spacing = _spacing_mm(label)
            if not np.allclose(label_spacing, spacing, rtol=1e-3):
                raise InvalidVolumeError(
                    label_path, f"label spacing {label_spacing.tolist()} mm differs from image {spacing.tolist()} mm"
                )
        return data


def _checked_compose(steps):
    """A MONAI Compose that lets medai's typed errors through (MONAI wraps them in RuntimeError)."""
    from monai.transforms import Compose

    class CheckedCompose(Compose):
        def __call__(self, data, *args, **kwargs):
            try:
                return super().__call__(data, *args, **kwargs)
            except RuntimeError as exc:
                cause = exc.__cause__
                while cause is not None and not isinstance(cause, MedaiError):
                    cause = cause.__cause__
                if cause is not None:
                    raise cause from None
                raise

    return CheckedCompose(steps)


def segmentation_transforms(
    stage: str,
    roi_size: Sequence[int],
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    with_label: bool = True,
    labels: Sequence[int] = (0, 1, 2),
    from_arrays: bool = False,
):
    """MONAI Compose for `stage` in train/val/infer: load, check, resample, z-score; train adds crops.

    from_arrays: inputs are already channel-first MetaTensors with their affine (e.g. a DICOM series
    loaded by medai.io.dicom) instead of file paths.
    """
    from monai import transforms as mt

    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    loading = [] if from_arrays else [mt.LoadImaged(keys, image_only=True), mt.EnsureChannelFirstd(keys)]
    steps = [
        *loading,
        CheckVolumed("image", "label" if with_label else None, labels=labels),
        mt.Spacingd(keys, pixdim=tuple(spacing_mm), mode=modes),
        # MR intensities have no absolute scale (the MSD files range from 255 to 1e6): z-score inside the head.
        mt.NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        mt.CastToTyped(keys, dtype=[torch.float32, torch.uint8] if with_label else [torch.float32]),
    ]
    if stage == "train":
        steps += [
            mt.SpatialPadd(keys, spatial_size=tuple(roi_size)),
            mt.RandSpatialCropd(keys, roi_size=tuple(roi_size), random_size=False),
            mt.RandScaleIntensityd("image", factors=0.1, prob=0.5),
            mt.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    elif stage not in ("val", "infer"):
        raise ValueError(f"stage must be train, val or infer, got {stage!r}")
    return _checked_compose(steps)
