"""MIL attention on a real slide: per-branch heatmaps through the WSI renderer, top-patch galleries."""

import json

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medai.models import registry as models
from medai.cli import app
from medai.errors import ConfigError
from medai.io.patch_h5 import read_coords_h5
from medai.io.wsi import open_slide
from medai.results.heatmap import load_scores
from medai.pipelines.mil_heatmaps import parse_branch_spec

# ACMIL with 3 branches on EfficientNet-Lite0 features (1280-d); small widths keep it fast.
ACMIL = {"in_features": 1280, "hidden_features": 32, "attention_features": 16, "num_branches": 3}


@pytest.fixture(scope="module")
def cmu_features(tmp_path_factory, wsi_cmu1_small_region_path):
    """Features HDF5 of CMU-1-Small-Region from the WSI pipeline (32 px patches at 2 µm/px)."""
    from medai.pipelines.extract_features import (
        EncoderConfig,
        ExtractConfig,
        SlideEntry,
        build_encoder,
        run_extraction,
    )
    from medai.pipelines.slides import PatchConfig

    out = tmp_path_factory.mktemp("extract")
    cfg = ExtractConfig(
        out_dir=out,
        patch=PatchConfig(patch_size=32, target_mpp=2.0),
        batch_size=32,
        num_workers=0,
        progress=False,
    )
    entry = SlideEntry(wsi_cmu1_small_region_path, "cmu")
    run_extraction([entry], cfg, build_encoder(EncoderConfig()))
    return out / "features" / "cmu.h5"


@pytest.fixture(scope="module")
def acmil_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = models.create_model("acmil", **ACMIL)
    return models.save_weights(model, tmp_path_factory.mktemp("weights") / "acmil.safetensors")


def _mil_attention(weights, features, out, slide=None, branch="all"):
    """Run `medai mil attention` on one slide's features; with `slide`, draw on it too."""
    args = ["mil", "attention", "acmil", str(weights), str(features), "--out", str(out)]
    args += [arg for key, value in ACMIL.items() for arg in ("-o", f"{key}={value}")]
    if slide is not None:
        args += ["--slide", str(slide), "--branch", branch, "--top-k", "4"]
    return CliRunner().invoke(app, args)


def test_mil_attention_draws_each_branch_on_the_slide(
    tmp_path, cmu_features, acmil_weights, wsi_cmu1_small_region_path
):
    result = _mil_attention(acmil_weights, cmu_features, tmp_path, wsi_cmu1_small_region_path)
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "cmu.npz")
    branch_scores, slide_scores = saved["branch_scores"], saved["slide_scores"]
    coords, attrs = read_coords_h5(cmu_features)
    size = int(attrs["patch_size_level0"])
    assert branch_scores.shape == (3, len(coords)) and np.array_equal(saved["coords"], coords)
    heatmaps = []
    for k in range(3):
        scores, score_coords = load_scores(tmp_path / "cmu.npz", branch=k)
        np.testing.assert_array_equal(scores, branch_scores[k])
        np.testing.assert_array_equal(score_coords, coords)
        # what the renderer drew for branch k: one GeoJSON square per patch with its score
        geojson = tmp_path / f"cmu_branch{k}_heatmap.geojson"
        drawn = json.loads(geojson.read_text())["features"]
        label = f"acmil attention (branch {k})"
        measured = [f["properties"]["measurements"][label] for f in drawn]
        np.testing.assert_array_equal(measured, branch_scores[k].astype(np.float64))
        corners = [f["geometry"]["coordinates"][0][0] for f in drawn]
        np.testing.assert_array_equal(corners, coords)
        heatmaps.append(cv2.imread(str(tmp_path / f"cmu_branch{k}_heatmap.png")))
        assert (tmp_path / f"cmu_branch{k}_region.png").is_file()
        # branch k's best patch, read from the slide at the patch level, is a tile of its gallery
        with open_slide(wsi_cmu1_small_region_path) as slide:
            corner = tuple(coords[np.argmax(branch_scores[k])])
            best = slide.read_region(corner, int(attrs["patch_level"]), (size, size))
        gallery = cv2.imread(str(tmp_path / f"cmu_branch{k}_top4.png"))
        match = cv2.matchTemplate(gallery, cv2.cvtColor(best, cv2.COLOR_RGB2BGR), cv2.TM_SQDIFF)
        assert match.min() == 0
    assert not np.array_equal(heatmaps[0], heatmaps[1])  # the branches attend differently
    drawn = json.loads((tmp_path / "cmu_mean_heatmap.geojson").read_text())["features"]
    mean = [f["properties"]["measurements"]["acmil attention (branch mean)"] for f in drawn]
    np.testing.assert_allclose(mean, slide_scores, rtol=1e-6)


def test_slides_heatmap_draws_a_chosen_branch_of_the_npz(
    tmp_path, cmu_features, acmil_weights, wsi_cmu1_small_region_path
):
    result = _mil_attention(acmil_weights, cmu_features, tmp_path)  # npz only, no slide
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob("*_heatmap.png"))
    branch_scores = np.load(tmp_path / "cmu.npz")["branch_scores"]
    slide, npz = str(wsi_cmu1_small_region_path), str(tmp_path / "cmu.npz")
    args = ["slides", "heatmap", slide, str(cmu_features), npz]
    out = ["--out", str(tmp_path / "hm" / "b2")]
    drawn = CliRunner().invoke(app, [*args, "--key", "branch_scores:2", *out])
    assert drawn.exit_code == 0, drawn.output
    features = json.loads((tmp_path / "hm" / "b2_heatmap.geojson").read_text())["features"]
    measured = [f["properties"]["measurements"]["attention"] for f in features]
    np.testing.assert_array_equal(measured, branch_scores[2].astype(np.float64))
    flattened = CliRunner().invoke(
        app, [*args, "--key", "branch_scores", *out], env={"COLUMNS": "200"}
    )
    assert flattened.exit_code == 2 and "3 attention branches" in flattened.output


def test_unknown_branch_is_refused(
    tmp_path, cmu_features, acmil_weights, wsi_cmu1_small_region_path
):
    result = _mil_attention(
        acmil_weights, cmu_features, tmp_path, wsi_cmu1_small_region_path, branch="3"
    )
    assert result.exit_code == 2 and "no branch 3" in " ".join(result.output.split())
    assert not list(tmp_path.iterdir())  # refused before anything is written
    assert parse_branch_spec("all", 3) == ["mean", 0, 1, 2]
    assert parse_branch_spec("all", 1) == ["mean"]  # one branch: it is the mean
    assert parse_branch_spec("2, mean,2", 3) == [2, "mean"]
    with pytest.raises(ConfigError, match="branch number"):
        parse_branch_spec("first", 3)
