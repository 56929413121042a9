"""`medai models ...`: the model registry."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Registered models.", no_args_is_help=True)
console = Console()


@app.command("list")
def models_list(pattern: str = typer.Argument("*", help="Shell-style pattern.")) -> None:
    """List registered models with their family, pretrained tags and card."""
    from medai.models.registry import list_models, model_entry

    table = Table(title="models")
    for col in ("name", "family", "pretrained", "card"):
        table.add_column(col)
    for name in list_models(pattern):
        e = model_entry(name)
        table.add_row(name, e.family, ", ".join(e.pretrained) or "-", e.card or "-")
    console.print(table)


@app.command("convert-medvit")
def models_convert_medvit(
    source: Path = typer.Argument(..., help="A MedViTV2 checkpoint released by the authors (.pth)."),
    destination: Path = typer.Argument(..., help="Where to write the safetensors file."),
) -> None:
    """Convert a public MedViTV2 checkpoint to safetensors (names mapped, loaded strictly)."""
    from medai.pipelines.convert_medvit import convert_medvit_checkpoint

    result = convert_medvit_checkpoint(source, destination)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in result["kwargs"].items())
    console.print(f"wrote {result['path']}: create_model('{result['variant']}', pretrained='{result['path']}', {kwargs})")
