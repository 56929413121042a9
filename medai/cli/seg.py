"""`medai seg ...`: 3D segmentation commands (split, prediction; training goes through `medai finetune`). Thin wrappers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medai.cli.options import override_option

app = typer.Typer(help="3D segmentation (U-Mamba, DynUNet) on NIfTI volumes.", no_args_is_help=True)
console = Console()


@app.command("split")
def split(
    dataset_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="MSD-style folder with images/ and labels/."),
    out: Path = typer.Option(..., help="Split JSON file to write."),
    val_fraction: float = typer.Option(0.2, help="Fraction of cases for validation."),
    seed: int = typer.Option(0, help="Shuffle seed."),
) -> None:
    """Write a fixed, seeded train/validation split file of the labelled cases."""
    from medai.io.datasets.volumes import make_split, write_split

    data = make_split(dataset_dir, val_fraction, seed)
    write_split(data, out)
    console.print(f"{out}: {len(data['train'])} train, {len(data['val'])} validation cases")


@app.command("predict")
def predict(
    image: Path = typer.Argument(..., exists=True, dir_okay=False, help="NIfTI volume to segment."),
    model: str = typer.Option(..., help="Registered model name, e.g. umamba_bot_3d."),
    weights: Path = typer.Option(..., exists=True, dir_okay=False, help="safetensors checkpoint of that model."),
    out: Path = typer.Option(..., help="Label volume to write (.nii.gz)."),
    override: list[str] = override_option("Model option"),
    roi: tuple[int, int, int] = typer.Option((32, 48, 32), help="Sliding-window ROI in voxels."),
    montage: Optional[Path] = typer.Option(None, help="Also write a PNG overlay montage here."),
    label: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Reference label volume shown in the montage."),
) -> None:
    """Segment one volume with sliding-window inference; write NIfTI labels in the input grid."""
    from medai.config import parse_overrides
    from medai.models import create_model
    from medai.pipelines.segmentation import predict_volume

    net = create_model(model, pretrained=weights, **parse_overrides(override))
    path = predict_volume(net, image, out, roi, montage, label)
    console.print(f"wrote {path}" + (f" and {montage}" if montage else ""))
