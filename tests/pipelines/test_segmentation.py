"""Split, metrics, sliding-window inference and outputs of the 3D segmentation pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from models import create_model
from pipelines.segmentation import (
    SegTrainConfig,
    case_records,
    evaluate_segmentation,
    label_metrics,
    make_split,
    predict_volume,
    read_split,
    sliding_window_logits,
    summarize_cases,
    train_segmentation,
)

SPLIT_FILE = Path("configs/splits/msd_task04_hippocampus.json")


def test_committed_split_is_reproducible_and_disjoint(msd_hippocampus_path):
    committed = read_split(SPLIT_FILE)
    assert committed == make_split(msd_hippocampus_path, committed["val_fraction"], committed["seed"])
    assert len(committed["train"]) == 160 and len(committed["val"]) == 40
    assert not set(committed["train"]) & set(committed["val"])


def test_overlapping_split_is_refused(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a", "b"], "val": ["b"]}))
    with pytest.raises(ValueError, match="both train and val"):
        read_split(path)


def test_label_metrics_on_known_shapes():
    truth = torch.zeros(20, 20, 20, dtype=torch.long)
    truth[5:15, 5:15, 5:10] = 1
    truth[5:15, 5:15, 10:15] = 2
    perfect = label_metrics(truth, truth, (1.0, 1.0, 1.0), {1: "anterior", 2: "posterior"})
    assert perfect == {"dice_anterior": 1.0, "hd95_anterior": 0.0, "dice_posterior": 1.0, "hd95_posterior": 0.0}
    shifted = torch.roll(truth, 2, dims=0)  # 2 voxels along x: Dice 8/10, surface distance 2 voxels
    metrics = label_metrics(shifted, truth, (1.5, 1.0, 1.0), {1: "anterior"})
    assert metrics["dice_anterior"] == pytest.approx(0.8)
    assert metrics["hd95_anterior"] == pytest.approx(3.0)  # 2 voxels x 1.5 mm
    empty = label_metrics(torch.zeros_like(truth), truth, (1.0, 1.0, 1.0), {1: "anterior"})
    assert empty["dice_anterior"] == 0.0 and np.isnan(empty["hd95_anterior"])


def test_case_summary_brackets_the_mean_and_counts_undefined():
    values = list(np.linspace(0.7, 0.9, 40)) + [float("nan")]
    ci = summarize_cases([{"hd95_anterior": v} for v in values], ["hd95_anterior"])["hd95_anterior"]
    assert ci["low"] < ci["value"] < ci["high"]
    assert ci["value"] == pytest.approx(0.8)
    assert ci["n_undefined"] == 1


def test_sliding_window_gaussian_covers_a_volume_larger_than_the_roi():
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.stack([torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0])], 1)

    logits = sliding_window_logits(Constant(), torch.rand(1, 1, 35, 51, 35), (32, 48, 32))
    assert logits.shape == (1, 2, 35, 51, 35)
    torch.testing.assert_close(logits[:, 1], torch.ones(1, 35, 51, 35))  # blending weights normalise


def test_evaluate_and_predict_on_real_volumes(msd_hippocampus_path, tmp_path):
    torch.manual_seed(0)
    model = create_model("umamba_bot_3d", features=(4, 8, 8, 8))
    records = case_records(msd_hippocampus_path, ["hippocampus_001", "hippocampus_004"])
    result = evaluate_segmentation(model, records, (32, 48, 32), progress=False)
    assert result["n_cases"] == 2 and not result["failures"]
    assert {"dice_anterior", "hd95_posterior"} <= set(result["summary"])
    image = msd_hippocampus_path / "images" / "hippocampus_001.nii.gz"
    label = msd_hippocampus_path / "labels" / "hippocampus_001.nii.gz"
    out = predict_volume(model, image, tmp_path / "pred.nii.gz", (32, 48, 32), tmp_path / "m.png", label)
    written, source = nib.load(str(out)), nib.load(str(image))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_training_runs_resumes_and_skips_non_finite_losses(msd_hippocampus_path, tmp_path, monkeypatch):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["hippocampus_001", "hippocampus_004"], "val": ["hippocampus_007"]}))
    cfg = SegTrainConfig(
        model="dynunet_3d", model_options={"features": [4, 8, 8]}, dataset_dir=msd_hippocampus_path,
        split_file=split, out_dir=tmp_path / "run", roi_size=(16, 16, 16), max_steps=2, budget_minutes=5,
    )
    first = train_segmentation(cfg)
    assert first["steps"] == 2 and first["n_cases"] == 1
    cfg.max_steps = 3
    assert train_segmentation(cfg)["steps"] == 3  # resumed from step 2, not restarted

    from monai.losses import DiceCELoss

    monkeypatch.setattr(DiceCELoss, "forward", lambda self, x, y: (x * float("nan")).sum())
    cfg.out_dir, cfg.max_bad_steps = tmp_path / "nan_run", 2
    with pytest.raises(FloatingPointError, match="2 non-finite losses"):
        train_segmentation(cfg)


def test_engine_trains_the_segmentation_task(msd_hippocampus_path, tmp_path):
    from pipelines.finetune import finetune, load_train_config

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["hippocampus_001", "hippocampus_004"], "val": ["hippocampus_007"]}))
    cfg = load_train_config(
        "configs/hippocampus_umamba_bot_3d.yaml",
        [f"data.path={msd_hippocampus_path}", f"data.options.split_file={split}", f"output_dir={tmp_path}",
         "model.kwargs.features=[4, 8, 8]", "data.options.roi_size=[16, 16, 16]", "trainer.epochs=1"],
    )
    result = finetune(cfg)
    record = result.history[-1]
    assert 0.0 <= record["val_dice_anterior"] <= 1.0 and "val_hd95_posterior" in record
    assert (result.run_dir / "checkpoints" / "best" / "model.safetensors").is_file()


def test_nifti_folder_trains_by_file_without_split_or_label_config(msd_hippocampus_path, tmp_path):
    """An images/ + labels/ folder (mixed .nii and .nii.gz) needs no split file and no label names."""
    import nibabel as nib

    from pipelines.finetune import finetune, load_train_config
    from pipelines.segmentation import discover_labels, list_cases

    folder = tmp_path / "task"
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True)
    cases = list_cases(msd_hippocampus_path)[:5]
    for case in cases[:-1]:
        for sub in ("images", "labels"):
            (folder / sub / f"{case}.nii.gz").symlink_to(msd_hippocampus_path / sub / f"{case}.nii.gz")
    for sub in ("images", "labels"):  # one case stored uncompressed
        nib.save(nib.load(str(msd_hippocampus_path / sub / f"{cases[-1]}.nii.gz")), str(folder / sub / f"{cases[-1]}.nii"))
    (folder / "images" / "hippocampus_999.nii.gz").symlink_to(msd_hippocampus_path / "images" / "hippocampus_001.nii.gz")
    assert discover_labels(folder) == {1: "label_1", 2: "label_2"}  # unlabelled hippocampus_999 is left out

    cfg = load_train_config(
        "configs/hippocampus_umamba_bot_3d.yaml",
        [f"data.path={folder}", "data.options.split_file=null", "data.options.labels=null", f"output_dir={tmp_path}",
         "model.name=dynunet_3d", "model.kwargs.features=[4, 8, 8]", "data.options.roi_size=[16, 16, 16]",
         "trainer.epochs=1"],
    )
    result = finetune(cfg)
    info = json.loads((result.run_dir / "run.json").read_text())["data_info"]
    assert info["labels"] == {"1": "label_1", "2": "label_2"}
    assert sorted(info["split"]["train"] + info["split"]["val"]) == sorted(cases) and len(info["split"]["val"]) == 1
    assert "val_dice_label_1" in result.history[-1]

    (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "Anterior", "2": "Posterior"}}))
    assert discover_labels(folder) == {1: "Anterior", 2: "Posterior"}


def test_dicom_series_prediction_is_written_as_dicom_seg(dicom_dcmqi_path, tmp_path):
    from medai.io.dicom import load_series
    from medai.results.dicom_seg import read_segmentation
    from pipelines.segmentation import predict_dicom_series

    torch.manual_seed(0)
    series = dicom_dcmqi_path / "segmentations" / "ct-3slice"
    model = create_model("dynunet_3d", features=(4, 8, 8))
    path = predict_dicom_series(model, series, tmp_path / "seg.dcm", (256, 256, 4))  # 512x512x3 CT: few windows
    seg = read_segmentation(path)
    assert [s.label for s in seg.segments] == ["anterior hippocampus", "posterior hippocampus"]
    assert seg.referenced_series_uid == load_series(series).metadata["SeriesInstanceUID"]
