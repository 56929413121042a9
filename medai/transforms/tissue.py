"""Tissue detection on a low-resolution RGB image of a slide: mask, contours, GeoJSON, overlay.

Method (the standard one in CLAM and TRIDENT, with the clean-up their users ask for):
1. Saturation (HSV) after a median blur; Otsu's threshold computed over the pixels that are
   not near-black, never below `saturation_floor` (so a blank slide yields no tissue instead of
   Otsu splitting glass noise in two).
2. Artefacts removed before morphology: near-black pixels (marker, slide edges, dust), and pen
   ink whose hue is blue or green *when the tissue's own stain is not that colour* (a Giemsa or
   trichrome slide is blue/green tissue, not pen). Red pen is indistinguishable from eosin by
   colour and is not removed.
3. Morphological opening then closing, hole filling for holes smaller than `max_hole_area_mm2`
   (lumina and fat bigger than that stay excluded), and removal of components smaller than
   `min_tissue_area_mm2`. Areas are physical when the slide's mpp is known, else fractions of
   the image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medai.utils import optional_import


@dataclass
class TissueConfig:
    """Tissue detection parameters (defaults suit H&E and most special stains)."""

    seg_mpp: float = 4.0  # resolution the mask is computed at when the slide's mpp is known
    seg_max_side: int = 4096  # cap on the mask's longer side (also used when mpp is unknown)
    median_blur_px: int = 7
    saturation_floor: int = 15  # 0-255: saturation below this is never tissue
    dark_value: int = 30  # 0-255 HSV value: near-black below this is artefact, not tissue
    remove_pen: bool = True
    pen_min_saturation: int = 80  # ink is strongly saturated; stained tissue rarely this blue/green
    open_px: int = 3
    close_px: int = 7
    min_tissue_area_mm2: float = 0.002  # about 45 x 45 µm: keeps thin detached strands, drops dust
    max_hole_area_mm2: float = 0.01
    min_tissue_area_frac: float = 1e-4  # used instead when mpp is unknown
    max_hole_area_frac: float = 1e-4


@dataclass
class TissueMask:
    """A binary tissue mask at `downsample` x level 0, with its contours in level-0 px."""

    mask: np.ndarray  # uint8 (h, w), 1 = tissue
    downsample: tuple[float, float]  # level-0 px per mask px, (x, y)
    polygons: list[
        list[np.ndarray]
    ]  # per component: [exterior, hole, ...], each (n, 2) level-0 (x, y)
    threshold: int  # the saturation threshold used
    artefact_fraction: float  # fraction of the image removed as pen/black artefact

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _circular_median_hue(hue: np.ndarray) -> float:
    """Median hue on OpenCV's 0-180 circle (red wraps around 0/180)."""
    angles = hue.astype(np.float64) * (2 * np.pi / 180)
    mean = np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())
    return float((mean * 180 / (2 * np.pi)) % 180)


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 180
    return min(d, 180 - d)


def detect_tissue(
    rgb: np.ndarray, downsample: tuple[float, float], mpp: float | None, cfg: TissueConfig
) -> TissueMask:
    """Return the tissue mask of an RGB uint8 image taken at `downsample` of a slide of level-0 `mpp`."""
    cv2 = optional_import("cv2", "tissue detection", "wsi")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected RGB uint8 (h, w, 3), got {rgb.dtype} {rgb.shape}")
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    k = cfg.median_blur_px | 1
    sat_blur = cv2.medianBlur(sat, k) if min(sat.shape) > k else sat
    dark = val < cfg.dark_value
    candidates = sat_blur[~dark]
    if candidates.size and candidates.max() > candidates.min():
        otsu, _ = cv2.threshold(
            candidates.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU
        )
    else:
        otsu = 255
    threshold = int(max(otsu, cfg.saturation_floor))
    tissue = (sat_blur > threshold) & ~dark

    artefact = dark.copy()
    if cfg.remove_pen and tissue.any():
        stain_hue = _circular_median_hue(hue[tissue])
        strong = sat > cfg.pen_min_saturation
        # (centre, half-width) of blue and green ink on OpenCV's 0-180 hue circle
        for centre, half in ((112.0, 14.0), (62.0, 26.0)):
            if _hue_distance(stain_hue, centre) <= half + 10:
                continue  # the stain itself is this colour: it is tissue, not ink
            ink = strong & (np.abs(hue.astype(np.int16) - int(centre)) <= half)
            artefact |= ink
    # Ink lines are thin: grow them slightly so their anti-aliased rims go too.
    artefact = cv2.dilate(artefact.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    tissue &= ~artefact

    mask = tissue.astype(np.uint8)
    if cfg.open_px > 1:
        mask = cv2.morphologyEx(
            mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (cfg.open_px,) * 2)
        )
    if cfg.close_px > 1:
        mask = cv2.morphologyEx(
            mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (cfg.close_px,) * 2)
        )
    mask &= ~artefact.astype(np.uint8) & 1  # closing must not bridge back over ink

    if mpp is not None:
        px_area_mm2 = (mpp * downsample[0] / 1000) * (mpp * downsample[1] / 1000)
        min_area = cfg.min_tissue_area_mm2 / px_area_mm2
        max_hole = cfg.max_hole_area_mm2 / px_area_mm2
    else:
        min_area = cfg.min_tissue_area_frac * mask.size
        max_hole = cfg.max_hole_area_frac * mask.size
    mask, polygons = _clean_components(cv2, mask, min_area, max_hole, downsample)
    return TissueMask(mask, downsample, polygons, threshold, float(artefact.mean()))


