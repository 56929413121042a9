"""Grad-CAM maps for a classifier's prediction, and PNG overlays of them on the input image.

Grad-CAM (Selvaraju et al. 2017): weight each channel of a convolutional feature map by the
spatial mean of the class score's gradient with respect to it, sum, keep the positive part,
upsample to the image and scale to [0, 1]. It shows where the evidence for a class lies at
the resolution of the chosen layer; it is not a segmentation and can miss distributed cues.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medai.errors import ModelInputError

log = logging.getLogger(__name__)


@dataclass
class CamResult:
    """A Grad-CAM map (H, W) in [0, 1] at the image's resolution, for `class_index` with `probability`."""

    cam: np.ndarray
    class_index: int
    probability: float
    layer: str


def default_cam_layer(model: nn.Module, image_size: tuple[int, int]) -> str:
    """Name of the deepest stage output whose map is at least 7x7 for this input (MedViT), else the last conv."""
    stage_ends = getattr(model, "stage_ends", None)
    config = getattr(model, "config", None)
    if stage_ends is not None and config is not None:
        side, chosen = min(image_size) / 4, stage_ends[0]
        for stage, end in enumerate(stage_ends):
            side = -(-side // config.strides[stage])  # ceil, as the strided pools do
            if side >= 7:
                chosen = end
        return f"blocks.{chosen}"
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("no Conv2d layer to take Grad-CAM from; pass layer=")
    return convs[-1]


def grad_cam(model: nn.Module, image: Tensor, class_index: int | None = None, layer: str | None = None) -> CamResult:
    """Grad-CAM of one image (C, H, W) for `class_index` (default: the predicted class)."""
    if image.dim() != 3:
        raise ModelInputError(f"grad_cam takes one image (C, H, W), got shape {tuple(image.shape)}")
    layer = layer or default_cam_layer(model, tuple(image.shape[-2:]))
    module = model.get_submodule(layer)
    captured: dict[str, Tensor] = {}

    def keep(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        output.retain_grad()
        captured["features"] = output

    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(image[None].requires_grad_(False))
            probs = logits.softmax(-1)[0]
            index = int(probs.argmax()) if class_index is None else class_index
            model.zero_grad(set_to_none=True)
            logits[0, index].backward()
    finally:
        handle.remove()
        model.train(was_training)
    features = captured["features"]
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    peak = float(cam.max())
    if peak > 0:
        cam = cam / peak
    else:
        log.info("Grad-CAM is zero everywhere at %s for class %d (no positive evidence there)", layer, index)
    return CamResult(cam.cpu().numpy(), index, float(probs[index].detach()), layer)


def save_cam_overlay(image: np.ndarray, cam: np.ndarray, path: str | Path, alpha: float = 0.4, title: str | None = None) -> Path:
    """Write a PNG: the image in grey (or colour) with the CAM as a 'jet' heat map over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    span = float(image.max() - image.min())
    image = (image - image.min()) / span if span > 0 else np.zeros_like(image)
    height, width = cam.shape
    fig, ax = plt.subplots(figsize=(4, 4 * height / width), dpi=max(100, 400 // max(1, min(height, width) // 28)))
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    ax.imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1, interpolation="bilinear")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.02)
    plt.close(fig)
    return path


def explain_run(run_dir: str | Path, split: str = "test", indices: tuple[int, ...] = (0, 1, 2),
                out_dir: str | Path | None = None, checkpoint: str = "best") -> list[Path]:
    """Grad-CAM PNGs for items of a finished `medai finetune` run's split; returns the files."""
    from medai.pipelines.evaluate import load_run

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / f"gradcam_{split}"
    _, _, data, model = load_run(run_dir, checkpoint)
    dataset = data.datasets[split]
    written = []
    for index in indices:
        image, label = dataset[index]
        result = grad_cam(model, image)
        title = (f"{split}[{index}] label {int(label.reshape(-1)[0])}, predicted {result.class_index} "
                 f"(p={result.probability:.2f}), layer {result.layer}")
        written.append(save_cam_overlay(image.numpy(), result.cam, out_dir / f"{split}_{index}.png", title=title))
    return written
