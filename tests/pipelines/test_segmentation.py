"""Metrics, sliding-window inference, training by file and outputs of the 3D segmentation pipeline."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medai.io.datasets.volumes import case_records
from medai.models import create_model
from medai.pipelines.segmentation import (
    evaluate_segmentation,
    label_metrics,
    predict_volume,
    sliding_window_logits,
    summarize_cases,
)


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


def _tiny_engine_config(msd_hippocampus_path, tmp_path, model="umamba_bot_3d", *extra):
    from medai.pipelines.train_config import load_train_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["hippocampus_001", "hippocampus_004", "hippocampus_008", "hippocampus_011"],
                                 "val": ["hippocampus_007"]}))
    return load_train_config(
        f"configs/hippocampus_{model}.yaml",
        [f"data.path={msd_hippocampus_path}", f"data.options.split_file={split}", f"output_dir={tmp_path}",
         "model.kwargs.features=[4, 8, 8]", "data.options.roi_size=[16, 16, 16]", "trainer.epochs=1",
         "trainer.time_budget_minutes=null", "trainer.n_boot=20", *extra],
    )


def test_engine_skips_non_finite_losses_and_stops_past_the_limit(msd_hippocampus_path, tmp_path, monkeypatch):
    """U-Mamba users report NaN losses: the engine skips such a step, counts it, and stops past a limit."""
    from monai.losses import DiceCELoss
    from medai.pipelines.finetune import TrainingError, finetune

    real_forward, training_calls = DiceCELoss.forward, []

    def every_other_nan(self, x, y):
        loss = real_forward(self, x, y)
        if not x.requires_grad:  # validation: leave it finite
            return loss
        training_calls.append(1)
        return loss * float("nan") if len(training_calls) % 2 else loss

    monkeypatch.setattr(DiceCELoss, "forward", every_other_nan)
    cfg = _tiny_engine_config(msd_hippocampus_path, tmp_path / "some", "dynunet_3d", "trainer.epochs=2")
    result = finetune(cfg)
    state = json.loads((result.run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert len(training_calls) == 4 and state["nonfinite_steps"] == 2  # 4 batches: 2 skipped, 2 trained
    assert np.isfinite(result.history[-1]["train_loss"])

    monkeypatch.setattr(DiceCELoss, "forward", lambda self, x, y: (x * float("nan")).sum())
    cfg = _tiny_engine_config(msd_hippocampus_path, tmp_path / "all", "dynunet_3d", "trainer.max_nonfinite_steps=1")
    with pytest.raises(TrainingError, match="more than 1 non-finite steps"):
        finetune(cfg)


def test_engine_trains_the_segmentation_task(msd_hippocampus_path, tmp_path):
    from medai.pipelines.finetune import finetune

    result = finetune(_tiny_engine_config(msd_hippocampus_path, tmp_path))
    record = result.history[-1]
    assert 0.0 <= record["val_dice_anterior"] <= 1.0 and "val_hd95_posterior" in record
    assert (result.run_dir / "checkpoints" / "best" / "model.safetensors").is_file()
    report = result.test_report  # the Task04 configs score the validation cases with CIs at the end
    assert report["split"] == "val" and report["n_items"] == 1
    assert (result.run_dir / "predictions_val.npz").is_file()


def test_nifti_folder_trains_by_file_without_split_or_label_config(msd_hippocampus_path, tmp_path):
    """An images/ + labels/ folder (mixed .nii and .nii.gz) needs no split file and no label names."""
    import nibabel as nib

    from medai.io.datasets.volumes import discover_labels, list_cases
    from medai.pipelines.finetune import finetune
    from medai.pipelines.train_config import load_train_config

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
    from medai.pipelines.segmentation import predict_dicom_series

    torch.manual_seed(0)
    series = dicom_dcmqi_path / "segmentations" / "ct-3slice"
    model = create_model("dynunet_3d", features=(4, 8, 8))
    path = predict_dicom_series(model, series, tmp_path / "seg.dcm", (256, 256, 4))  # 512x512x3 CT: few windows
    seg = read_segmentation(path)
    assert [s.label for s in seg.segments] == ["anterior hippocampus", "posterior hippocampus"]
    assert seg.referenced_series_uid == load_series(series).metadata["SeriesInstanceUID"]


class _MidGreyIsAnterior(torch.nn.Module):
    """A fixed 'model': label 1 wherever the z-scored intensity is near 0 (as in zero padding)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        near_zero = 1.0 - self.scale * x.abs()
        return torch.cat([torch.zeros_like(x), near_zero, torch.full_like(x, -1e4)], 1)


def test_batched_validation_scores_each_volume_in_its_own_extent(msd_hippocampus_path, tmp_path):
    """Volumes of different sizes batched together are padded; the padding must not be scored."""
    from medai.pipelines.evaluate import predict_split
    from medai.pipelines.tasks import get_task
    from medai.pipelines.tasks.segmentation import SegmentationOptions

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["hippocampus_001"], "val": ["hippocampus_007", "hippocampus_008"]}))
    task = get_task("segmentation")
    task.options = SegmentationOptions(split_file=split, labels={1: "anterior", 2: "posterior"}, roi_size=(16, 16, 16))
    data = task.setup(type("Data", (), {"path": msd_hippocampus_path})(), seed=0)
    shapes = [tuple(item["image"].shape) for item in data.datasets["val"].items]
    assert shapes[0] != shapes[1]  # otherwise nothing is padded
    model = _MidGreyIsAnterior()
    one_by_one = predict_split(task, model, data, "val", batch_size=1)
    together = predict_split(task, model, data, "val", batch_size=2)
    assert one_by_one["dice_anterior"].min() > 0  # the fixed model does predict label 1 somewhere
    for key in ("dice_anterior", "hd95_anterior", "dice_posterior"):
        np.testing.assert_allclose(together[key], one_by_one[key], err_msg=key)