def _clean_components(
    cv2: Any, mask: np.ndarray, min_area: float, max_hole: float, downsample: tuple[float, float]
) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """Fill small holes, drop small components; return the clean mask and level-0 polygons."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    clean = np.zeros_like(mask)
    polygons: list[list[np.ndarray]] = []
    if hierarchy is None:
        return clean, polygons
    hierarchy = hierarchy[0]
    scale = np.array(downsample, dtype=np.float64)
    for i, (_, _, first_child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        holes = []
        child = first_child
        while child != -1:
            if cv2.contourArea(contours[child]) > max_hole:
                holes.append(contours[child])
            child = hierarchy[child][0]
        area = cv2.contourArea(contours[i]) - sum(cv2.contourArea(h) for h in holes)
        if area < min_area:
            continue
        cv2.drawContours(clean, [contours[i]], -1, 1, thickness=cv2.FILLED)
        if holes:
            cv2.drawContours(clean, holes, -1, 0, thickness=cv2.FILLED)
        rings = [contours[i]] + holes
        polygons.append([(ring.reshape(-1, 2).astype(np.float64) * scale) for ring in rings])
    return clean, polygons


def tissue_geojson(tissue: TissueMask, name: str = "Tissue") -> dict[str, Any]:
    """Return tissue polygons as a QuPath-compatible GeoJSON FeatureCollection (level-0 px)."""
    shapely_geometry = optional_import("shapely.geometry", "tissue GeoJSON", "wsi")
    shapely_validation = optional_import("shapely.validation", "tissue GeoJSON", "wsi")
    features = []
    for rings in tissue.polygons:
        ext = rings[0]
        if len(ext) < 3:
            continue
        polygon = shapely_geometry.Polygon(ext, [h for h in rings[1:] if len(h) >= 3])
        if not polygon.is_valid:
            polygon = shapely_validation.make_valid(polygon)
        geometry = shapely_geometry.mapping(polygon)
        features.append(
            {
                "type": "Feature",
                "geometry": json.loads(json.dumps(geometry)),  # tuples -> lists
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": [0, 170, 0]},
                    "area_px_level0": float(polygon.area),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def tissue_overlay(rgb: np.ndarray, tissue: TissueMask) -> np.ndarray:
    """Return the image with tissue tinted green and its outline drawn (RGB uint8)."""
    cv2 = optional_import("cv2", "tissue overlay", "wsi")
    out = rgb.copy()
    green = np.array([0, 200, 0], np.float32)
    sel = tissue.mask.astype(bool)
    out[sel] = (0.7 * out[sel] + 0.3 * green).astype(np.uint8)
    contours, _ = cv2.findContours(tissue.mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(rgb.shape[:2]) / 600))
    cv2.drawContours(out, contours, -1, (0, 120, 0), thickness)
    return out


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB (or single-channel) uint8 array as PNG."""
    cv2 = optional_import("cv2", "writing PNG", "wsi")
    array = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")
