import json

import cv2
import numpy as np
import pytest

from medai.io.wsi import open_slide
from medai.results.heatmap import normalize_scores, render_heatmap
from medai.pipelines.slides import build_patch_grid, segment_slide


def test_normalize_scores():
    np.testing.assert_allclose(normalize_scores(np.array([3.0, 1.0, 2.0])), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(
        normalize_scores(np.array([1.0, 1.0, 5.0])), [0.25, 0.25, 1.0]
    )  # ties share a rank
    np.testing.assert_allclose(normalize_scores(np.array([2.0, 4.0]), "minmax"), [0.0, 1.0])
    with pytest.raises(ValueError, match="non-finite"):
        normalize_scores(np.array([0.1, np.nan]))


def test_heatmap_overlay_region_and_geojson(tmp_path, wsi_cmu1_small_region_path):
    with open_slide(wsi_cmu1_small_region_path) as slide:
        seg = segment_slide(slide, None, "cmu")
        grid = build_patch_grid(slide, seg.tissue, "cmu")
        scores = grid.coords[:, 1].astype(float)  # attention rising from top to bottom
        bottom = grid.coords[np.argmax(scores)]
        region = (int(bottom[0]) - 514, int(bottom[1]) - 771, 1028, 1028)
        files = render_heatmap(
            slide,
            grid.coords,
            scores,
            grid.patch_size_level0,
            tmp_path / "cmu",
            thumbnail_max_side=800,
            region=region,
        )
        thumb = slide.read_downsampled(max(slide.dimensions) / 800)
    heat = cv2.cvtColor(cv2.imread(str(files["heatmap"])), cv2.COLOR_BGR2RGB)
    assert (
        heat.shape[0] == thumb.shape[0] and heat.shape[1] > thumb.shape[1]
    )  # colour bar added on the right
    scale = thumb.shape[1] / 2220
    size = int(grid.patch_size_level0 * scale)
    top = grid.coords[np.argmin(scores)]
    bottom = grid.coords[np.argmax(scores)]

    def centre(c):
        return heat[int(c[1] * scale) + size // 2, int(c[0] * scale) + size // 2].astype(int)

    assert centre(top)[2] > centre(top)[0]  # jet: low attention is blue
    assert centre(bottom)[0] > centre(bottom)[2]  # high attention is red
    covered = np.zeros(thumb.shape[:2], bool)
    for x, y in grid.coords:
        covered[
            int(y * scale) : int(y * scale) + size + 1, int(x * scale) : int(x * scale) + size + 1
        ] = True
    assert np.array_equal(
        heat[: thumb.shape[0], : thumb.shape[1]][~covered], thumb[~covered]
    )  # glass untouched
    region = cv2.imread(str(files["region"]))
    assert region.shape[0] == 1028  # full resolution
    assert (
        region[771 + 128, 514 + 128][2] > region[771 + 128, 514 + 128][0]
    )  # BGR: the top patch is red
    collection = json.loads(files["geojson"].read_text())
    assert len(collection["features"]) == len(grid.coords)
    props = collection["features"][int(np.argmax(scores))]["properties"]
    assert props["measurements"]["attention"] == scores.max() and props["objectType"] == "detection"


def test_cli_renders_mil_attention_npz(tmp_path, wsi_cmu1_small_region_path):
    from typer.testing import CliRunner

    from medai.cli import app
    from medai.io.patch_h5 import write_coords_h5

    with open_slide(wsi_cmu1_small_region_path) as slide:
        grid = build_patch_grid(slide, segment_slide(slide, None, "cmu").tissue, "cmu")
    h5 = write_coords_h5(tmp_path / "cmu.h5", grid)
    scores = np.linspace(0, 1, len(grid.coords))
    # the layout `medai mil attention` writes (pipelines/mil_heatmaps.save_attention_maps)
    np.savez(
        tmp_path / "att.npz", slide_scores=scores, branch_scores=scores[None], coords=grid.coords
    )
    args = [
        "slides",
        "heatmap",
        str(wsi_cmu1_small_region_path),
        str(h5),
        str(tmp_path / "att.npz"),
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "hm" / "cmu")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hm" / "cmu_heatmap.png").is_file() and (
        tmp_path / "hm" / "cmu_region.png"
    ).is_file()
    np.savez(tmp_path / "other.npz", slide_scores=scores, coords=grid.coords + 1)
    args[-1] = str(tmp_path / "other.npz")
    mismatch = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "x")], env={"COLUMNS": "200"}
    )
    assert mismatch.exit_code == 2 and "coords differ" in mismatch.output


