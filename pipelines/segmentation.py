"""3D segmentation jobs on NIfTI volumes (MSD Task04 Hippocampus by default).

Stages, each with an on-disk artifact:
1. `medai.io.datasets.volumes.write_split` -> a JSON split file (case ids for train / validation), fixed
   and committed; the cases and their split are the dataset format `nifti_pairs` of `medai.io.datasets`.
2. training through the shared fine-tuning engine (`medai finetune configs/hippocampus_<model>.yaml`,
   task `pipelines.tasks.segmentation`) -> a run folder with checkpoints and `eval_val.json`.
3. `evaluate_segmentation` -> per-case Dice and HD95 per label + bootstrap 95% CIs (JSON).
4. `predict_volume` -> a label volume as NIfTI in the input's own grid, and a PNG montage.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medai.errors import InvalidVolumeError
from medai.transforms.volume import segmentation_transforms

log = logging.getLogger(__name__)

HIPPOCAMPUS_LABELS = {1: "anterior", 2: "posterior"}
# nnU-Net (Isensee et al. 2021), MSD Task04 five-fold cross-validation Dice, for comparison in cards.
NNUNET_TASK04_DICE = {"anterior": 0.90, "posterior": 0.89}


# ---------------------------------------------------------------- inference and metrics
def sliding_window_logits(
    model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 4
) -> torch.Tensor:
    """Logits (B, classes, *spatial) by MONAI sliding-window inference with Gaussian blending."""
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        return sliding_window_inference(
            image, tuple(roi_size), sw_batch_size, model, overlap=overlap, mode="gaussian", padding_mode="constant"
        )


def label_metrics(
    prediction: torch.Tensor, truth: torch.Tensor, spacing_mm: Sequence[float], labels: dict[int, str]
) -> dict[str, float]:
    """Dice and HD95 (mm) per label for one case; prediction/truth are integer volumes (X, Y, Z).

    Built on the engine's `segmentation_metrics` (MONAI), with empty masks made explicit: HD95 is
    nan (undefined) when the prediction or the truth of a label is empty; Dice is 0 when only
    one of them is empty and 1 when both are.
    """
    from medai.pipelines.metrics import segmentation_metrics

    n_classes = max(max(labels), int(prediction.max()), int(truth.max())) + 1
    scores = segmentation_metrics(np.asarray(prediction)[None], np.asarray(truth)[None], n_classes, tuple(spacing_mm))
    out: dict[str, float] = {}
    for value, name in labels.items():
        in_pred, in_truth = bool((prediction == value).any()), bool((truth == value).any())
        dice = float(scores["dice"][0][value - 1])
        if not in_truth:
            dice = 0.0 if in_pred else 1.0
        out[f"dice_{name}"] = dice
        out[f"hd95_{name}"] = float(scores["hd95"][0][value - 1]) if in_pred and in_truth else float("nan")
    return out


def summarize_cases(per_case: Sequence[dict[str, Any]], keys: Sequence[str], n_boot: int = 2000) -> dict[str, Any]:
    """Mean over cases of each metric with a percentile-bootstrap 95% CI (the engine's bootstrap).

    Undefined values (HD95 with an empty mask) are left out of the mean and counted.
    """
    from medai.pipelines.metrics import bootstrap_ci

    preds = {key: np.array([row[key] for row in per_case], dtype=np.float64) for key in keys}

    def means(p: dict[str, np.ndarray]) -> dict[str, float]:
        return {k: float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan") for k, v in p.items()}

    summary = bootstrap_ci(means, preds, n_boot=n_boot)
    for key in keys:
        summary[key]["n_undefined"] = int((~np.isfinite(preds[key])).sum())
    return summary


def evaluate_segmentation(
    model: nn.Module,
    records: Sequence[dict[str, str]],
    roi_size: Sequence[int],
    labels: dict[int, str] = HIPPOCAMPUS_LABELS,
    overlap: float = 0.5,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-case Dice/HD95 per label on validation records, with bootstrap 95% CIs; bad cases recorded."""
    from tqdm import tqdm

    transform = segmentation_transforms("val", roi_size, labels=(0, *labels))
    model.eval()
    per_case, failures = [], []
    started = time.perf_counter()
    for record in tqdm(records, desc="evaluate", unit="vol", disable=not progress):
        try:
            item = transform(record)
        except InvalidVolumeError as exc:
            failures.append({"case": record["case"], "error": str(exc)})
            continue
        image, truth = item["image"], item["label"]
        logits = sliding_window_logits(model, image[None].float(), roi_size, overlap)
        prediction = logits.argmax(1)[0]
        spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0).tolist()
        per_case.append({"case": record["case"], **label_metrics(prediction, truth[0], spacing, labels)})
    seconds = time.perf_counter() - started
    keys = [f"{metric}_{name}" for name in labels.values() for metric in ("dice", "hd95")]
    summary = summarize_cases(per_case, keys) if per_case else {}
    return {
        "summary": summary,
        "per_case": per_case,
        "failures": failures,
        "n_cases": len(per_case),
        "seconds": seconds,
        "volumes_per_second": len(per_case) / seconds if seconds else float("nan"),
    }


