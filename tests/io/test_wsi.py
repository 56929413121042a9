import json

import numpy as np
import pytest

from medai.io.wsi import (
    MppUnknownError,
    WSIOpenError,
    WSIReadError,
    list_slides,
    open_slide,
)
from tests.io.synthetic_slides import corrupt_tiles, crop_of_real_slide, write_tiled_tiff


def test_aperio_svs_dimensions_levels_mpp(wsi_cmu1_small_region_path):
    for backend in ("openslide", "tiffslide"):
        with open_slide(wsi_cmu1_small_region_path, backend=backend) as slide:
            info = slide.info()
            assert info.backend == backend and info.vendor == "aperio"
            assert info.dimensions == (2220, 2967) and info.level_count == 1
            assert info.mpp == pytest.approx(0.499) and info.mpp_source == "vendor"
            assert info.objective_power == 20
            assert set(info.associated_images) == {"label", "macro", "thumbnail"}
            assert slide.associated_image("label").ndim == 3


def test_openslide_and_tiffslide_read_identical_pixels(wsi_cmu1_small_region_path):
    a = open_slide(wsi_cmu1_small_region_path, backend="openslide")
    b = open_slide(wsi_cmu1_small_region_path, backend="tiffslide")
    for loc in (
        (0, 0),
        (1000, 1500),
        (2100, 2900),
    ):  # the last one runs past the edge: white padding
        ra, rb = a.read_region(loc, 0, (256, 256)), b.read_region(loc, 0, (256, 256))
        assert ra.dtype == np.uint8 and ra.shape == (256, 256, 3)
        assert np.array_equal(ra, rb)
    assert (a.read_region((2100, 2900), 0, (256, 256))[200:, 200:] == 255).all()


def test_jpeg2000_svs_without_mpp_needs_the_flag(wsi_tcga_cr_7395_path):
    with open_slide(wsi_tcga_cr_7395_path) as slide:
        assert slide.dimensions == (4443, 3567) and slide.level_count == 2
        assert slide.level_downsamples[1] == pytest.approx(2.0005, abs=1e-3)
        assert slide.mpp is None
        with pytest.raises(MppUnknownError, match="--mpp"):
            slide.require_mpp()
        # the JPEG 2000 tiles decode to real tissue, not an empty canvas
        assert slide.read_region((1500, 1500), 1, (128, 128)).mean() < 240
    with open_slide(wsi_tcga_cr_7395_path, mpp=0.25) as slide:
        assert slide.require_mpp() == 0.25 and slide.mpp_source == "user"


def test_generic_tiff_meaningless_mpp_is_ignored(wsi_small_he_levels_path):
    with open_slide(wsi_small_he_levels_path) as slide:
        assert slide.dimensions == (300, 250) and slide.level_count == 4
        assert [d for d in slide.level_dimensions] == [(300, 250), (150, 125), (75, 62), (37, 31)]
        assert slide.mpp is None and any("352.9" in n for n in slide.notes)
        with pytest.raises(MppUnknownError):
            slide.require_mpp()


@pytest.mark.parametrize("encoding", ["raw", "jpeg", "jpeg2000"])
def test_dicom_wsi_all_encodings(wsi_dicom_google_path, encoding):
    path = wsi_dicom_google_path / f"{encoding}.dicom"
    with open_slide(path, backend="wsidicom") as dicom, open_slide(path) as auto:
        for slide in (dicom, auto):
            assert slide.dimensions == (957, 715) and slide.level_count == 1
            assert slide.mpp == pytest.approx(16.783, abs=1e-3)
        assert np.array_equal(
            dicom.read_region((300, 200), 0, (64, 48)), auto.read_region((300, 200), 0, (64, 48))
        )


def test_dicom_encodings_decode_to_the_same_image(wsi_dicom_google_path):
    raw = open_slide(wsi_dicom_google_path / "raw.dicom", backend="wsidicom").read_region(
        (0, 0), 0, (957, 715)
    )
    j2k = open_slide(wsi_dicom_google_path / "jpeg2000.dicom", backend="wsidicom").read_region(
        (0, 0), 0, (957, 715)
    )
    assert np.abs(raw.astype(int) - j2k.astype(int)).mean() < 4  # lossy, but the same slide


def test_list_slides_splits_dicom_series(shared_data):
    names = [p.name for p in list_slides(shared_data / "wsi")]
    assert names == [
        "CMU-1-Small-Region.svs",
        "jpeg.dicom",
        "jpeg2000.dicom",
        "raw.dicom",
        "small_HE_levels.tiff",
        "tcga-cr-7395-01a-01-ts1.svs",
    ]


def test_read_downsampled_chunks_tile_without_seams(wsi_cmu1_small_region_path):
    import cv2

    with open_slide(wsi_cmu1_small_region_path) as slide:
        small = slide.read_downsampled(8, chunk_px=512)
        full = slide.read_region((0, 0), 0, slide.dimensions)
    assert small.shape == (371, 278, 3)
    for y, x in (
        (0, 0),
        (512, 1024),
        (1536, 1536),
    ):  # each chunk is an exact area-resize of its block
        block = cv2.resize(full[y : y + 512, x : x + 512], (64, 64), interpolation=cv2.INTER_AREA)
        assert np.array_equal(small[y // 8 : y // 8 + 64, x // 8 : x // 8 + 64], block)


def test_bad_inputs_raise_typed_errors(tmp_path, wsi_cmu1_small_region_path):
    with pytest.raises(WSIOpenError, match="no such file"):
        open_slide(tmp_path / "absent.svs")
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"not a slide" * 100)
    with pytest.raises(WSIOpenError) as info:
        open_slide(garbage)
    assert "openslide" in str(info.value) and "tiffslide" in str(info.value)
    with open_slide(wsi_cmu1_small_region_path) as slide:
        with pytest.raises(WSIReadError, match="level 3 does not exist"):
            slide.read_region((0, 0), 3, (10, 10))
        with pytest.raises(WSIReadError, match="no associated image"):
            slide.associated_image("overview")


def test_corrupt_jpeg_tile_is_a_read_error(tmp_path, wsi_cmu1_small_region_path):
    path = write_tiled_tiff(
        tmp_path / "corrupt.tif", crop_of_real_slide(wsi_cmu1_small_region_path)
    )
    corrupt_tiles(path, tiles=(5,))
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5) and slide.vendor == "generic-tiff"
        assert slide.read_region((0, 0), 0, (256, 256)).shape == (256, 256, 3)  # intact tile reads
        with pytest.raises(WSIReadError, match="Corrupt JPEG"):
            slide.read_region((256, 256), 0, (256, 256))


def test_info_is_json_serialisable(wsi_cmu1_small_region_path):
    with open_slide(wsi_cmu1_small_region_path) as slide:
        data = json.loads(json.dumps(slide.info().to_dict()))
    assert data["level_dimensions"] == [[2220, 2967]] and data["mpp"] == pytest.approx(0.499)
