"""`medai slides ...`: whole-slide info, tissue, patching, feature extraction and heatmaps (thin wrappers)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Whole-slide images: info, tissue, patch, extract, heatmap.", no_args_is_help=True
)
console = Console()

_MPP_HELP = "Level-0 µm/px to use when the slide has none (or to override it)."


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@app.command("info")
def slides_info(
    slide: Path = typer.Argument(..., exists=True, help="Slide file or DICOM folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    mpp: float | None = typer.Option(None, help=_MPP_HELP),
    backend: str | None = typer.Option(
        None, help="Force a backend: openslide, tiffslide, wsidicom."
    ),
) -> None:
    """Print backend, vendor, dimensions, levels, downsamples, mpp (or 'unknown') and associated images."""
    from medai.io.wsi import open_slide

    with open_slide(slide, mpp=mpp, backend=backend) as handle:
        info = handle.info()
    if as_json:
        typer.echo(json.dumps(info.to_dict(), indent=2))
        return
    mpp_text = f"{info.mpp:.4f} µm/px ({info.mpp_source})" if info.mpp else "unknown (pass --mpp)"
    console.print(f"[bold]{info.path}[/]")
    console.print(f"backend {info.backend}, vendor {info.vendor}, mpp {mpp_text}")
    if info.objective_power:
        console.print(f"objective {info.objective_power:g}x")
    table = Table()
    for col in ("level", "width", "height", "downsample"):
        table.add_column(col)
    for level, ((w, h), ds) in enumerate(zip(info.level_dimensions, info.level_downsamples)):
        table.add_row(str(level), str(w), str(h), f"{ds:.4f}")
    console.print(table)
    console.print("associated images: " + (", ".join(info.associated_images) or "none"))
    for note in info.notes:
        console.print(f"[yellow]note[/] {note}")


@app.command("tissue")
def slides_tissue(
    slide: Path = typer.Argument(..., exists=True, help="Slide file or DICOM folder."),
    out_dir: Path = typer.Argument(
        ..., help="Folder for <id>_mask.png, <id>_overlay.png, <id>.geojson."
    ),
    mpp: float | None = typer.Option(None, help=_MPP_HELP),
) -> None:
    """Detect tissue; write the mask, a thumbnail overlay and QuPath GeoJSON."""
    from medai.io.wsi import open_slide
    from medai.pipelines.extract_features import slide_id_for
    from medai.pipelines.slides import segment_slide

    with open_slide(slide, mpp=mpp) as handle:
        result = segment_slide(handle, out_dir, slide_id_for(slide))
    console.print(
        f"tissue {100 * result.tissue.tissue_fraction:.1f}% of the slide in {len(result.tissue.polygons)} region(s); "
        f"saturation threshold {result.tissue.threshold}"
    )
    for kind, path in result.files.items():
        console.print(f"  {kind}: {path}")


@app.command("patch")
def slides_patch(
    slide: Path = typer.Argument(..., exists=True, help="Slide file or DICOM folder."),
    out_dir: Path = typer.Argument(
        ..., help="Output folder (tissue/ and patches/ are created in it)."
    ),
    patch_size: int = typer.Option(256, help="Patch side in px as the encoder sees it."),
    target_mpp: float = typer.Option(0.5, help="Patch resolution in µm/px."),
    min_tissue: float = typer.Option(0.25, help="Minimum tissue fraction of a kept patch."),
    mpp: float | None = typer.Option(None, help=_MPP_HELP),
) -> None:
    """Segment tissue and write the patch grid (coords HDF5, CLAM/TRIDENT layout) and its overlay."""
    from medai.io.wsi import open_slide
    from medai.pipelines.extract_features import slide_id_for
    from medai.pipelines.slides import PatchConfig, patch_slide

    cfg = PatchConfig(patch_size=patch_size, target_mpp=target_mpp, min_tissue_fraction=min_tissue)
    with open_slide(slide, mpp=mpp) as handle:
        grid, _ = patch_slide(handle, out_dir, slide_id_for(slide), patch_cfg=cfg)
    console.print(
        f"{len(grid.coords)} patches of {grid.patch_size} px at {grid.mpp} µm/px "
        f"(level {grid.patch_level}, {grid.patch_size_level0} level-0 px each) -> {out_dir}/patches/{grid.name}.h5"
    )


@app.command("extract")
def slides_extract(
    slides: list[Path] = typer.Argument(
        None, exists=True, help="Slide files, folders of slides, or DICOM folders."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    csv_path: Path | None = typer.Option(
        None, "--csv", exists=True, dir_okay=False, help="CSV with a 'path' column (+ slide_id, mpp, target_mpp)."
    ),
    model: str = typer.Option("efficientnet_lite0", help="Registered medai model or timm:<name>."),
    pretrained: str | None = typer.Option(
        "auto", help="Pretrained tag or local .safetensors ('' for none; auto: ImageNet when the model has it)."
    ),
    patch_size: int = typer.Option(256, help="Patch side in px as the encoder sees it."),
    target_mpp: float = typer.Option(0.5, help="Patch resolution in µm/px."),
    min_tissue: float = typer.Option(0.25, help="Minimum tissue fraction of a kept patch."),
    mpp: float | None = typer.Option(
        None, help=_MPP_HELP + " Applies to every slide without a CSV value."
    ),
    batch_size: int = typer.Option(64, help="Patches per forward pass."),
    workers: int = typer.Option(2, help="DataLoader processes decoding tiles."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU), fp32, bf16, fp16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo slides that are already done."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Extract patch features for many slides into <out>/features/<id>.h5; resumable; failures recorded."""
    from medai.config import from_dict
    from medai.pipelines.extract_features import ExtractConfig, read_slide_list, run_extraction

    # SIGTERM (batch schedulers) unwinds like Ctrl-C so temporaries are removed and locks released.
    signal.signal(signal.SIGTERM, _interrupt)
    entries = read_slide_list(slides or [], csv_path, default_mpp=mpp)
    cfg = from_dict(
        ExtractConfig,
        {
            "out_dir": str(out),
            "encoder": {"name": model, "pretrained": pretrained or None},
            "patch": {"patch_size": patch_size, "target_mpp": target_mpp, "min_tissue_fraction": min_tissue},
            "batch_size": batch_size,
            "num_workers": workers,
            "device": device,
            "precision": precision,
            "overwrite": overwrite,
            "progress": progress,
        },
        source="medai slides extract",
    )
    summary = run_extraction(entries, cfg)
    table = Table(title=f"feature extraction -> {out}")
    for col in ("slide", "state", "patches", "detail"):
        table.add_column(col)
    for item in summary["slides"]:
        detail = item.get("error") or item.get("reason") or f"{item.get('seconds', '')} s"
        table.add_row(item["slide_id"], item["state"], str(item.get("n_patches", "")), detail)
    console.print(table)
    console.print(", ".join(f"{k}: {v}" for k, v in sorted(summary["counts"].items())))
    if summary["counts"].get("failed"):
        raise typer.Exit(1)


