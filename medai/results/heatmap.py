"""Per-patch scores (MIL attention, class probability) drawn on the slide: PNG overlays and GeoJSON.

`render_heatmap(slide, coords, scores, patch_size_level0, out_prefix)` writes

    <prefix>_heatmap.png     the slide thumbnail with a smooth score overlay and a colour bar
    <prefix>_region.png      a full-resolution region (default: around the top-scoring patch), same overlay
    <prefix>_heatmap.geojson one square per patch in level-0 px with its score and colour (QuPath: detections
                             with a measurement, coloured as in the PNG)

Scores are normalised to [0, 1] by rank (`percentile`, as CLAM draws attention, robust to a few
extreme values), by `minmax`, or taken as they are (`none`, for probabilities). Overlapping
patches are averaged; smoothing is a Gaussian of half a patch, kept inside the patched area so
colour never bleeds onto glass.

Multi-branch attention (ACMIL's K branches, stored (K, N) as `branch_scores`) is drawn one
branch at a time: `load_scores(path, branch=k)` or `branch="mean"`, or the key `branch_scores:k`.
`render_top_patches(slide, coords, scores, patch_size_level0, path)` writes the k highest-scoring
patches, read from the slide at the patch level, as a captioned gallery PNG.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medai.io.wsi import WholeSlide
from medai.utils import optional_import

Normalize = Literal["percentile", "minmax", "none"]
Branch = int | Literal["mean"]  # one attention branch by index, or the mean over branches


def normalize_scores(scores: np.ndarray, method: Normalize = "percentile") -> np.ndarray:
    """Return scores mapped to [0, 1]: by rank, by min-max, or clipped as given."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores contain {int((~np.isfinite(scores)).sum())} non-finite value(s)")
    if scores.size == 0:
        return scores
    if method == "percentile":
        if scores.size == 1:
            return np.ones(1)
        order = scores.argsort(kind="stable")
        ranks = np.empty(scores.size)
        ranks[order] = np.arange(scores.size)
        # ties share their mean rank so equal scores get equal colours
        _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=ranks)
        return (sums / counts)[inverse] / (scores.size - 1)
    if method == "minmax":
        span = scores.max() - scores.min()
        return (scores - scores.min()) / span if span > 0 else np.full(scores.shape, 0.5)
    if method == "none":
        return np.clip(scores, 0.0, 1.0)
    raise ValueError(f"unknown normalisation '{method}' (percentile, minmax, none)")


def _colormap(cv2: Any, name: str) -> int:
    attr = f"COLORMAP_{name.upper()}"
    if not hasattr(cv2, attr):
        raise ValueError(
            f"unknown colour map '{name}' (OpenCV maps: jet, turbo, viridis, inferno, magma, ...)"
        )
    return getattr(cv2, attr)


