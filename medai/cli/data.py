"""`medai data ...`: the shared data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Shared data: list and verify.", no_args_is_help=True)
console = Console()


@app.command("verify")
def data_verify(
    root: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="Data root (default: MEDAI_DATA or ../shared/data)."),
    only: Optional[str] = typer.Option(None, help="Only files under this relative prefix."),
) -> None:
    """Check every file of the shared data against SHA256SUMS; exit 1 naming any that differ."""
    from medai.io.data import verify_checksums

    report = verify_checksums(root, only=only, progress=True)
    for name in report.mismatched:
        console.print(f"[red]MISMATCH[/] {name}")
    for name in report.missing:
        console.print(f"[red]MISSING[/] {name}")
    if not report.ok:
        console.print(f"{len(report.mismatched)} mismatched, {len(report.missing)} missing of {report.checked}")
        raise typer.Exit(1)
    console.print(f"OK: {report.checked} files match SHA256SUMS")


@app.command("list")
def data_list() -> None:
    """List the named datasets, where they are, and whether they are present."""
    from medai.io.data import DATASETS, data_root

    root = data_root()
    table = Table(title=f"datasets under {root}")
    for col in ("name", "path", "present"):
        table.add_column(col)
    for name, rel in sorted(DATASETS.items()):
        table.add_row(name, rel, "yes" if (root / rel).exists() else "no")
    console.print(table)
