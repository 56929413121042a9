"""3D segmentation jobs on NIfTI volumes (MSD Task04 Hippocampus by default).

Stages, each with an on-disk artifact:
1. `write_split` -> a JSON split file (case ids for train / validation), fixed and committed.
2. training (the shared fine-tuning engine, or `train_segmentation` until it lands) ->
   `<out>/model.safetensors` + `<out>/train_log.json`.
3. `evaluate_segmentation` -> per-case Dice and HD95 per label + bootstrap 95% CIs (JSON).
4. `predict_volume` -> a label volume as NIfTI in the input's own grid, and a PNG montage.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medai.errors import DatasetNotFoundError, InvalidVolumeError
from medai.transforms.volume import segmentation_transforms

log = logging.getLogger(__name__)

HIPPOCAMPUS_LABELS = {1: "anterior", 2: "posterior"}
# nnU-Net (Isensee et al. 2021), MSD Task04 five-fold cross-validation Dice, for comparison in cards.
NNUNET_TASK04_DICE = {"anterior": 0.90, "posterior": 0.89}


# ---------------------------------------------------------------- split and records
def _pairs(dataset_dir: str | Path) -> dict[str, dict[str, Path]]:
    """{case id: {'image', 'label'}} for the labelled cases of an images/ + labels/ folder (.nii or .nii.gz)."""
    from medai.io.nifti import pair_nifti_folder

    return {pair["id"]: pair for pair in pair_nifti_folder(dataset_dir)}


def list_cases(dataset_dir: str | Path) -> list[str]:
    """Case ids (file stems) that have both images/<id>.nii[.gz] and labels/<id>.nii[.gz], sorted."""
    return sorted(_pairs(dataset_dir))


def make_split(dataset_dir: str | Path, val_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """A seeded random train/validation split of the labelled cases, as a JSON-ready dict."""
    cases = list_cases(dataset_dir)
    if len(cases) < 2:
        raise DatasetNotFoundError(dataset_dir, f"found {len(cases)} labelled case(s); a split needs at least 2")
    shuffled = cases[:]
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(cases) * val_fraction))
    return {
        "dataset": Path(dataset_dir).name,
        "seed": seed,
        "val_fraction": val_fraction,
        "train": sorted(shuffled[n_val:]),
        "val": sorted(shuffled[:n_val]),
    }


def write_split(split: dict[str, Any], path: str | Path) -> Path:
    """Write a split file (JSON); return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=1) + "\n")
    return path


