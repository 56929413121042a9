import cv2
import numpy as np
import pytest

from medai.io.wsi import open_slide
from medai.transforms.tissue import TissueConfig, detect_tissue, tissue_geojson, tissue_overlay


def _thumb(path, downsample=8.0):
    with open_slide(path) as slide:
        rgb = slide.read_downsampled(downsample)
        scale = (slide.dimensions[0] / rgb.shape[1], slide.dimensions[1] / rgb.shape[0])
        return rgb, scale, slide.mpp, slide.dimensions


def test_he_tissue_found_and_glass_excluded(wsi_cmu1_small_region_path):
    rgb, scale, mpp, _dims = _thumb(wsi_cmu1_small_region_path)
    tissue = detect_tissue(rgb, scale, mpp, TissueConfig())
    assert 0.2 < tissue.tissue_fraction < 0.45
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    # tissue pixels are the stained ones; the glass outside is not tissue
    assert sat[tissue.mask == 1].mean() > 3 * sat[tissue.mask == 0].mean()
    assert tissue.mask[:20, -60:].sum() == 0  # top-right corner is glass in this slide


def test_blue_stained_tissue_is_not_taken_for_pen(wsi_dicom_google_path):
    rgb, scale, mpp, _ = _thumb(wsi_dicom_google_path / "raw.dicom", downsample=1.0)
    tissue = detect_tissue(rgb, scale, mpp, TissueConfig())
    assert tissue.tissue_fraction > 0.5  # Giemsa-like blue stain covers most of this field


def test_pen_marks_and_black_marker_are_removed(wsi_cmu1_small_region_path):
    rgb, scale, mpp, _ = _thumb(wsi_cmu1_small_region_path)
    clean = detect_tissue(rgb, scale, mpp, TissueConfig())
    inked = rgb.copy()
    strokes = np.zeros(rgb.shape[:2], np.uint8)
    # blue and green ink circling the tissue on glass, a black marker dot, as pathologists draw them
    cv2.ellipse(inked, (60, 300), (40, 60), 0, 0, 360, (30, 60, 200), 4)
    cv2.ellipse(strokes, (60, 300), (40, 60), 0, 0, 360, 1, 4)
    cv2.line(inked, (20, 40), (120, 60), (40, 160, 60), 5)
    cv2.line(strokes, (20, 40), (120, 60), 1, 5)
    cv2.circle(inked, (240, 340), 10, (15, 15, 20), -1)
    cv2.circle(strokes, (240, 340), 10, 1, -1)
    glass = strokes.astype(bool) & (clean.mask == 0)
    assert glass.sum() > 300
    tissue = detect_tissue(inked, scale, mpp, TissueConfig())
    assert tissue.mask[glass].sum() == 0
    assert tissue.artefact_fraction > 0.005
    without_pen_removal = detect_tissue(inked, scale, mpp, TissueConfig(remove_pen=False))
    assert without_pen_removal.mask[glass].sum() > 0  # the check above can fail
    assert abs(tissue.tissue_fraction - clean.tissue_fraction) < 0.02


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(240, 3, (400, 300, 3)), 0, 255).astype(np.uint8)
    tissue = detect_tissue(glass, (16.0, 16.0), 0.5, TissueConfig())
    assert tissue.mask.sum() == 0 and tissue.polygons == []


def test_geojson_polygons_are_level0_and_match_the_mask(wsi_cmu1_small_region_path):
    from shapely.geometry import shape

    rgb, scale, mpp, dims = _thumb(wsi_cmu1_small_region_path)
    tissue = detect_tissue(rgb, scale, mpp, TissueConfig())
    collection = tissue_geojson(tissue)
    assert collection["type"] == "FeatureCollection" and collection["features"]
    area = 0.0
    for feature in collection["features"]:
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and feature["properties"]["objectType"] == "annotation"
        minx, miny, maxx, maxy = geometry.bounds
        assert minx >= 0 and miny >= 0 and maxx <= dims[0] and maxy <= dims[1]
        area += geometry.area
    assert area == pytest.approx(tissue.mask.sum() * scale[0] * scale[1], rel=0.1)
    assert tissue_overlay(rgb, tissue).shape == rgb.shape
