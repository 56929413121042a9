"""Slide stages before the encoder: tissue segmentation and the patch grid at a physical resolution.

Each stage writes files the next one reads, so users can enter with their own masks or
coordinates (CLAM/TRIDENT `.h5` files load with `medai.io.patch_h5.read_coords_h5`):

    tissue/<slide_id>_mask.png      the binary mask (255 = tissue) at the segmentation resolution
    tissue/<slide_id>_overlay.png   the slide thumbnail with tissue tinted green and outlined
    tissue/<slide_id>.geojson       tissue polygons in level-0 px (drag into QuPath)
    patches/<slide_id>.h5           `coords` (level-0 top-left) + attributes, see medai.io.patch_h5
    patches/<slide_id>_patches.png  the thumbnail with every kept patch outlined
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medai.io.patch_h5 import PatchGrid, write_coords_h5
from medai.io.wsi import NoTissueError, WholeSlide, WSIError
from medai.transforms.tissue import (
    TissueConfig,
    TissueMask,
    detect_tissue,
    tissue_geojson,
    tissue_overlay,
    write_png,
)

log = logging.getLogger(__name__)


@dataclass
class PatchConfig:
    """Patch grid parameters: size as the encoder sees it, at a physical resolution."""

    patch_size: int = 256  # px after resizing
    target_mpp: float = 0.5  # µm/px of the patch (0.5 = 20x)
    min_tissue_fraction: float = 0.25  # keep patches whose area is at least this much tissue
    max_upsample: float = (
        1.1  # refuse slides scanned coarser than target_mpp by more than this factor
    )


@dataclass
class SegmentResult:
    """Tissue segmentation of one slide and the thumbnail it was computed on."""

    tissue: TissueMask
    thumbnail: np.ndarray
    files: dict[str, str] = field(default_factory=dict)


def segmentation_downsample(slide: WholeSlide, cfg: TissueConfig) -> float:
    """Return level-0 px per mask px: `cfg.seg_mpp` when the scale is known, capped by `cfg.seg_max_side`."""
    by_side = max(slide.dimensions) / cfg.seg_max_side
    if slide.mpp is not None:
        wanted = max(1.0, cfg.seg_mpp / slide.mpp, by_side)
    else:
        wanted = max(1.0, by_side, max(slide.dimensions) / 2048)
    # A stored level up to 2x coarser is used as is: decoding a finer level to shrink it costs
    # minutes on a gigapixel slide and changes the mask little.
    for level_ds in sorted(slide.level_downsamples):
        if wanted <= level_ds <= 2 * wanted:
            return float(level_ds)
    return wanted


def segment_slide(
    slide: WholeSlide, out_dir: str | Path | None, slide_id: str, cfg: TissueConfig | None = None
) -> SegmentResult:
    """Detect tissue; when `out_dir` is given write mask PNG, overlay PNG and GeoJSON under it."""
    cfg = cfg or TissueConfig()
    downsample = segmentation_downsample(slide, cfg)
    thumbnail = slide.read_downsampled(downsample)
    scale = (slide.dimensions[0] / thumbnail.shape[1], slide.dimensions[1] / thumbnail.shape[0])
    tissue = detect_tissue(thumbnail, scale, slide.mpp, cfg)
    result = SegmentResult(tissue, thumbnail)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "mask": out / f"{slide_id}_mask.png",
            "overlay": out / f"{slide_id}_overlay.png",
            "geojson": out / f"{slide_id}.geojson",
        }
        write_png(files["mask"], tissue.mask * 255)
        write_png(files["overlay"], tissue_overlay(thumbnail, tissue))
        files["geojson"].write_text(json.dumps(tissue_geojson(tissue)))
        result.files = {k: str(v) for k, v in files.items()}
    log.info(
        "%s: tissue %.1f%% of the slide, %d region(s)",
        slide_id,
        100 * tissue.tissue_fraction,
        len(tissue.polygons),
    )
    return result


def tissue_fraction_per_patch(
    mask: np.ndarray, downsample: tuple[float, float], coords: np.ndarray, size0: int
) -> np.ndarray:
    """Return the tissue fraction of each level-0 square (coords, size0) from a mask at `downsample`."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    integral[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / downsample[0]).astype(int), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / downsample[1]).astype(int), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + size0) / downsample[0]).astype(int), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + size0) / downsample[1]).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / area


