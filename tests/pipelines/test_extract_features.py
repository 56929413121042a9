import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from medai.io.patch_h5 import read_patch_features
from medai.io.wsi import open_slide
from medai.pipelines.extract_features import (
    EncoderConfig,
    ExtractConfig,
    SlideEntry,
    SlideLock,
    build_encoder,
    read_slide_list,
    run_extraction,
)
from medai.pipelines.slides import PatchConfig
from tests.io.synthetic_slides import corrupt_tiles, crop_of_real_slide, write_tiled_tiff

# Small patches at 2 µm/px keep the default encoder (ImageNet EfficientNet-Lite0) fast on 2 cores.
PATCH = {"patch_size": 32, "target_mpp": 2.0}


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(EncoderConfig())


def _cfg(out, **kw):
    return ExtractConfig(
        out_dir=out, patch=PatchConfig(**PATCH), batch_size=32, num_workers=0, progress=False, **kw
    )


def test_batch_records_each_bad_slide_and_continues(
    tmp_path, shared_data, wsi_cmu1_small_region_path, encoder
):
    crop = crop_of_real_slide(wsi_cmu1_small_region_path)
    corrupt = corrupt_tiles(write_tiled_tiff(tmp_path / "corrupt.tif", crop), tiles=(5, 6, 9, 10))
    blank = write_tiled_tiff(tmp_path / "blank.tif", np.full((1024, 1024, 3), 242, np.uint8))
    garbage = tmp_path / "vendor.svs"
    garbage.write_bytes(b"\x00" * 4096)
    wsi = shared_data / "wsi"
    entries = [
        SlideEntry(wsi / "CMU-1-Small-Region.svs", "cmu"),
        SlideEntry(corrupt, "corrupt"),
        SlideEntry(blank, "blank"),
        SlideEntry(garbage, "garbage"),
        SlideEntry(wsi / "small_HE_levels.tiff", "he_no_mpp"),
        SlideEntry(wsi / "small_HE_levels.tiff", "he_user_mpp", mpp=4.0, target_mpp=8.0),
        SlideEntry(wsi / "dicom_wsi_google" / "jpeg2000.dicom", "dicom_too_coarse"),
        SlideEntry(wsi / "dicom_wsi_google" / "jpeg2000.dicom", "dicom", target_mpp=32.0),
    ]
    out = tmp_path / "run"
    summary = run_extraction(entries, _cfg(out), encoder)
    states = {s["slide_id"]: s for s in summary["slides"]}
    assert {k for k, v in states.items() if v["state"] == "done"} == {"cmu", "he_user_mpp", "dicom"}
    assert states["corrupt"]["error_type"] in ("WSIReadError", "RuntimeError")
    assert "Corrupt JPEG" in states["corrupt"]["error_detail"]
    assert states["blank"]["error_type"] == "NoTissueError"
    assert states["garbage"]["error_type"] == "WSIOpenError"
    assert states["he_no_mpp"]["error_type"] == "MppUnknownError"
    assert "coarser than" in states["dicom_too_coarse"]["error"]
    assert summary["counts"] == {"done": 3, "failed": 5}
    # nothing half-written: only finished slides have feature files, and no temporaries remain
    assert sorted(p.name for p in (out / "features").iterdir()) == [
        "cmu.h5",
        "dicom.h5",
        "he_user_mpp.h5",
    ]
    assert not list(out.rglob("*.tmp")) and not list((out / "locks").iterdir())
    status = json.loads((out / "status" / "corrupt.json").read_text())
    assert status["state"] == "failed" and status["path"].endswith("corrupt.tif")
    assert json.loads((out / "run_summary.json").read_text())["counts"] == summary["counts"]


