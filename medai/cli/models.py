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


@app.command("convert")
def models_convert(
    family: str = typer.Argument(..., help="Whose checkpoint format: a registered converter, e.g. medvit or acmil (a wrong name lists them)."),
    source: Path = typer.Argument(..., exists=True, dir_okay=False, help="The authors' checkpoint (.pth; read as tensors only)."),
    destination: Path = typer.Argument(..., help="Where to write the safetensors file."),
) -> None:
    """Convert an authors' checkpoint to safetensors (names mapped, loaded strictly); print how to load it."""
    from medai.models.pretrained import checkpoint_converters, convert_checkpoint

    known = checkpoint_converters()
    if family not in known:
        raise typer.BadParameter(f"'{family}' has no converter (known: {', '.join(known)})", param_hint="FAMILY")
    result = convert_checkpoint(family, source, destination)
    kwargs = "".join(f", {k}={v!r}" for k, v in result.kwargs.items())
    console.print(f"wrote {result.path}: create_model('{result.model}', pretrained='{result.path}'{kwargs})",
                  markup=False, highlight=False, soft_wrap=True)