def read_split(path: str | Path) -> dict[str, list[str]]:
    """Read a split file; raise DatasetNotFoundError when absent, ValueError when train/val overlap."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(path, "split file")
    split = json.loads(path.read_text())
    overlap = set(split["train"]) & set(split["val"])
    if overlap:
        raise ValueError(f"{path}: cases in both train and val: {sorted(overlap)[:5]}")
    return split


def case_records(dataset_dir: str | Path, cases: Sequence[str], with_label: bool = True) -> list[dict[str, str]]:
    """MONAI data dicts {'image', 'label', 'case'} for the given case ids."""
    pairs = _pairs(dataset_dir)
    records = []
    for case in cases:
        if case not in pairs:
            raise DatasetNotFoundError(Path(dataset_dir) / "images" / f"{case}.nii.gz", f"case {case} (image and label)")
        record = {"case": case, "image": str(pairs[case]["image"])}
        if with_label:
            record["label"] = str(pairs[case]["label"])
        records.append(record)
    return records


def discover_labels(dataset_dir: str | Path, cases: Sequence[str] | None = None) -> dict[int, str]:
    """Foreground labels {value: name}: from an MSD `dataset.json` when present, else the values in the label files."""
    root = Path(dataset_dir)
    manifest = root / "dataset.json"
    if manifest.is_file():
        names = json.loads(manifest.read_text()).get("labels", {})
        found = {int(k): str(v) for k, v in names.items() if int(k) != 0}
        if found:
            return found
    import nibabel as nib

    pairs = _pairs(root)
    values: set[int] = set()
    for case in cases if cases is not None else sorted(pairs):
        data = np.asanyarray(nib.load(str(pairs[case]["label"])).dataobj)
        if not np.allclose(data, np.round(data)):
            raise InvalidVolumeError(pairs[case]["label"], "label volume holds non-integer values")
        values.update(int(v) for v in np.unique(data))
    foreground = sorted(v for v in values if v != 0)
    if not foreground:
        raise InvalidVolumeError(root / "labels", "no foreground label in any label volume")
    return {value: f"label_{value}" for value in foreground}


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
    from pipelines.metrics import segmentation_metrics

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
    from pipelines.metrics import bootstrap_ci

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


# ---------------------------------------------------------------- training (interim driver)
@dataclass
class SegTrainConfig:
    """Recipe for budgeted segmentation training; identical across compared models except `model`."""

    model: str = "umamba_bot_3d"
    model_options: dict[str, Any] = field(default_factory=lambda: {"features": [16, 32, 64, 128]})
    dataset_dir: Path = Path("../shared/data/seg3d/msd_task04_hippocampus")
    split_file: Path = Path("configs/splits/msd_task04_hippocampus.json")
    out_dir: Path = Path("runs/seg")
    roi_size: tuple[int, int, int] = (32, 48, 32)
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    budget_minutes: float = 10.0
    max_steps: int = 100000
    max_bad_steps: int = 20  # non-finite losses tolerated (skipped) before the run stops
    val_cases: int = 0  # 0: all validation cases
    seed: int = 0
    checkpoint_minutes: float = 2.0


def train_segmentation(cfg: SegTrainConfig) -> dict[str, Any]:
    """Train cfg.model for cfg.budget_minutes (poly LR over the time budget), then evaluate on validation.

    Interim driver until the shared fine-tuning engine lands. Resumable: a run restarted with the
    same out_dir continues from its last checkpoint. Non-finite losses skip the step, are logged,
    and stop the run after cfg.max_bad_steps.
    """
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from medai.utils import seed_everything
    from models import create_model, save_weights
    from models.registry import load_weights

    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = read_split(cfg.split_file)
    train_records = case_records(cfg.dataset_dir, split["train"])
    val_records = case_records(cfg.dataset_dir, split["val"])
    if cfg.val_cases:
        val_records = val_records[: cfg.val_cases]
    model = create_model(cfg.model, **cfg.model_options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    state_path, weights_path = out / "train_state.pt", out / "last.safetensors"
    step, elapsed, bad_steps, history = 0, 0.0, 0, []
    if state_path.is_file() and weights_path.is_file():
        state = torch.load(state_path, weights_only=True)
        load_weights(model, weights_path)  # strict, and aware of DynUNet's aliased modules
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, bad_steps = int(state["step"]), float(state["elapsed"]), int(state["bad_steps"])
        history = json.loads((out / "train_log.json").read_text())["history"] if (out / "train_log.json").is_file() else []
        log.info("resuming %s at step %d (%.1f min used)", cfg.model, step, elapsed / 60)
    dataset = CacheDataset(train_records, segmentation_transforms("train", cfg.roi_size), progress=False)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=0, drop_last=True)
    budget = cfg.budget_minutes * 60
    last_checkpoint = time.perf_counter()
    model.train()

    def checkpoint() -> None:
        save_weights(model, weights_path)
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed, "bad_steps": bad_steps},
                   state_path)
        (out / "train_log.json").write_text(json.dumps({"config": _jsonable(cfg), "history": history}, indent=1))

    done = False
    while not done:
        for batch in loader:
            if elapsed >= budget or step >= cfg.max_steps:
                done = True
                break
            tick = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * (1 - min(elapsed / budget, 0.999)) ** 0.9
            logits = model(batch["image"])
            loss = loss_fn(logits, batch["label"])
            if not torch.isfinite(loss):
                bad_steps += 1
                log.warning("step %d: non-finite loss (%s); step skipped (%d/%d)", step, loss.item(), bad_steps,
                            cfg.max_bad_steps)
                optimizer.zero_grad(set_to_none=True)
                if bad_steps >= cfg.max_bad_steps:
                    raise FloatingPointError(f"{cfg.model}: {bad_steps} non-finite losses; stopping (lower lr?)")
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            optimizer.step()
            step += 1
            elapsed += time.perf_counter() - tick
            history.append({"step": step, "loss": round(loss.item(), 5), "minutes": round(elapsed / 60, 3)})
            if step % 20 == 0:
                log.info("%s step %d loss %.4f (%.1f/%.1f min)", cfg.model, step, loss.item(), elapsed / 60,
                         cfg.budget_minutes)
            if time.perf_counter() - last_checkpoint > cfg.checkpoint_minutes * 60:
                checkpoint()
                last_checkpoint = time.perf_counter()
    checkpoint()
    save_weights(model, out / "model.safetensors", {"model": cfg.model, "options": cfg.model_options,
                                                     "steps": step, "train_minutes": elapsed / 60})
    result = evaluate_segmentation(model, val_records, cfg.roi_size)
    result.update({"model": cfg.model, "model_options": cfg.model_options, "steps": step,
                   "train_minutes": elapsed / 60, "non_finite_steps": bad_steps,
                   "parameters": sum(p.numel() for p in model.parameters())})
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    return result


def _jsonable(cfg: SegTrainConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def format_summary(result: dict[str, Any]) -> str:
    """One line per label: Dice mean [95% CI] and HD95 (mm) for a result of evaluate_segmentation."""
    parts = []
    for name in HIPPOCAMPUS_LABELS.values():
        d, h = result["summary"][f"dice_{name}"], result["summary"][f"hd95_{name}"]
        parts.append(f"{name}: Dice {d['value']:.3f} [{d['low']:.3f}, {d['high']:.3f}], HD95 {h['value']:.2f} mm"
                     + (f" ({h['n_undefined']} undefined)" if h["n_undefined"] else ""))
    return "; ".join(parts)


__all__ = [
    "HIPPOCAMPUS_LABELS", "NNUNET_TASK04_DICE", "SegTrainConfig", "case_records",
    "discover_labels", "evaluate_segmentation", "format_summary", "label_metrics", "list_cases", "make_split", "predict_dicom_series", "predict_volume",
    "read_split", "save_overlay_montage", "sliding_window_logits", "summarize_cases", "train_segmentation",
    "write_split",
]