def test_features_match_the_encoder_and_resume_skips(tmp_path, wsi_cmu1_small_region_path, encoder):
    import cv2

    out = tmp_path / "run"
    entry = SlideEntry(wsi_cmu1_small_region_path, "cmu")
    run_extraction([entry], _cfg(out), encoder)
    features, coords, attrs = read_patch_features(out / "features" / "cmu.h5")
    assert features.shape == (len(coords), 1280) and features.dtype == np.float32
    assert attrs["encoder"] == "efficientnet_lite0" and attrs["patch_size_level0"] == 128
    # row i is the encoder's output for the patch at coords[i], normalised with mean = std = 0.5
    with open_slide(wsi_cmu1_small_region_path) as slide:
        tile = slide.read_region(tuple(coords[7]), 0, (128, 128))
    tile = cv2.resize(tile, (32, 32), interpolation=cv2.INTER_AREA)
    x = (torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        expected = encoder.model(x)[0].numpy()
    np.testing.assert_allclose(features[7], expected, rtol=1e-4, atol=1e-4)
    mtime = (out / "features" / "cmu.h5").stat().st_mtime_ns
    again = run_extraction([entry], _cfg(out), encoder)
    assert again["counts"] == {"skipped": 1}
    assert (out / "features" / "cmu.h5").stat().st_mtime_ns == mtime
    redo = run_extraction([entry], _cfg(out, overwrite=True), encoder)
    assert (
        redo["counts"] == {"done": 1} and (out / "features" / "cmu.h5").stat().st_mtime_ns != mtime
    )


def test_rerun_with_other_settings_or_another_file_recomputes_never_reports_stale_work(
    tmp_path, wsi_cmu1_small_region_path, encoder
):
    """Settings belong to results: only the same slide file with the same settings is skipped."""
    import shutil

    out = tmp_path / "run"
    slide = tmp_path / "slide.svs"
    shutil.copy(wsi_cmu1_small_region_path, slide)
    entry = SlideEntry(slide, "cmu")
    run_extraction([entry], _cfg(out), encoder)
    assert run_extraction([entry], _cfg(out), encoder)["counts"] == {"skipped": 1}
    other_mpp = ExtractConfig(out_dir=out, patch=PatchConfig(patch_size=32, target_mpp=4.0), batch_size=32,
                              num_workers=0, progress=False)
    redo = run_extraction([entry], other_mpp, encoder)
    assert redo["counts"] == {"done": 1}
    assert "patch" in redo["slides"][0]["recomputed_because"]
    assert read_patch_features(out / "features" / "cmu.h5")[2]["patch_size_level0"] > 200  # the 4 µm/px grid, not 2 µm/px (128)
    assert run_extraction([entry], other_mpp, encoder)["counts"] == {"skipped": 1}
    # another encoder (other weights) under the same slide id
    other = build_encoder(EncoderConfig(name="medvit_tiny", pretrained=None))
    by_model = run_extraction([entry], other_mpp, other)
    assert by_model["counts"] == {"done": 1}
    assert {"encoder", "weights_sha256"} <= set(by_model["slides"][0]["recomputed_because"])
    assert read_patch_features(out / "features" / "cmu.h5")[0].shape[1] == other.feature_dim
    # another file behind the same slide id (same name, new content)
    shutil.copy(wsi_cmu1_small_region_path, slide)
    os.utime(slide, ns=(slide.stat().st_atime_ns, slide.stat().st_mtime_ns + 10**9))
    by_file = run_extraction([entry], other_mpp, other)
    assert by_file["counts"] == {"done": 1} and by_file["slides"][0]["recomputed_because"] == ["source"]


def test_slide_list_from_folder_and_csv(tmp_path, shared_data):
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text(
        "path,slide_id,mpp,target_mpp\n"
        f"{shared_data}/wsi/tcga-cr-7395-01a-01-ts1.svs,tcga,0.25,\n"
        f"{shared_data}/wsi/dicom_wsi_google/raw.dicom,,,32\n"
    )
    entries = read_slide_list([shared_data / "wsi" / "CMU-1-Small-Region.svs"], csv_path)
    assert [(e.slide_id, e.mpp, e.target_mpp) for e in entries] == [
        ("CMU-1-Small-Region", None, None),
        ("tcga", 0.25, None),
        ("dicom_wsi_google_raw", None, 32.0),
    ]
    assert len(read_slide_list([shared_data / "wsi"])) == 6


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from medai.pipelines.extract_features import SlideLock
lock = SlideLock(Path(sys.argv[1]))
print(lock.acquire(), flush=True)
time.sleep(60)
"""


def test_lock_is_exclusive_across_processes_and_reclaimed_from_the_dead(tmp_path):
    path = tmp_path / "locks" / "s.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "True"
        assert SlideLock(path).acquire() is False  # a live worker holds it
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert path.exists()  # the dead worker's lock file is still there ...
        mine = SlideLock(path)
        assert mine.acquire() is True  # ... and is reclaimed at once
        assert json.loads(path.read_text())["pid"] == os.getpid()
        mine.release()
        assert not path.exists()
    finally:
        holder.kill()


def test_sigkill_mid_slide_then_rerun_finishes_without_redoing(tmp_path, shared_data, encoder):
    wsi = shared_data / "wsi"
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text(
        "path,slide_id,mpp,target_mpp\n"
        f"{wsi}/CMU-1-Small-Region.svs,cmu,,\n"
        f"{wsi}/tcga-cr-7395-01a-01-ts1.svs,tcga,0.5,4.0\n"
        f"{wsi}/dicom_wsi_google/raw.dicom,dicom,,32\n"
    )
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "medai.cli",
        "slides",
        "extract",
        "--csv",
        str(csv_path),
        "--out",
        str(out),
        "--patch-size",
        "32",
        "--target-mpp",
        "2.0",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "features").glob(".tcga.h5.*.tmp")):
            assert job.poll() is None, "the job ended before the kill"
            assert time.monotonic() < deadline, "tcga never started"
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the slide's ~140 patches, one per batch
        job.send_signal(signal.SIGKILL)
        job.wait(10)
    finally:
        job.kill()
    assert (out / "status" / "cmu.json").is_file() and not (out / "features" / "tcga.h5").exists()
    assert (
        list((out / "features").glob(".tcga.h5.*.tmp")) and (out / "locks" / "tcga.lock").exists()
    )
    cmu_mtime = (out / "features" / "cmu.h5").stat().st_mtime_ns

    entries = read_slide_list([], csv_path)
    summary = run_extraction(entries, _cfg(out), encoder)
    states = {s["slide_id"]: s["state"] for s in summary["slides"]}
    assert states == {"cmu": "skipped", "tcga": "done", "dicom": "done"}
    assert (out / "features" / "cmu.h5").stat().st_mtime_ns == cmu_mtime
    assert not list(out.rglob("*.tmp"))
    for slide_id in ("cmu", "tcga", "dicom"):
        features, coords, _ = read_patch_features(out / "features" / f"{slide_id}.h5")
        assert len(features) == len(coords) > 0 and np.isfinite(features).all()


def test_local_timm_encoder_checkpoint_plugs_in(tmp_path, wsi_cmu1_small_region_path):
    import timm

    from medai.errors import CheckpointError
    from medai.models.registry import save_weights

    # a user's own encoder: any timm architecture with weights in a local safetensors file
    own = timm.create_model("test_efficientnet", num_classes=0).eval()
    weights = save_weights(own, tmp_path / "my_encoder.safetensors")
    encoder = build_encoder(EncoderConfig(name="timm:test_efficientnet", pretrained=str(weights)))
    assert encoder.feature_dim == 256 and encoder.mean == (0.485, 0.456, 0.406)
    out = tmp_path / "run"
    cfg = ExtractConfig(
        out_dir=out,
        encoder=EncoderConfig(name="timm:test_efficientnet", pretrained=str(weights)),
        patch=PatchConfig(**PATCH),
        batch_size=64,
        num_workers=0,
        progress=False,
    )
    run_extraction([SlideEntry(wsi_cmu1_small_region_path, "cmu")], cfg, encoder)
    features, _coords, attrs = read_patch_features(out / "features" / "cmu.h5")
    assert features.shape[1] == 256 and attrs["encoder"] == "timm:test_efficientnet"
    x = torch.zeros(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(
            own(x), encoder.model(x)
        )  # the file's weights, not a fresh initialisation
    with pytest.raises(CheckpointError):
        build_encoder(
            EncoderConfig(name="timm:test_resnet", pretrained=str(weights))
        )  # wrong architecture


def test_extracted_features_are_the_bags_the_mil_task_reads(
    tmp_path, wsi_cmu1_small_region_path, wsi_dicom_google_path, encoder
):
    import h5py

    from medai.io.patch_h5 import read_coords_h5
    from medai.io.datasets import load_dataset

    out = tmp_path / "run"
    entries = [
        SlideEntry(wsi_cmu1_small_region_path, "cmu"),
        SlideEntry(wsi_dicom_google_path / "jpeg2000.dicom", "dicom", target_mpp=32.0),
    ]
    summary = run_extraction(entries, _cfg(out), encoder)
    assert summary["counts"] == {"done": 2}
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ncmu,1\ndicom,0\n")
    # the MIL task's own entry point for a folder of HDF5 feature files (CLAM layout)
    bags = load_dataset(out / "features", "clam_h5", labels_csv=labels).items
    assert [(b.bag_id, b.label) for b in bags] == [("cmu", 1), ("dicom", 0)]
    for bag in bags:
        with h5py.File(out / "features" / f"{bag.bag_id}.h5", "r") as handle:
            written_features, written_coords = handle["features"][()], handle["coords"][()]
        grid_coords, _ = read_coords_h5(out / "patches" / f"{bag.bag_id}.h5")
        n = len(grid_coords)
        assert n > 10 and bag.num_instances == n
        assert bag.features.shape == (n, encoder.feature_dim) and bag.features.dtype == np.float32
        assert bag.coords.shape == (n, 2)
        np.testing.assert_array_equal(bag.features, written_features)
        np.testing.assert_array_equal(bag.coords, written_coords)
        np.testing.assert_array_equal(bag.coords, grid_coords)  # the patch stage's grid, row for row
        assert np.isfinite(bag.features).all() and bag.features.std(axis=0).max() > 0


def test_two_workers_give_the_same_features_as_none(tmp_path, wsi_cmu1_small_region_path, encoder):
    entry = SlideEntry(wsi_cmu1_small_region_path, "cmu")
    results = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        cfg = _cfg(out)
        cfg.num_workers = workers
        summary = run_extraction([entry], cfg, encoder)
        assert summary["counts"] == {"done": 1}
        results[workers] = read_patch_features(out / "features" / "cmu.h5")
    features0, coords0, _ = results[0]
    features2, coords2, _ = results[2]
    assert len(coords0) > 32  # more than one batch, so the workers' batches interleave
    np.testing.assert_array_equal(coords2, coords0)
    np.testing.assert_allclose(features2, features0, rtol=1e-5, atol=1e-5)


def test_medvit_extracts_a_real_slide_through_the_cli(tmp_path, wsi_cmu1_small_region_path):
    """`medai slides extract --model medvit_tiny`: any registered feature extractor is a patch encoder."""
    import cv2
    from typer.testing import CliRunner

    from medai.cli import app
    from medai.models import create_model

    out = tmp_path / "run"
    args = ["slides", "extract", str(wsi_cmu1_small_region_path), "--out", str(out),
            "--model", "medvit_tiny",  # default --pretrained auto: MedViT has no ImageNet weights, so random ones
            "--patch-size", "32", "--target-mpp", "4.0", "--workers", "0", "--no-progress"]
    torch.manual_seed(0)
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    features, coords, attrs = read_patch_features(out / "features" / f"{wsi_cmu1_small_region_path.stem}.h5")
    assert features.shape == (len(coords), 384) and len(coords) > 8 and attrs["encoder"] == "medvit_tiny"
    assert attrs["pretrained"] == "None"  # recorded: these features come from random weights
    # row i is MedViT-T's pooled final feature map for the patch at coords[i] (ImageNet normalisation)
    torch.manual_seed(0)
    model = create_model("medvit_tiny").eval()
    size0 = int(attrs["patch_size_level0"])
    with open_slide(wsi_cmu1_small_region_path) as slide:
        assert slide.level_count == 1
        tile = slide.read_region(tuple(coords[5]), 0, (size0, size0))
    tile = cv2.resize(tile, (32, 32), interpolation=cv2.INTER_AREA)
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    x = (torch.from_numpy(tile).permute(2, 0, 1).float() / 255 - mean[:, None, None]) / std[:, None, None]
    with torch.inference_mode():
        expected = model.forward_features(x[None]).mean((2, 3))[0].numpy()
    # random weights with unit BatchNorm statistics amplify float rounding, hence 1e-3 (a wrong patch is off by ~1)
    np.testing.assert_allclose(features[5], expected, rtol=1e-3, atol=1e-3)


def test_a_model_that_is_no_feature_extractor_is_refused_by_name():
    from medai.errors import ModelContractError

    with pytest.raises(ModelContractError, match="'umamba_bot_2d': not a feature extractor; .*medvit_tiny"):
        build_encoder(EncoderConfig(name="umamba_bot_2d", pretrained=None))
