"""`medai mil ...`: MIL benchmark, attention export (thin wrappers)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medai.cli.options import override_option

app = typer.Typer(help="Slide-level multiple-instance learning.", no_args_is_help=True)
console = Console()


@app.command("benchmark")
def mil_benchmark(
    path: Path = typer.Argument(..., exists=True, help="Bags: a MIL-toolbox .mat, a bag CSV (bag_id,label,features...), or a SICAPv2 folder."),
    models: str = typer.Option("abmil,acmil,acmil_aem,transmil", help="Comma-separated registered MIL models."),
    folds: int = typer.Option(10, help="Cross-validation folds."),
    seeds: int = typer.Option(1, help="Seeds (each also re-draws the folds; all models share them)."),
    epochs: int = typer.Option(20, help="Epochs per fold."),
    standardize: bool = typer.Option(True, help="Z-score features with training-fold statistics."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the 95% CIs."),
    out: Path = typer.Option(Path("runs/mil_benchmark"), help="Output folder (runs, results.json, results.md)."),
) -> None:
    """Cross-validate MIL models on a bag set through the shared engine; print the results table."""
    from medai.pipelines.mil_benchmark import BenchmarkSettings, run_mil_benchmark

    settings = BenchmarkSettings(models=tuple(m.strip() for m in models.split(",") if m.strip()), folds=folds,
                                 seeds=tuple(range(seeds)), epochs=epochs, standardize=standardize,
                                 n_boot=n_boot)
    run_mil_benchmark(path, settings, out)
    # the markdown table as written: no wrapping, and its [low, high] CIs are not rich markup
    console.print((out / "results.md").read_text(), markup=False, highlight=False, soft_wrap=True)


@app.command("attention")
def mil_attention(
    model: str = typer.Argument(..., help="Registered MIL model name."),
    weights: Path = typer.Argument(..., exists=True, dir_okay=False, help="Its safetensors weights (e.g. a run's checkpoints/best/model.safetensors)."),
    bags: Path = typer.Argument(..., exists=True, help="Bags with coordinates: a CLAM .h5 file or a SICAPv2 folder."),
    out: Path = typer.Option(Path("outputs/attention"), help="Folder for <bag>.npz and <bag>.png."),
    override: list[str] = override_option("Model option"),
    slide: Optional[Path] = typer.Option(
        None, exists=True, help="The slide of a features .h5: also draw heatmaps on it and top-patch galleries."
    ),
    branch: str = typer.Option(
        "mean", help="With --slide, what to draw: mean (of the branches), all, or branch numbers such as 0,2."
    ),
    top_k: int = typer.Option(8, help="Patches per top-patch gallery (and top indices kept in the npz)."),
    mpp: Optional[float] = typer.Option(None, help="Level-0 µm/px of the slide when its file has none."),
) -> None:
    """Export per-patch attention (npz for the slide renderer) and a grid preview PNG for each bag."""
    from medai.config import parse_overrides
    from medai.pipelines.mil_heatmaps import export_attention

    written = export_attention(model, weights, bags, out, parse_overrides(override), slide=slide, branches=branch,
                               top_k=top_k, mpp=mpp)
    for path in written:
        console.print(str(path))