def test_load_scores_selects_one_branch_of_k(tmp_path):
    from medai.results.heatmap import load_scores, select_branch

    branch_scores = np.arange(12, dtype=np.float32).reshape(3, 4) / 66  # K=3 branches, N=4 patches
    coords = np.array([[0, 0], [256, 0], [0, 256], [256, 256]])
    path = tmp_path / "att.npz"
    np.savez(path, branch_scores=branch_scores, slide_scores=branch_scores.mean(0), coords=coords)
    for k in range(3):
        scores, got_coords = load_scores(path, branch=k)
        np.testing.assert_array_equal(scores, branch_scores[k])
        by_key, _ = load_scores(path, key=f"branch_scores:{k}")
        np.testing.assert_array_equal(by_key, branch_scores[k])
        np.testing.assert_array_equal(got_coords, coords)
    mean, _ = load_scores(path, branch="mean")
    np.testing.assert_allclose(mean, branch_scores.mean(0), rtol=1e-6)
    default, _ = load_scores(path)  # slide_scores, as before
    np.testing.assert_array_equal(default, branch_scores.mean(0))
    with pytest.raises(ValueError, match="3 attention branches"):
        load_scores(path, key="branch_scores")  # never flattened into 12 'patches'
    with pytest.raises(ValueError, match="no branch 3"):
        load_scores(path, branch=3)
    with pytest.raises(ValueError, match="'mean' or a branch number"):
        load_scores(path, key="branch_scores:first")
    # K=1 needs no choice, and an (N, 1) column is one score per patch
    np.testing.assert_array_equal(select_branch(branch_scores[:1]), branch_scores[0])
    np.testing.assert_array_equal(select_branch(branch_scores[0][:, None]), branch_scores[0])


def test_top_patch_gallery_shows_the_k_best_patches_from_the_slide(
    tmp_path, wsi_cmu1_small_region_path
):
    from medai.results.heatmap import render_top_patches

    with open_slide(wsi_cmu1_small_region_path) as slide:
        grid = build_patch_grid(slide, segment_slide(slide, None, "cmu").tissue, "cmu")
        scores = np.random.default_rng(0).permutation(len(grid.coords)) / len(grid.coords)
        gallery = render_top_patches(
            slide, grid.coords, scores, grid.patch_size_level0, tmp_path / "top.png", k=5, columns=3
        )
        size = grid.patch_size_level0  # level 0 patches: tiles are the slide's own pixels
        best = grid.coords[np.argmax(scores)]
        best_region = slide.read_region(tuple(best), 0, (size, size))
        regions = [
            slide.read_region(tuple(grid.coords[i]), 0, (size, size)) for i in gallery.indices
        ]
    image = cv2.cvtColor(cv2.imread(str(gallery.path)), cv2.COLOR_BGR2RGB)
    assert len(gallery.boxes) == 5
    np.testing.assert_array_equal(gallery.indices, np.argsort(-scores)[:5])
    x, y, w, h = gallery.boxes[0]
    assert w == h == size
    # the first tile is the slide region of the highest-scoring patch, pixel for pixel
    np.testing.assert_array_equal(image[y : y + h, x : x + w], best_region)
    row_tops = sorted({int(b[1]) for b in gallery.boxes})
    assert len(row_tops) == 2  # 5 tiles in rows of 3
    painted = np.zeros(image.shape[:2], bool)
    for (x, y, w, h), region in zip(gallery.boxes, regions):
        np.testing.assert_array_equal(image[y : y + h, x : x + w], region)
        below = ([t for t in row_tops if t > y] or [image.shape[0]])[0]
        assert (image[y + h : below, x : x + w] < 128).any()  # rank and score under each tile
        painted[y:below, x : x + w] = True
    assert (image[~painted] == 255).all()  # nothing but the 5 tiles and their captions
