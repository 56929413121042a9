"""`medai ehr ...`: EHR ingest, summaries and the EHRMamba experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from medai.cli.options import override_option

app = typer.Typer(help="EHR timelines: ingest FHIR / MIMIC / MEDS, summarise.", no_args_is_help=True)
console = Console()


@app.command("ingest")
def ehr_ingest(
    paths: list[Path] = typer.Argument(..., exists=True, help="FHIR Bundles/NDJSON files or folders, MIMIC table folders, MEDS folders."),
    out: Path = typer.Option(..., "--out", help="Folder for patients/visits/events/refused Parquet tables."),
    meds: bool = typer.Option(False, "--meds", help="Also write a MEDS copy under OUT/meds."),
    not_after: Optional[str] = typer.Option(None, help="Refuse events after this ISO date (default: now, UTC)."),
) -> None:
    """Read EHR sources into timeline tables and report every refused resource with its id and reason."""
    from datetime import datetime, timezone

    from medai.io.ehr import ingest, to_meds

    limit = datetime.fromisoformat(not_after).replace(tzinfo=timezone.utc) if not_after else None
    tables = ingest(paths, not_after=limit, progress=True)
    tables.write(out)
    if meds:
        to_meds(tables, out / "meds")
    _print_ehr_summary(tables.summary(), out)
    if tables.refused.height:
        console.print(f"refused rows are listed with id and reason in {out / 'refused.csv'}")


@app.command("summary")
def ehr_summary(folder: Path = typer.Argument(..., exists=True, file_okay=False, help="A folder written by `medai ehr ingest`.")) -> None:
    """Print patients, visits, events per kind and code system, the date range and refusals."""
    from medai.io.ehr import EHRTables

    _print_ehr_summary(EHRTables.read(folder).summary(), folder)


@app.command("experiment")
def ehr_experiment(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="An EHR experiment YAML (configs/ehr_mimic_demo.yaml)."),
    override: list[str] = override_option("Config key"),
) -> None:
    """Pretrain + multitask fine-tune EHRMamba and the Transformer baseline, fit the bag-of-codes baselines; print the table."""
    from medai.pipelines.ehr_experiment import load_experiment_config, run_ehr_experiment

    cfg = load_experiment_config(config, override)
    run_ehr_experiment(cfg)
    console.print((cfg.output_dir / "report.md").read_text())
    console.print(f"report: {cfg.output_dir / 'report.json'}; explanation: {cfg.output_dir / 'explanation.md'}")


def _print_ehr_summary(summary: dict, where: Path) -> None:
    console.print(f"{where}: {summary['patients']} patients, {summary['visits']} visits, {summary['events']} events, "
                  f"{summary['refused']} refused")
    console.print(f"date range (UTC): {summary['first_time']} .. {summary['last_time']}")
    table = Table(title="events")
    for col in ("group", "name", "events"):
        table.add_column(col)
    for name, n in summary["events_per_kind"].items():
        table.add_row("kind", name, str(n))
    for name, n in summary["events_per_system"].items():
        table.add_row("code system", name, str(n))
    for name, n in summary["refused_by_reason"].items():
        table.add_row("refused", name, str(n))
    console.print(table)
