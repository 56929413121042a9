"""Per-patch attention of MIL models for heatmaps and top-patch galleries.

`attention_maps(model, features, coords)` returns every branch's attention over the bag's
patches (TransMIL: the class token's attention with Nystrom and square padding undone), the
slide-level map (branch mean), and the top-k patches per branch, computed in chunks so a slide
of any size needs only its features plus O(K N) scores. `save_attention_maps` writes them
as `.npz` (scores, coords, top indices) — the on-disk artifact a slide renderer (issue 6) reads
to overlay them on the slide. `attention_grid_png` draws a coordinate-grid preview without the
slide image (for feature-only sets such as SICAPv2). `render_slide_attention` draws chosen
branches (or their mean) on the slide itself through `medai.results.heatmap.render_heatmap`,
with a gallery of each one's top-k patches read from the slide.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medai.io.wsi import WholeSlide
from medai.results.heatmap import Branch, parse_branch, render_heatmap, render_top_patches, select_branch

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


def parse_branch_spec(spec: str, num_branches: int) -> list[Branch]:
    """Return the maps to draw: 'mean', 'all' (mean then every branch), or numbers like '0,2'."""
    from medai.errors import ConfigError

    chosen: list[Branch] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            picks: list[Branch] = (
                (["mean", *range(num_branches)] if num_branches > 1 else ["mean"])
                if part.lower() == "all" else [parse_branch(part)]
            )
        except ValueError as exc:
            raise ConfigError(f"{exc} (or 'all')", source="--branch") from None
        for pick in picks:
            if pick != "mean" and not 0 <= pick < num_branches:
                raise ConfigError(
                    f"no branch {pick}: the model has {num_branches} (0-{num_branches - 1})", source="--branch"
                )
            if pick not in chosen:
                chosen.append(pick)
    if not chosen:
        raise ConfigError(
            f"no branch chosen in '{spec}' (mean, all, or branch numbers such as 0,2)", source="--branch"
        )
    return chosen


def branch_name(branch: Branch) -> str:
    """File-name part for a branch: 'mean' or 'branch<k>'."""
    return "mean" if branch == "mean" else f"branch{branch}"


def render_slide_attention(
    slide: WholeSlide,
    maps: AttentionMaps,
    patch_size_level0: int,
    out_prefix: str | Path,
    branches: Sequence[Branch] = ("mean",),
    top_k: int = 8,
    patch_level: int = 0,
    label: str = "attention",
) -> list[Path]:
    """Draw each chosen branch (or their mean) on the slide, with a gallery of its top-k patches; return files.

    Writes <prefix>_<mean|branch<k>>_heatmap.png, _region.png, _heatmap.geojson (the WSI
    renderer's outputs) and _top<k>.png per choice.
    """
    if maps.coords is None:
        raise ValueError("drawing attention on the slide needs patch coordinates")
    out_prefix = Path(out_prefix)
    written: list[Path] = []
    for branch in branches:
        scores = select_branch(maps.branch_scores, branch, "attention")
        name = branch_name(branch)
        what = "branch mean" if branch == "mean" else f"branch {branch}"
        prefix = out_prefix.with_name(f"{out_prefix.name}_{name}")
        files = render_heatmap(slide, maps.coords, scores, patch_size_level0, prefix, label=f"{label} ({what})")
        written += list(files.values())
        shown = min(top_k, len(scores))
        gallery = render_top_patches(
            slide, maps.coords, scores, patch_size_level0, prefix.with_name(f"{prefix.name}_top{top_k}.png"),
            k=top_k, patch_level=patch_level,
            title=f"{out_prefix.name}: top {shown} of {len(scores)} patches by {label} ({what})",
        )
        written.append(gallery.path)
    return written


def export_attention(model_name: str, weights: str | Path, bags_path: str | Path, out: str | Path,
                     model_overrides: dict[str, Any] | None = None, *, slide: str | Path | None = None,
                     branches: str = "mean", top_k: int = 8, mpp: float | None = None) -> list[Path]:
    """Load a MIL model (`model_overrides`: its family's keyword options) and write <bag>.npz attention maps and <bag>.png previews for the bags in `bags_path`.

    With `slide` (and a single-slide features .h5 as `bags_path`), also draw the `branches`
    chosen ('mean', 'all', '0,2', ...) on the slide with their top-k patch galleries.
    """
    from medai.errors import ConfigError
    from medai.io.mil_bags import MILBag, read_clam_h5, read_sicapv2_bags
    from medai.models import create_model

    bags_path, out = Path(bags_path), Path(out)
    if bags_path.suffix == ".h5":
        features, coords = read_clam_h5(bags_path)
        bags = [MILBag(bags_path.stem, features, -1, coords=coords)]
    elif slide is not None:
        raise ConfigError(
            f"drawing on a slide needs that slide's features .h5 as the bags, not {bags_path}", source="--slide"
        )
    else:
        bags = read_sicapv2_bags(bags_path)
    model = create_model(model_name, pretrained=weights, **(model_overrides or {})).eval()
    written = []
    for bag in bags:
        maps = attention_maps(model, bag.features, bag.coords, top_k=top_k)
        chosen = parse_branch_spec(branches, maps.num_branches) if slide is not None else []
        written.append(save_attention_maps(maps, out / f"{bag.bag_id}.npz", model=model_name))
        if bag.coords is not None:
            written.append(attention_grid_png(maps, out / f"{bag.bag_id}.png", title=f"{model_name}: {bag.bag_id}"))
        if slide is not None:
            written += _draw_on_slide(slide, bags_path, maps, out / bag.bag_id, chosen, top_k, mpp, model_name)
    return written


def _draw_on_slide(slide: str | Path, features_h5: Path, maps: AttentionMaps, out_prefix: Path,
                   branches: Sequence[Branch], top_k: int, mpp: float | None, model_name: str) -> list[Path]:
    from medai.io.patch_h5 import PatchFileError, read_coords_h5
    from medai.io.wsi import open_slide

    if maps.coords is None:
        raise PatchFileError(features_h5, "no 'coords' dataset: attention cannot be placed on the slide")
    _, attrs = read_coords_h5(features_h5)
    if "patch_size_level0" not in attrs:
        raise PatchFileError(features_h5, "coords lack patch_size_level0 (and a downsample to derive it)")
    with open_slide(slide, mpp=mpp) as handle:
        return render_slide_attention(
            handle, maps, int(attrs["patch_size_level0"]), out_prefix, branches, top_k,
            int(attrs.get("patch_level", 0)), label=f"{model_name} attention",
        )


def attention_by_instance_label(scores: np.ndarray, instance_labels: np.ndarray) -> dict[int, dict[str, float]]:
    """For one bag: {instance label: share of patches, share of attention (slide-level scores)}."""
    scores = np.asarray(scores, dtype=np.float64)
    out = {}
    for label in np.unique(instance_labels):
        sel = instance_labels == label
        out[int(label)] = {"patch_share": float(sel.mean()), "attention_share": float(scores[sel].sum() / scores.sum())}
    return out