# ---------------------------------------------------------------- outputs
def predict_volume(
    model: nn.Module,
    image_path: str | Path,
    out_path: str | Path,
    roi_size: Sequence[int],
    montage_path: str | Path | None = None,
    label_path: str | Path | None = None,
) -> Path:
    """Segment one NIfTI volume; write the label map as NIfTI in the input grid (and a PNG montage)."""
    import nibabel as nib
    from monai.transforms import Invertd

    from medai.io.nifti import NIFTI_SUFFIXES, NiftiReadError, read_nifti

    # Checked here, at the boundary: MONAI's loader picks its reader by extension and wraps any failure
    # in a RuntimeError naming the transform, not the file.
    if not str(image_path).lower().endswith(NIFTI_SUFFIXES):
        raise NiftiReadError(image_path, f"not a NIfTI file name ({', '.join(NIFTI_SUFFIXES)})")
    read_nifti(image_path)
    transform = segmentation_transforms("infer", roi_size, with_label=False)
    item = transform({"image": str(image_path)})
    model.eval()
    logits = sliding_window_logits(model, item["image"][None].float(), roi_size)
    item["pred"] = logits[0].argmax(0, keepdim=True).float()
    item["pred"].applied_operations = item["image"].applied_operations  # so Invertd can undo spacing
    item["pred"].affine = item["image"].affine
    # Back to the input's voxel grid, nearest neighbour for labels.
    restored = Invertd("pred", transform, orig_keys="image", nearest_interp=True)(item)["pred"]
    labels = np.asarray(restored[0]).round().astype(np.uint8)
    original = nib.load(str(image_path))
    if labels.shape != original.shape[:3]:
        raise InvalidVolumeError(image_path, f"inverted prediction {labels.shape} != input grid {original.shape}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, original.affine, original.header), str(out_path))
    if montage_path is not None:
        truth = np.asarray(nib.load(str(label_path)).dataobj) if label_path else None
        save_overlay_montage(np.asarray(original.dataobj, dtype=np.float32), labels, montage_path, truth)
    return out_path


def predict_dicom_series(
    model: nn.Module,
    series: str | Path,
    out_path: str | Path,
    roi_size: Sequence[int],
    labels: dict[int, str] = HIPPOCAMPUS_LABELS,
    anatomy: str = "Hippocampus",
) -> Path:
    """Segment a DICOM series and write the labels as a DICOM SEG over it (medai.results.dicom_seg)."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from medai.io.dicom import load_series
    from medai.results.dicom_seg import SegmentSpec, write_segmentation

    volume = load_series(series)
    if volume.array.ndim != 3:
        raise InvalidVolumeError(series, f"expected one 3D grey-level volume, got array shape {volume.array.shape}")
    if volume.geometry != "patient" or volume.affine_ras is None:
        raise InvalidVolumeError(series, "no patient geometry (orientation/position); a SEG could not be placed")
    image = MetaTensor(torch.as_tensor(volume.array, dtype=torch.float32)[None], affine=torch.as_tensor(volume.affine_ras))
    transform = segmentation_transforms("infer", roi_size, with_label=False, from_arrays=True)
    item = transform({"image": image})
    model.eval()
    logits = sliding_window_logits(model, item["image"][None].float(), roi_size)
    item["pred"] = logits[0].argmax(0, keepdim=True).float()
    item["pred"].applied_operations = item["image"].applied_operations
    item["pred"].affine = item["image"].affine
    restored = Invertd("pred", transform, orig_keys="image", nearest_interp=True)(item)["pred"]
    label_map = np.asarray(restored[0]).round().astype(np.uint8)
    specs = [SegmentSpec(label=value, name=f"{name} {anatomy.lower()}", property_type=anatomy)
             for value, name in labels.items()]
    return write_segmentation(label_map, volume, specs, out_path, algorithm_name=type(model).__name__,
                              keep_empty_frames=True)


def save_overlay_montage(
    image: np.ndarray, prediction: np.ndarray, path: str | Path, truth: np.ndarray | None = None, n_slices: int = 6
) -> Path:
    """PNG of evenly spaced slices along the last axis: image with the predicted (and true) labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    occupied = np.nonzero((prediction > 0).any((0, 1)) | ((truth > 0).any((0, 1)) if truth is not None else False))[0]
    lo, hi = (occupied.min(), occupied.max()) if occupied.size else (0, image.shape[2] - 1)
    slices = np.linspace(lo, hi, n_slices).round().astype(int)
    rows = 2 if truth is not None else 1
    fig, axes = plt.subplots(rows, n_slices, figsize=(2 * n_slices, 2.2 * rows), squeeze=False)
    colours = ListedColormap([(0, 0, 0, 0), (1.0, 0.2, 0.2, 0.5), (0.2, 0.6, 1.0, 0.5)])
    vmax = np.percentile(image, 99.5)
    for row, (name, labels) in enumerate([("prediction", prediction), ("reference", truth)][:rows]):
        for col, z in enumerate(slices):
            ax = axes[row, col]
            ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=vmax)
            ax.imshow(labels[:, :, z].T, cmap=colours, vmin=0, vmax=2, origin="lower", interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"{name} z={z}", fontsize=7)
    fig.suptitle("red: anterior (1), blue: posterior (2)", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = [
    "HIPPOCAMPUS_LABELS", "NNUNET_TASK04_DICE", "evaluate_segmentation", "label_metrics", "predict_dicom_series",
    "predict_volume", "save_overlay_montage", "sliding_window_logits", "summarize_cases",
]
