"""Per-patch attention of MIL models for heatmaps and top-patch galleries.

`attention_maps(model, features, coords)` returns every branch's attention over the bag's
patches (TransMIL: the class token's attention with Nystrom and square padding undone), the
slide-level map (branch mean), and the top-k patches per branch, computed in chunks so a slide
of any size needs only its features plus O(K N) scores. `save_attention_maps` writes them
as `.npz` (scores, coords, top indices) — the on-disk artifact a slide renderer (issue 6) reads
to overlay them on the slide. `attention_grid_png` draws a coordinate-grid preview without the
slide image (for feature-only sets such as SICAPv2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class AttentionMaps:
    """Attention over one bag: per-branch (K, N), slide-level (N,), coords (N, 2) and top-k indices (K, k)."""

    branch_scores: np.ndarray
    slide_scores: np.ndarray
    coords: np.ndarray | None
    top_indices: np.ndarray

    @property
    def num_branches(self) -> int:
        """K, the number of attention branches."""
        return int(self.branch_scores.shape[0])


@torch.no_grad()
def attention_maps(model: nn.Module, features: torch.Tensor | np.ndarray, coords: np.ndarray | None = None,
                   top_k: int = 8) -> AttentionMaps:
    """Return the model's attention over a bag (eval mode, no masking), with the top-k patches per branch."""
    if not hasattr(model, "attention_scores"):
        raise TypeError(f"{type(model).__name__} has no attention_scores(features); not a medai MIL model")
    features = torch.as_tensor(features, dtype=torch.float32)
    if coords is not None and len(coords) != features.shape[0]:
        raise ValueError(f"{len(coords)} coordinates for {features.shape[0]} instances")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        scores = model.attention_scores(features.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    k = min(top_k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return AttentionMaps(scores, scores.mean(axis=0), None if coords is None else np.asarray(coords), top)


def save_attention_maps(maps: AttentionMaps, path: str | Path, **meta: str) -> Path:
    """Write attention maps as .npz: branch_scores (K, N), slide_scores (N,), coords (N, 2), top_indices (K, k)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"branch_scores": maps.branch_scores, "slide_scores": maps.slide_scores, "top_indices": maps.top_indices}
    if maps.coords is not None:
        arrays["coords"] = maps.coords
    np.savez_compressed(path, **arrays, **{f"meta_{k}": np.array(v) for k, v in meta.items()})
    return path


def attention_grid(scores: np.ndarray, coords: np.ndarray, patch_size: int | None = None) -> np.ndarray:
    """Rasterise per-patch scores onto the patch grid (one cell per patch, NaN where no patch); returns (rows, cols)."""
    coords = np.asarray(coords, dtype=np.int64)
    if patch_size is None:  # the most common step between neighbouring patch origins
        steps = np.concatenate([np.diff(np.unique(coords[:, 0])), np.diff(np.unique(coords[:, 1]))])
        steps = steps[steps > 0]
        values, counts = np.unique(steps, return_counts=True)
        patch_size = int(values[counts.argmax()]) if len(values) else 1
    cells = (coords - coords.min(axis=0)) // patch_size
    grid = np.full((cells[:, 1].max() + 1, cells[:, 0].max() + 1), np.nan, dtype=np.float32)
    grid[cells[:, 1], cells[:, 0]] = scores
    return grid


def attention_grid_png(maps: AttentionMaps, path: str | Path, title: str = "", patch_size: int | None = None) -> Path:
    """Save a preview PNG: the slide-level map and each branch's map on the patch grid (needs coords)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if maps.coords is None:
        raise ValueError("attention_grid_png needs patch coordinates")
    panels = [("slide (branch mean)", maps.slide_scores)]
    if maps.num_branches > 1:
        panels += [(f"branch {i}", maps.branch_scores[i]) for i in range(maps.num_branches)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, scores) in zip(axes[0], panels):
        # Scores scaled by N so 1.0 means "as much as a uniform share"; comparable across bags.
        image = ax.imshow(attention_grid(scores * len(scores), maps.coords, patch_size), cmap="inferno")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def export_attention(model_name: str, weights: str | Path, bags_path: str | Path, out: str | Path,
                     model_kwargs: str | None = None) -> list[Path]:
    """Load a MIL model and write <bag>.npz attention maps and <bag>.png previews for every bag in `bags_path`."""
    import yaml

    from medai.io.mil_bags import MILBag, read_clam_h5, read_sicapv2_bags
    from models import create_model

    bags_path, out = Path(bags_path), Path(out)
    if bags_path.suffix == ".h5":
        features, coords = read_clam_h5(bags_path)
        bags = [MILBag(bags_path.stem, features, -1, coords=coords)]
    else:
        bags = read_sicapv2_bags(bags_path)
    kwargs = yaml.safe_load(model_kwargs) if model_kwargs else {}
    model = create_model(model_name, pretrained=weights, **kwargs).eval()
    written = []
    for bag in bags:
        maps = attention_maps(model, bag.features, bag.coords)
        written.append(save_attention_maps(maps, out / f"{bag.bag_id}.npz", model=model_name))
        if bag.coords is not None:
            written.append(attention_grid_png(maps, out / f"{bag.bag_id}.png", title=f"{model_name}: {bag.bag_id}"))
    return written
