"""`medai dicom ...`: scan, convert, inspect and de-identify DICOM files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="DICOM files: scan, convert, inspect, de-identify.", no_args_is_help=True)
console = Console()


@app.command("scan")
def dicom_scan(
    folder: Path = typer.Argument(..., help="Folder tree to index (any file names, non-DICOM files mixed in)."),
    as_json: bool = typer.Option(False, "--json", help="Print the index as JSON (patient name, ID and accession number redacted)."),
    phi: bool = typer.Option(False, "--phi", help="Keep patient name, ID and accession number in the JSON."),
) -> None:
    """Index studies/series under FOLDER and list every refused file with its reason (exit 0 when the scan ran)."""
    import json

    from medai.io.dicom import scan_folder

    index = scan_folder(folder, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(index.to_dict(phi=phi), indent=1, default=str))
        return
    table = Table(title=f"{len(index.studies)} studies, {index.instance_count} instances under {folder}")
    for col in ("study", "series", "modality", "kind", "description", "instances"):
        table.add_column(col)
    for study in index.studies.values():
        for series in study.series.values():
            table.add_row(study.study_uid[-16:], series.series_uid[-16:], series.modality, series.kind,
                          series.description, str(len(series.instances)))
    console.print(table)
    for series in index.all_series():
        for warning in series.warnings:
            console.print(f"[yellow]GEOMETRY[/] series {series.series_uid[-16:]} ({series.description}): {warning}")
    for dup in index.duplicates:
        console.print(f"[yellow]DUPLICATE[/] {dup.path}: {dup.reason}")
    for ref in index.refused:
        console.print(f"[red]REFUSED[/] {ref.path}: {ref.error}: {ref.reason}")
    console.print(f"{index.files_seen} files: {index.instance_count} indexed, {len(index.duplicates)} duplicate copies, {len(index.refused)} refused")


@app.command("convert")
def dicom_convert(
    series_dir: Path = typer.Argument(..., exists=True, help="Folder (or file) holding one series."),
    out: Path = typer.Argument(..., help="Output NIfTI (.nii or .nii.gz)."),
    series_uid: Optional[str] = typer.Option(None, help="Series Instance UID when the folder holds several."),
) -> None:
    """Write a series as NIfTI with its geometry (RAS affine); prints spacing and any geometry warnings."""
    from medai.io.dicom import convert_series

    volume = convert_series(series_dir, out, series_uid=series_uid)
    for w in volume.warnings:
        console.print(f"[yellow]warning[/] {w}")
    console.print(f"wrote {out}: shape {volume.array.shape}, spacing {tuple(round(s, 4) for s in volume.spacing_mm)} mm, {volume.array.dtype}")


@app.command("info")
def dicom_info(path: Path = typer.Argument(..., exists=True, dir_okay=False, help="One DICOM file.")) -> None:
    """Print a header summary (no patient fields) and whether the pixels decode (exit 1 when they do not)."""
    from medai.io.dicom import describe_file

    info = describe_file(path)
    for key, value in info.items():
        console.print(f"{key:>20}: {value}")
    if info.get("decodes") is False:
        raise typer.Exit(1)


@app.command("deidentify")
def dicom_deidentify(
    src: Path = typer.Argument(..., exists=True, help="Folder (or file) to de-identify."),
    out: Path = typer.Argument(..., help="Output folder."),
    secret: str = typer.Option(..., envvar="MEDAI_DEID_SECRET",
                               help="Key (16+ characters) for the UID remapping: same key, same new UIDs; keep it secret."),
    pseudonym: str = typer.Option("ANON", help="Patient Name/ID written instead."),
    burned_in_checked: bool = typer.Option(
        False, "--burned-in-checked",
        help="The pixels of US/SC/XA/... images without a Burned In Annotation element were checked for text."),
) -> None:
    """De-identify with the DICOM PS3.15 Basic Application Level Confidentiality Profile; lists refused files.

    Every attribute of PS3.15 Table E.1-1 gets its basic-profile action (removed, emptied, a dummy value or a new UID), inside sequences too; private elements and overlays are removed; Patient Name and ID become --pseudonym.

    UIDs are remapped through a map keyed by --secret: a study's references (SEG/SR -> images) stay consistent, another key gives unrelated UIDs.

    No option of the profile is applied: dates, descriptions, device and institution identity are not retained, and the text, codes, names and dates inside SR content are replaced by dummy values (numbers and structure stay).

    Pixels are not cleaned: images with Burned In Annotation YES are refused, and so are US/SC/XA/... images without Burned In Annotation NO unless --burned-in-checked.

    Exit 0 all written, 1 some refused (each named), 2 bad key/source/output or no file to read.
    """
    from medai.io.deidentify import deidentify_folder

    written, refused = deidentify_folder(src, out, secret=secret, pseudonym=pseudonym,
                                         burned_in_checked=burned_in_checked)
    for path, reason in refused:
        console.print(f"[red]REFUSED[/] {path}: {reason}")
    console.print(f"wrote {len(written)} de-identified file(s) to {out}")
    if not written and not refused:
        console.print(f"[red]no files found under {src}[/]")
        raise typer.Exit(2)
    if refused:
        raise typer.Exit(1)
