"""The `medai` command: thin wrappers that parse, call a library function and print."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="medai: medical multimodal AI pipeline.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Shared data: list and verify.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
from medai.cli_slides import slides_app  # noqa: E402  (the `medai slides ...` group)

app.add_typer(slides_app, name="slides")
console = Console()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def doctor() -> None:
    """Print a preflight report: versions, devices, kernel backends, peers, data, binaries."""
    from medai.doctor import run_doctor

    report = run_doctor()
    table = Table(title="medai doctor", show_lines=False)
    for col in ("section", "check", "", "detail"):
        table.add_column(col)
    for c in report.checks:
        table.add_row(c.section, c.name, "[green]ok[/]" if c.ok else "[yellow]--[/]", c.detail)
    console.print(table)
    if report.missing:
        console.print(f"{len(report.missing)} item(s) missing: " + ", ".join(c.name for c in report.missing))


@app.command()
def demo() -> None:
    """Run the main job on the bundled defaults."""
    from medai.doctor import run_doctor

    doctor()
    missing = run_doctor().missing
    console.print(
        "The end-to-end demo job is not built yet; the report above lists what this machine has"
        + (f" and what is missing ({len(missing)} item(s))." if missing else " (nothing missing).")
    )


@data_app.command("verify")
def data_verify(
    root: Optional[Path] = typer.Option(None, help="Data root (default: MEDAI_DATA or ../shared/data)."),
    only: Optional[str] = typer.Option(None, help="Only files under this relative prefix."),
) -> None:
    """Check every file of the shared data against SHA256SUMS; exit 1 naming any that differ."""
    from medai.data import verify_checksums

    report = verify_checksums(root, only=only, progress=True)
    for name in report.mismatched:
        console.print(f"[red]MISMATCH[/] {name}")
    for name in report.missing:
        console.print(f"[red]MISSING[/] {name}")
    if not report.ok:
        console.print(f"{len(report.mismatched)} mismatched, {len(report.missing)} missing of {report.checked}")
        raise typer.Exit(1)
    console.print(f"OK: {report.checked} files match SHA256SUMS")


@data_app.command("list")
def data_list() -> None:
    """List the named datasets, where they are, and whether they are present."""
    from medai.data import DATASETS, data_root

    root = data_root()
    table = Table(title=f"datasets under {root}")
    for col in ("name", "path", "present"):
        table.add_column(col)
    for name, rel in sorted(DATASETS.items()):
        table.add_row(name, rel, "yes" if (root / rel).exists() else "no")
    console.print(table)


@models_app.command("list")
def models_list(pattern: str = typer.Argument("*", help="Shell-style pattern.")) -> None:
    """List registered models with their family, pretrained tags and card."""
    from models.registry import list_models, model_entry

    table = Table(title="models")
    for col in ("name", "family", "pretrained", "card"):
        table.add_column(col)
    for name in list_models(pattern):
        e = model_entry(name)
        table.add_row(name, e.family, ", ".join(e.pretrained) or "-", e.card or "-")
    console.print(table)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