@app.command("heatmap")
def slides_heatmap(
    slide: Path = typer.Argument(..., exists=True, help="Slide file or DICOM folder."),
    features_h5: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help="Features or coords HDF5 of this slide (gives coords and patch size)."
    ),
    scores: Path = typer.Argument(
        ...,
        exists=True,
        dir_okay=False,
        help="Scores per patch: .npy, .npz (`medai mil attention` output: slide_scores + coords) or HDF5.",
    ),
    out_prefix: Path = typer.Option(
        ..., "--out", help="Output prefix: <out>_heatmap.png, _region.png, _heatmap.geojson."
    ),
    key: str | None = typer.Option(
        None, help="Array/dataset name in SCORES (default: slide_scores in .npz, scores in HDF5); "
        "'branch_scores:K' or 'branch_scores:mean' picks one branch of a K-branch attention."
    ),
    label: str = typer.Option("attention", help="Score name in the colour bar and GeoJSON."),
    normalize: str = typer.Option("percentile", help="percentile, minmax or none."),
    mpp: float | None = typer.Option(None, help=_MPP_HELP),
) -> None:
    """Render per-patch scores as a smooth overlay on the thumbnail and a full-resolution region."""
    import numpy as np

    from medai.errors import InputFileError, MedaiError
    from medai.io.patch_h5 import read_coords_h5
    from medai.io.wsi import open_slide
    from medai.results.heatmap import load_scores, render_heatmap

    coords, attrs = read_coords_h5(features_h5)
    try:
        values, score_coords = load_scores(scores, key)
        if score_coords is not None and not np.array_equal(score_coords, coords):
            raise InputFileError(scores, f"its coords differ from those in {features_h5}")
        with open_slide(slide, mpp=mpp) as handle:
            files = render_heatmap(
                handle, coords, values, int(attrs["patch_size_level0"]), out_prefix, label=label, normalize=normalize
            )
    except (ValueError, KeyError) as exc:
        # The scores reader and the renderer name the file and array in their messages: bad input, exit 2.
        raise MedaiError(exc.args[0]) from exc
    for kind, path in files.items():
        console.print(f"{kind}: {path}")