def colorize(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Return RGB uint8 colours for values in [0, 1] (any shape -> shape + (3,))."""
    cv2 = optional_import("cv2", "heatmaps", "wsi")
    flat = np.clip(np.asarray(values, np.float64).reshape(-1, 1) * 255, 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(flat, _colormap(cv2, cmap)).reshape(-1, 3)
    return bgr[:, ::-1].reshape(np.shape(values) + (3,)).copy()


def score_map(
    coords: np.ndarray,
    values: np.ndarray,
    patch_size_level0: int,
    shape: tuple[int, int],
    scale: float,
    origin: tuple[float, float] = (0.0, 0.0),
    smooth: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (value map, coverage mask) of shape `shape` for patches drawn at `scale` output px per level-0 px."""
    cv2 = optional_import("cv2", "heatmaps", "wsi")

    def paint(at_scale: float, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
        total, count = np.zeros(size, np.float64), np.zeros(size, np.float64)
        x0 = np.floor((coords[:, 0] - origin[0]) * at_scale).astype(int)
        y0 = np.floor((coords[:, 1] - origin[1]) * at_scale).astype(int)
        side = max(1, int(round(patch_size_level0 * at_scale)))
        for x, y, v in zip(x0, y0, values):
            xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + side, size[1]), min(y + side, size[0])
            if xa < xb and ya < yb:
                total[ya:yb, xa:xb] += v
                count[ya:yb, xa:xb] += 1
        return total, count, side

    total, count, side = paint(scale, shape)
    covered = count > 0
    if smooth and side >= 2:
        # Blur on a coarse grid (8 px per patch) and interpolate up: the same smooth field as a
        # full-size Gaussian of half a patch, at a cost independent of the output size.
        coarse = min(1.0, 8.0 / side)
        small = (max(1, round(shape[0] * coarse)), max(1, round(shape[1] * coarse)))
        total, count, small_side = paint(scale * coarse, small)
        total = cv2.GaussianBlur(total, (0, 0), small_side / 2)
        count = cv2.GaussianBlur(count, (0, 0), small_side / 2)
        if small != shape:
            total = cv2.resize(total, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
            count = cv2.resize(count, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    value = np.divide(total, count, out=np.zeros(shape), where=count > 1e-6)
    return np.clip(value, 0, 1), covered


def overlay(
    rgb: np.ndarray, value: np.ndarray, covered: np.ndarray, cmap: str = "jet", alpha: float = 0.5
) -> np.ndarray:
    """Return `rgb` with `value` colours blended in where `covered` (RGB uint8)."""
    out = rgb.astype(np.float32)
    colours = colorize(value, cmap).astype(np.float32)
    out[covered] = (1 - alpha) * out[covered] + alpha * colours[covered]
    return out.astype(np.uint8)


def add_colorbar(
    rgb: np.ndarray, labels: Sequence[str], title: str, cmap: str = "jet"
) -> np.ndarray:
    """Return `rgb` with a vertical colour bar (top = 1) and tick labels on its right."""
    cv2 = optional_import("cv2", "heatmaps", "wsi")
    height = rgb.shape[0]
    bar_h = max(60, int(height * 0.8))
    bar_w = max(12, height // 40)
    margin = max(8, height // 60)
    font = max(0.35, height / 1400)

    def text_width(text: str) -> int:
        return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, 1)[0][0]

    # wide enough for the longest tick label beside the bar and for the title above it
    panel_w = max(
        bar_w + margin * 3 + int(90 * font * 2),
        margin * 3 + bar_w + max((text_width(t) for t in labels), default=0),
        margin * 2 + text_width(title),
    )
    panel = np.full((height, panel_w, 3), 255, np.uint8)
    top = (height - bar_h) // 2
    ramp = np.linspace(1, 0, bar_h)[:, None].repeat(bar_w, 1)
    panel[top : top + bar_h, margin : margin + bar_w] = colorize(ramp, cmap)
    for i, text in enumerate(labels):
        y = top + int(round(i * (bar_h - 1) / max(len(labels) - 1, 1)))
        y_text = min(max(y + int(5 * font), int(12 * font)), height - 2)
        cv2.putText(
            panel,
            text,
            (margin * 2 + bar_w, y_text),
            cv2.FONT_HERSHEY_SIMPLEX,
            font,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    cv2.putText(
        panel,
        title,
        (margin, max(top - margin, int(14 * font))),
        cv2.FONT_HERSHEY_SIMPLEX,
        font,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    return np.concatenate([rgb, panel], axis=1)


def heatmap_geojson(
    coords: np.ndarray,
    scores: np.ndarray,
    values: np.ndarray,
    patch_size_level0: int,
    label: str,
    cmap: str = "jet",
) -> dict[str, Any]:
    """Return one GeoJSON square per patch (level-0 px) with its raw score, normalised value and colour."""
    colours = colorize(values, cmap)
    features = []
    for (x, y), score, value, colour in zip(
        coords.tolist(), scores.tolist(), values.tolist(), colours.tolist()
    ):
        s = patch_size_level0
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": label, "color": colour},
                    "color": colour,
                    "measurements": {label: float(score), f"{label} (normalised)": float(value)},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def parse_branch(text: str | int) -> Branch:
    """Return a branch selection from text: 'mean' or a branch index (0-based)."""
    if isinstance(text, int):
        return text
    value = str(text).strip().lower()
    if value == "mean":
        return "mean"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"branch must be 'mean' or a branch number, got '{text}'") from None


def select_branch(
    scores: np.ndarray, branch: Branch | None = None, source: str = "scores"
) -> np.ndarray:
    """Return one score per patch (N,) from (N,) or (K, N) scores: branch k's row or their mean.

    A (K, N) array with K > 1 needs a `branch`: flattening it would mix the branches' patches.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1):  # (N,) or a column (N, 1)
        scores = scores.reshape(1, -1)
    if scores.ndim != 2:
        raise ValueError(f"{source}: expected (N,) or (K, N) scores, got shape {scores.shape}")
    num_branches = scores.shape[0]
    if branch is None:
        if num_branches > 1:
            raise ValueError(
                f"{source} holds {num_branches} attention branches {scores.shape}; "
                f"choose a branch (0-{num_branches - 1}) or 'mean'"
            )
        return scores[0]
    if branch == "mean":
        return scores.mean(axis=0)
    if isinstance(branch, (int, np.integer)) and 0 <= branch < num_branches:
        return scores[int(branch)]
    raise ValueError(f"{source}: no branch {branch!r} (0-{num_branches - 1} or 'mean')")


def load_scores(
    path: str | Path, key: str | None = None, branch: Branch | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return (scores (N,), coords (N, 2) or None) from .npy, .npz (MIL attention maps) or HDF5.

    `branch` picks one row of a (K, N) array (an index or 'mean'); `key` may carry it as
    `name:branch`, e.g. `branch_scores:2`. A branch without a key reads a .npz's `branch_scores`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such scores file")
    if key is not None and ":" in key:
        key, branch_text = key.rsplit(":", 1)
        branch = parse_branch(branch_text)
    if path.suffix == ".npy":
        return select_branch(np.load(path), branch, str(path)), None
    if path.suffix == ".npz":
        with np.load(path) as data:
            if key is not None:
                name = key
            elif branch is not None and "branch_scores" in data:
                name = "branch_scores"
            else:
                name = "slide_scores" if "slide_scores" in data else "scores"
            if name not in data:
                raise KeyError(f"{path}: no array '{name}' (has: {', '.join(data.files)})")
            coords = np.asarray(data["coords"], dtype=np.int64) if "coords" in data else None
            return select_branch(data[name], branch, f"{path}:{name}"), coords
    h5py = optional_import("h5py", "reading scores from HDF5", "wsi")
    with h5py.File(path, "r") as handle:
        name = key or "scores"
        if name not in handle:
            raise KeyError(f"{path}: no dataset '{name}' (has: {', '.join(handle.keys())})")
        coords = np.asarray(handle["coords"][()], dtype=np.int64) if "coords" in handle else None
        return select_branch(handle[name][()], branch, f"{path}:{name}"), coords


def _tick_labels(scores: np.ndarray, method: Normalize) -> list[str]:
    if method == "percentile":
        qs = np.quantile(scores, [1.0, 0.75, 0.5, 0.25, 0.0])
        return [f"{q:.3g} (p{p})" for q, p in zip(qs, (100, 75, 50, 25, 0))]
    if method == "minmax":
        return [f"{v:.3g}" for v in np.linspace(scores.max(), scores.min(), 5)]
    return [f"{v:.2f}" for v in np.linspace(1, 0, 5)]


def _patch_scores(coords: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (N, 2) int64 level-0 corners and (N,) float64 scores; refuse mismatched or empty input."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} coords but {len(scores)} scores")
    if len(coords) == 0:
        raise ValueError("no patches to draw")
    return coords, scores


def render_heatmap(
    slide: WholeSlide,
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: int,
    out_prefix: str | Path,
    *,
    label: str = "attention",
    normalize: Normalize = "percentile",
    cmap: str = "jet",
    alpha: float = 0.5,
    thumbnail_max_side: int = 2048,
    region: tuple[int, int, int, int] | None = None,
    region_max_side: int = 2048,
    smooth: bool = True,
) -> dict[str, Path]:
    """Write thumbnail and region heatmap PNGs (with colour bars) and a GeoJSON; return their paths.

    `coords` are level-0 top-left corners (N, 2) as stored in the features HDF5, `scores` one
    value per patch; `region` is (x, y, width, height) in level-0 px (default: 8 patches around
    the top-scoring patch, clipped to the slide).
    """
    from medai.transforms.tissue import write_png

    coords, scores = _patch_scores(coords, scores)
    values = normalize_scores(scores, normalize)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    width0, height0 = slide.dimensions
    ticks = _tick_labels(scores, normalize)

    downsample = max(1.0, max(width0, height0) / thumbnail_max_side)
    thumb = slide.read_downsampled(downsample)
    scale = thumb.shape[1] / width0
    value, covered = score_map(
        coords, values, patch_size_level0, thumb.shape[:2], scale, smooth=smooth
    )
    files = {"heatmap": out_prefix.with_name(out_prefix.name + "_heatmap.png")}
    write_png(
        files["heatmap"],
        add_colorbar(overlay(thumb, value, covered, cmap, alpha), ticks, label, cmap),
    )

    if region is None:
        top = coords[int(np.argmax(scores))]
        side = 8 * patch_size_level0
        cx, cy = top[0] + patch_size_level0 // 2, top[1] + patch_size_level0 // 2
        x, y = (
            int(np.clip(cx - side // 2, 0, max(width0 - side, 0))),
            int(np.clip(cy - side // 2, 0, max(height0 - side, 0))),
        )
        region = (x, y, min(side, width0), min(side, height0))
    rx, ry, rw, rh = (int(v) for v in region)
    region_ds = max(1.0, max(rw, rh) / region_max_side)
    level = slide.best_level_for_downsample(region_ds)
    level_ds = slide.level_downsamples[level]
    pixels = slide.read_region(
        (rx, ry), level, (max(1, round(rw / level_ds)), max(1, round(rh / level_ds)))
    )
    out_w, out_h = max(1, round(rw / region_ds)), max(1, round(rh / region_ds))
    if pixels.shape[:2] != (out_h, out_w):
        cv2 = optional_import("cv2", "heatmaps", "wsi")
        pixels = cv2.resize(pixels, (out_w, out_h), interpolation=cv2.INTER_AREA)
    value, covered = score_map(
        coords, values, patch_size_level0, (out_h, out_w), 1 / region_ds, (rx, ry), smooth
    )
    files["region"] = out_prefix.with_name(out_prefix.name + "_region.png")
    write_png(
        files["region"],
        add_colorbar(overlay(pixels, value, covered, cmap, alpha), ticks, label, cmap),
    )

    files["geojson"] = out_prefix.with_name(out_prefix.name + "_heatmap.geojson")
    files["geojson"].write_text(
        json.dumps(heatmap_geojson(coords, scores, values, patch_size_level0, label, cmap))
    )
    return files


@dataclass
class TopPatchGallery:
    """A written gallery: its PNG, the patches' rows and scores (best first), the tile boxes."""

    path: Path
    indices: np.ndarray  # (k,) rows of coords/scores, highest score first
    scores: np.ndarray  # (k,)
    boxes: np.ndarray  # (k, 4) each tile's (x, y, width, height) in PNG px


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Return the indices of the k highest scores, best first (ties: lower index first); O(N)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    k = min(int(k), scores.size)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.arange(scores.size)
    if scores.size > 4 * k:
        # keep every patch tied with the k-th score so ties resolve by index, as a full sort would
        kth = np.partition(scores, scores.size - k)[scores.size - k]
        candidates = np.flatnonzero(scores >= kth)
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]].astype(np.int64)


def render_top_patches(
    slide: WholeSlide,
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: int,
    path: str | Path,
    *,
    k: int = 8,
    patch_level: int = 0,
    columns: int = 4,
    title: str = "",
    max_tile_px: int = 512,
) -> TopPatchGallery:
    """Write the k highest-scoring patches as a PNG grid captioned with rank, score and (x, y).

    Patches are read at `patch_level` (the level the features were extracted from), covering
    `patch_size_level0` level-0 px from their `coords` corner; a tile is shown at that read size,
    downsized only when it exceeds `max_tile_px`. Only the k patches are read, so any slide size
    works.
    """
    from medai.transforms.tissue import write_png

    cv2 = optional_import("cv2", "top-patch galleries", "wsi")
    coords, scores = _patch_scores(coords, scores)
    if k < 1 or columns < 1:
        raise ValueError(f"k and columns must be >= 1, got k={k}, columns={columns}")
    if not 0 <= patch_level < slide.level_count:
        raise ValueError(
            f"patch level {patch_level} not in the slide (levels 0-{slide.level_count - 1})"
        )
    chosen = top_indices(scores, k)
    level_ds = float(slide.level_downsamples[patch_level])
    read_px = max(1, round(patch_size_level0 / level_ds))
    tile_px = min(read_px, max_tile_px)

    captions = [
        (f"#{rank + 1}  {scores[index]:.3g}", f"({coords[index, 0]}, {coords[index, 1]})")
        for rank, index in enumerate(chosen)
    ]
    font = max(0.35, tile_px / 360)

    def text_size(value: str) -> tuple[int, int]:
        (w, h), baseline = cv2.getTextSize(value, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
        return w, h + baseline

    line_h = text_size("#0 (0.0)")[1] + 4
    caption_h = 2 * line_h + 4
    margin = max(6, tile_px // 16)
    # a cell is as wide as its tile or its longest caption, so small tiles keep readable captions
    cell_w = max(tile_px, *(text_size(line)[0] for pair in captions for line in pair))
    title_h = line_h + margin if title else 0
    cols = min(columns, len(chosen))
    rows = -(-len(chosen) // cols)
    title_w = text_size(title)[0] + 2 * margin if title else 0
    width = max(cols * cell_w + (cols + 1) * margin, title_w)
    height = title_h + rows * (tile_px + caption_h) + (rows + 1) * margin
    canvas = np.full((height, width, 3), 255, np.uint8)

    def draw_text(at: tuple[int, int], value: str) -> None:
        cv2.putText(canvas, value, at, cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), 1, cv2.LINE_AA)

    if title:
        draw_text((margin, margin + line_h - 4), title)
    boxes = np.zeros((len(chosen), 4), dtype=np.int64)
    for rank, index in enumerate(chosen):
        corner = (int(coords[index, 0]), int(coords[index, 1]))
        pixels = slide.read_region(corner, patch_level, (read_px, read_px))
        if read_px != tile_px:
            pixels = cv2.resize(pixels, (tile_px, tile_px), interpolation=cv2.INTER_AREA)
        row, col = divmod(rank, cols)
        left = margin + col * (cell_w + margin)
        top = title_h + margin + row * (tile_px + caption_h + margin)
        canvas[top : top + tile_px, left : left + tile_px] = pixels
        boxes[rank] = (left, top, tile_px, tile_px)
        draw_text((left, top + tile_px + line_h), captions[rank][0])
        draw_text((left, top + tile_px + 2 * line_h), captions[rank][1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, canvas)
    return TopPatchGallery(path, chosen, scores[chosen], boxes)
