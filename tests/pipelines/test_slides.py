import numpy as np
import pytest

from medai.io.patch_h5 import read_coords_h5, write_coords_h5
from medai.io.wsi import MppUnknownError, NoTissueError, WSIError, open_slide
from medai.pipelines.slides import (
    PatchConfig,
    build_patch_grid,
    patch_slide,
    segment_slide,
    tissue_fraction_per_patch,
)


def test_patch_grid_at_physical_resolution(wsi_cmu1_small_region_path, tmp_path):
    with open_slide(wsi_cmu1_small_region_path) as slide:
        grid, seg = patch_slide(
            slide, tmp_path, "cmu", patch_cfg=PatchConfig(patch_size=256, target_mpp=0.5)
        )
    assert grid.patch_size_level0 == round(256 * 0.5 / 0.499) == 257
    assert grid.patch_level == 0 and grid.read_size == 257
    assert 20 < len(grid.coords) < 60  # the tissue strip of this 2220 x 2967 crop
    assert (grid.coords % 257 == 0).all()
    assert (grid.coords[:, 0] + 257 <= 2220).all() and (grid.coords[:, 1] + 257 <= 2967).all()
    fraction = tissue_fraction_per_patch(seg.tissue.mask, seg.tissue.downsample, grid.coords, 257)
    assert (fraction >= 0.25).all()
    for name in (
        "tissue/cmu_mask.png",
        "tissue/cmu_overlay.png",
        "tissue/cmu.geojson",
        "patches/cmu.h5",
        "patches/cmu_patches.png",
    ):
        assert (tmp_path / name).is_file(), name
    coords, attrs = read_coords_h5(tmp_path / "patches" / "cmu.h5")
    assert np.array_equal(coords, grid.coords)
    assert (
        attrs["patch_size"] == 256
        and attrs["patch_level"] == 0
        and attrs["patch_size_level0"] == 257
    )
    assert attrs["level0_mpp"] == pytest.approx(0.499) and attrs["mpp"] == 0.5
    assert attrs["target_magnification"] == pytest.approx(20.0)


def test_patch_grid_reads_from_a_coarser_level(wsi_tcga_cr_7395_path):
    # the slide carries no mpp: with 0.25 µm/px given, 256 px at 0.5 µm/px come from level 1 (downsample ~2)
    with open_slide(wsi_tcga_cr_7395_path, mpp=0.25) as slide:
        seg = segment_slide(slide, None, "tcga")
        grid = build_patch_grid(
            slide, seg.tissue, "tcga", PatchConfig(patch_size=256, target_mpp=0.5)
        )
    assert grid.patch_size_level0 == 512 and grid.patch_level == 1 and grid.read_size == 256
    assert grid.mpp_source == "user"
    assert 25 < len(grid.coords) < 60  # 8 x 6 grid cells of 512 px over a mostly-tissue slide


def test_patch_grid_refuses_unknown_scale_upsampling_and_blank(
    wsi_tcga_cr_7395_path, wsi_dicom_google_path
):
    with open_slide(wsi_tcga_cr_7395_path) as slide:
        seg = segment_slide(slide, None, "tcga")
        with pytest.raises(MppUnknownError):
            build_patch_grid(slide, seg.tissue, "tcga")
    with open_slide(wsi_dicom_google_path / "raw.dicom") as slide:
        seg = segment_slide(slide, None, "dicom")
        with pytest.raises(WSIError, match="coarser than"):
            build_patch_grid(slide, seg.tissue, "dicom", PatchConfig(target_mpp=0.5))
        seg.tissue.mask[:] = 0
        with pytest.raises(NoTissueError):
            build_patch_grid(
                slide, seg.tissue, "dicom", PatchConfig(patch_size=32, target_mpp=16.0)
            )


def test_clam_style_coords_file_is_read(tmp_path):
    import h5py

    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as handle:
        dset = handle.create_dataset("coords", data=np.array([[0, 0], [512, 0]]))
        dset.attrs.update(patch_size=256, patch_level=1, downsample=np.array([2.0, 2.0]))
    coords, attrs = read_coords_h5(path)
    assert coords.dtype == np.int64 and attrs["patch_size_level0"] == 512


def test_coords_round_trip_is_atomic(tmp_path, wsi_cmu1_small_region_path):
    with open_slide(wsi_cmu1_small_region_path) as slide:
        seg = segment_slide(slide, None, "cmu")
        grid = build_patch_grid(slide, seg.tissue, "cmu")
    write_coords_h5(tmp_path / "x.h5", grid)
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5"]  # no temporaries left beside it