def build_patch_grid(
    slide: WholeSlide, tissue: TissueMask, slide_id: str, cfg: PatchConfig | None = None
) -> PatchGrid:
    """Return the tissue patches of `cfg.patch_size` px at `cfg.target_mpp` µm/px, read from the best level."""
    cfg = cfg or PatchConfig()
    level0_mpp = slide.require_mpp()
    size0 = int(round(cfg.patch_size * cfg.target_mpp / level0_mpp))
    if cfg.target_mpp * cfg.max_upsample < level0_mpp:
        raise WSIError(
            slide.path,
            f"scanned at {level0_mpp:.3f} µm/px, coarser than the {cfg.target_mpp} µm/px target "
            f"(would upsample {level0_mpp / cfg.target_mpp:.1f}x); choose a coarser --target-mpp",
        )
    width, height = slide.dimensions
    if size0 < 1 or size0 > min(width, height):
        raise WSIError(
            slide.path,
            f"a {cfg.patch_size} px patch at {cfg.target_mpp} µm/px is {size0} level-0 px, larger than the slide {width}x{height}",
        )
    level = slide.best_level_for_downsample(size0 / cfg.patch_size)
    read_size = int(round(size0 / slide.level_downsamples[level]))
    xs = np.arange(0, width - size0 + 1, size0)
    ys = np.arange(0, height - size0 + 1, size0)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)
    fraction = tissue_fraction_per_patch(tissue.mask, tissue.downsample, grid, size0)
    keep = fraction >= cfg.min_tissue_fraction
    coords = grid[keep]
    if len(coords) == 0:
        raise NoTissueError(
            slide.path,
            f"no {cfg.patch_size} px patch at {cfg.target_mpp} µm/px has >= {cfg.min_tissue_fraction:.0%} tissue "
            f"(tissue covers {tissue.tissue_fraction:.1%} of the slide)",
        )
    log.info(
        "%s: %d of %d grid patches kept (level %d, read %d px)",
        slide_id,
        len(coords),
        len(grid),
        level,
        read_size,
    )
    return PatchGrid(
        coords=coords,
        patch_size=cfg.patch_size,
        patch_level=level,
        patch_size_level0=size0,
        level0_mpp=level0_mpp,
        mpp=cfg.target_mpp,
        level_dim=(width, height),
        name=slide_id,
        mpp_source=slide.mpp_source or "unknown",
        extra={
            "read_size": read_size,
            "min_tissue_fraction": cfg.min_tissue_fraction,
            "grid_patches": len(grid),
        },
    )


def patch_overlay(
    thumbnail: np.ndarray, grid: PatchGrid, level0_dims: tuple[int, int]
) -> np.ndarray:
    """Return the thumbnail with every patch of `grid` outlined (RGB uint8)."""
    import cv2

    out = thumbnail.copy()
    sx, sy = thumbnail.shape[1] / level0_dims[0], thumbnail.shape[0] / level0_dims[1]
    for x, y in grid.coords:
        p0 = (int(x * sx), int(y * sy))
        p1 = (
            int((x + grid.patch_size_level0) * sx) - 1,
            int((y + grid.patch_size_level0) * sy) - 1,
        )
        cv2.rectangle(out, p0, p1, (20, 60, 220), 1)
    return out


def patch_slide(
    slide: WholeSlide,
    out_dir: str | Path,
    slide_id: str,
    tissue_cfg: TissueConfig | None = None,
    patch_cfg: PatchConfig | None = None,
) -> tuple[PatchGrid, SegmentResult]:
    """Segment and patch one slide; write tissue files and patches/<slide_id>.h5 under `out_dir`."""
    out_dir = Path(out_dir)
    seg = segment_slide(slide, out_dir / "tissue", slide_id, tissue_cfg)
    grid = build_patch_grid(slide, seg.tissue, slide_id, patch_cfg)
    write_coords_h5(out_dir / "patches" / f"{slide_id}.h5", grid)
    write_png(
        out_dir / "patches" / f"{slide_id}_patches.png",
        patch_overlay(seg.thumbnail, grid, slide.dimensions),
    )
    return grid, seg
