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
ehr_app = typer.Typer(help="EHR timelines: ingest FHIR / MIMIC / MEDS, summarise.", no_args_is_help=True)
app.add_typer(ehr_app, name="ehr")


dicom_app = typer.Typer(help="DICOM files: scan, convert, inspect, de-identify.", no_args_is_help=True)
pacs_app = typer.Typer(help="PACS over DICOMweb (QIDO/WADO/STOW) or DIMSE: ping, search, pull, push.", no_args_is_help=True)
app.add_typer(dicom_app, name="dicom")
app.add_typer(pacs_app, name="pacs")
from medai.cli_slides import slides_app  # noqa: E402  (the `medai slides ...` group)

app.add_typer(slides_app, name="slides")


from medai.cli_seg import seg_app  # noqa: E402

app.add_typer(seg_app, name="seg")

from medai.cli_vlm import vlm_app  # noqa: E402  (its own module: the VLM commands are a group)

app.add_typer(vlm_app, name="vlm")
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
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo run is written."),
    epochs: Optional[int] = typer.Option(None, help="Override the bundled config's epochs (default: as configured)."),
) -> None:
    """Run the main job on the bundled defaults: preflight, BreastMNIST fine-tuning, its evaluation."""
    from medai.utils import repo_root
    from medai.pipelines.finetune import finetune as run_finetune
    from medai.pipelines.finetune import load_train_config

    doctor()
    config = repo_root() / "configs" / "breastmnist_resnet18.yaml"
    overrides = [f"output_dir={output_dir}", "run_name=breastmnist-resnet18-demo"]
    if epochs is not None:
        overrides.append(f"trainer.epochs={epochs}")
    cfg = load_train_config(config, overrides)
    console.print(f"Fine-tuning {cfg.model.name} on {cfg.data.path} ({config.name}, up to {cfg.trainer.epochs} epochs; "
                  "re-running resumes an interrupted run)...")
    result = run_finetune(cfg)
    if result.test_report:
        for name, m in result.test_report["metrics"].items():
            console.print(f"{result.test_report['split']} {name}: {m['value']:.4f} (95% CI {m['low']:.4f}-{m['high']:.4f})")
    console.print(f"Report, curves and checkpoints: {result.run_dir} "
                  f"(eval_{cfg.trainer.evaluate_split}.md, curves.png, checkpoints/)")


@app.command()
def finetune(
    config: Path = typer.Argument(..., help="YAML training config (see configs/)."),
    override: list[str] = typer.Option([], "--override", "-o", help="key.sub=value, repeatable."),
    resume: Optional[bool] = typer.Option(
        None, "--resume/--no-resume", help="Require resuming / refuse an existing run (default: resume if found)."
    ),
    seeds: int = typer.Option(1, help="Repeat over this many seeds and report mean ± sd."),
) -> None:
    """Fine-tune a registered model on a dataset with the shared engine (resumable)."""
    from medai.pipelines.finetune import finetune as run_finetune
    from medai.pipelines.finetune import finetune_seeds, load_train_config

    cfg = load_train_config(config, override)
    mode = "auto" if resume is None else ("must" if resume else "never")
    if seeds > 1:
        summary = finetune_seeds(cfg, seeds, mode)
        for name, m in summary["metrics"].items():
            console.print(f"{name}: {m['mean']:.4f} ± {m['sd']:.4f} over {len(summary['seeds'])} seeds")
        return
    result = run_finetune(cfg, mode)
    console.print(f"run: {result.run_dir}  best validation metric {result.best_metric} (epoch {result.best_epoch})")
    if result.test_report:
        for name, m in result.test_report["metrics"].items():
            console.print(f"{result.test_report['split']} {name}: {m['value']:.4f} (95% CI {m['low']:.4f}-{m['high']:.4f})")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder written by `medai finetune`."),
    split: str = typer.Option("test", help="Which split to evaluate."),
    checkpoint: str = typer.Option("best", help="best or last."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the CIs."),
    compare: Optional[Path] = typer.Option(None, help="Another run: paired bootstrap of every metric."),
) -> None:
    """Evaluate a run: metrics with bootstrap 95% CIs, plots, optional paired comparison."""
    from medai.pipelines.evaluate import compare_runs, evaluate_run

    report = evaluate_run(run_dir, split, n_boot, checkpoint)
    for name, m in report["metrics"].items():
        console.print(f"{split} {name}: {m['value']:.4f} (95% CI {m['low']:.4f}-{m['high']:.4f})")
    console.print(f"report: {run_dir / f'eval_{split}.md'}")
    if compare:
        result = compare_runs(run_dir, compare, split, n_boot)
        for name, m in result["metrics"].items():
            console.print(f"{name}: a-b = {m['difference']:+.4f} (95% CI {m['low']:+.4f} to {m['high']:+.4f}, "
                          f"p={m['p_value']:.3f})")


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
    from medai.models.registry import list_models, model_entry

    table = Table(title="models")
    for col in ("name", "family", "pretrained", "card"):
        table.add_column(col)
    for name in list_models(pattern):
        e = model_entry(name)
        table.add_row(name, e.family, ", ".join(e.pretrained) or "-", e.card or "-")
    console.print(table)


@ehr_app.command("ingest")
def ehr_ingest(
    paths: list[Path] = typer.Argument(..., help="FHIR Bundles/NDJSON files or folders, MIMIC table folders, MEDS folders."),
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


@ehr_app.command("summary")
def ehr_summary(folder: Path = typer.Argument(..., help="A folder written by `medai ehr ingest`.")) -> None:
    """Print patients, visits, events per kind and code system, the date range and refusals."""
    from medai.io.ehr import EHRTables

    _print_ehr_summary(EHRTables.read(folder).summary(), folder)


@ehr_app.command("experiment")
def ehr_experiment(
    config: Path = typer.Argument(..., help="An EHR experiment YAML (configs/ehr_mimic_demo.yaml)."),
    override: list[str] = typer.Option([], "--override", "-o", help="key.sub=value (YAML value)."),
) -> None:
    """Pretrain + multitask fine-tune EHRMamba and the Transformer baseline, fit the bag-of-codes baselines; print the table."""
    from medai.pipelines.ehr import load_experiment_config, run_ehr_experiment

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


@dicom_app.command("scan")
def dicom_scan(
    folder: Path = typer.Argument(..., help="Folder tree to index (any file names, non-DICOM files mixed in)."),
    as_json: bool = typer.Option(False, "--json", help="Print the index as JSON."),
) -> None:
    """Index studies/series under FOLDER and list every refused file with its reason (exit 0 when the scan ran)."""
    import json

    from medai.io.dicom import scan_folder

    index = scan_folder(folder, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(index.to_dict(), indent=1, default=str))
        return
    table = Table(title=f"{len(index.studies)} studies, {index.instance_count} instances under {folder}")
    for col in ("study", "series", "modality", "kind", "description", "instances"):
        table.add_column(col)
    for study in index.studies.values():
        for series in study.series.values():
            table.add_row(study.study_uid[-16:], series.series_uid[-16:], series.modality, series.kind,
                          series.description, str(len(series.instances)))
    console.print(table)
    for dup in index.duplicates:
        console.print(f"[yellow]DUPLICATE[/] {dup.path}: {dup.reason}")
    for ref in index.refused:
        console.print(f"[red]REFUSED[/] {ref.path}: {ref.error}: {ref.reason}")
    console.print(f"{index.files_seen} files: {index.instance_count} indexed, {len(index.duplicates)} duplicate copies, {len(index.refused)} refused")


@dicom_app.command("convert")
def dicom_convert(
    series_dir: Path = typer.Argument(..., help="Folder (or file) holding one series."),
    out: Path = typer.Argument(..., help="Output NIfTI (.nii or .nii.gz)."),
    series_uid: Optional[str] = typer.Option(None, help="Series Instance UID when the folder holds several."),
) -> None:
    """Write a series as NIfTI with its geometry (RAS affine); prints spacing and any geometry warnings."""
    from medai.errors import DicomError
    from medai.io.dicom import convert_series

    try:
        volume = convert_series(series_dir, out, series_uid=series_uid)
    except DicomError as exc:
        console.print(f"[red]error[/] {exc}")
        raise typer.Exit(1)
    for w in volume.warnings:
        console.print(f"[yellow]warning[/] {w}")
    console.print(f"wrote {out}: shape {volume.array.shape}, spacing {tuple(round(s, 4) for s in volume.spacing_mm)} mm, {volume.array.dtype}")


@dicom_app.command("info")
def dicom_info(path: Path = typer.Argument(..., help="One DICOM file.")) -> None:
    """Print a header summary (no patient fields) and whether the pixels decode."""
    from medai.errors import DicomError
    from medai.io.dicom import describe_file

    try:
        info = describe_file(path)
    except DicomError as exc:
        console.print(f"[red]{type(exc).__name__}[/] {exc}")
        raise typer.Exit(1)
    for key, value in info.items():
        console.print(f"{key:>20}: {value}")
    if info.get("decodes") is False:
        raise typer.Exit(1)


@dicom_app.command("deidentify")
def dicom_deidentify(
    src: Path = typer.Argument(..., help="Folder (or file) to de-identify."),
    out: Path = typer.Argument(..., help="Output folder."),
    secret: str = typer.Option(..., envvar="MEDAI_DEID_SECRET", help="Key for the UID remapping (same key: same new UIDs)."),
    pseudonym: str = typer.Option("ANON", help="Patient Name/ID written instead."),
) -> None:
    """De-identify (PS3.15 basic profile) with UIDs remapped consistently; lists refused files."""
    from medai.io.deidentify import deidentify_folder

    written, refused = deidentify_folder(src, out, secret=secret, pseudonym=pseudonym)
    for path, reason in refused:
        console.print(f"[red]REFUSED[/] {path}: {reason}")
    console.print(f"wrote {len(written)} de-identified file(s) to {out}")


def _pacs_auth(user: Optional[str], password: Optional[str], token: Optional[str], insecure: bool, ca_bundle: Optional[Path]) -> dict:
    return {"username": user, "password": password, "token": token,
            "verify_tls": str(ca_bundle) if ca_bundle else not insecure}


_USER = typer.Option(None, "--user", envvar="MEDAI_PACS_USER", help="HTTP basic auth user.")
_PASSWORD = typer.Option(None, "--password", envvar="MEDAI_PACS_PASSWORD", help="HTTP basic auth password.")
_TOKEN = typer.Option(None, "--token", envvar="MEDAI_PACS_TOKEN", help="Bearer token.")
_INSECURE = typer.Option(False, "--insecure", help="Do not verify TLS certificates (testing only).")
_CA = typer.Option(None, "--ca-bundle", help="CA bundle (PEM) for the site's TLS certificates.")


@pacs_app.command("ping")
def pacs_ping(url: str = typer.Argument(..., help="http(s)://host:port/dicom-web or dicom://AE@host:port"),
              user: Optional[str] = _USER, password: Optional[str] = _PASSWORD, token: Optional[str] = _TOKEN,
              insecure: bool = _INSECURE, ca_bundle: Optional[Path] = _CA) -> None:
    """Check a PACS connection (QIDO query or C-ECHO) and say what is wrong: URL, TLS, auth, AE title."""
    from medai.io.pacs import ping

    result = ping(url, **_pacs_auth(user, password, token, insecure, ca_bundle))
    console.print(f"{'[green]OK[/]' if result.ok else '[red]FAILED[/]'} {result.protocol} {result.url}: {result.detail}")
    if not result.ok:
        raise typer.Exit(1)


@pacs_app.command("search")
def pacs_search(url: str = typer.Argument(..., help="DICOMweb root URL."),
                study: Optional[str] = typer.Option(None, help="List the series of this Study Instance UID."),
                user: Optional[str] = _USER, password: Optional[str] = _PASSWORD, token: Optional[str] = _TOKEN,
                insecure: bool = _INSECURE, ca_bundle: Optional[Path] = _CA) -> None:
    """QIDO-RS: list studies, or the series of one study."""
    import json

    from medai.io.pacs import DicomWebPacs

    pacs = DicomWebPacs(url, **_pacs_auth(user, password, token, insecure, ca_bundle))
    rows = pacs.search_series(study) if study else pacs.search_studies()
    typer.echo(json.dumps(rows, indent=1, default=str))


@pacs_app.command("pull")
def pacs_pull(url: str = typer.Argument(..., help="DICOMweb root URL."), study: str = typer.Argument(...),
              series: str = typer.Argument(...), dest: Path = typer.Argument(..., help="Output folder."),
              user: Optional[str] = _USER, password: Optional[str] = _PASSWORD, token: Optional[str] = _TOKEN,
              insecure: bool = _INSECURE, ca_bundle: Optional[Path] = _CA) -> None:
    """WADO-RS: retrieve one series into DEST."""
    from medai.io.pacs import pull_series

    paths = pull_series(url, study, series, dest, **_pacs_auth(user, password, token, insecure, ca_bundle))
    console.print(f"retrieved {len(paths)} instance(s) into {dest}")


@pacs_app.command("push")
def pacs_push(url: str = typer.Argument(..., help="DICOMweb root URL (STOW-RS) or dicom://AE@host:port (C-STORE)."),
              paths: list[Path] = typer.Argument(..., help="Files or folders to store."),
              user: Optional[str] = _USER, password: Optional[str] = _PASSWORD, token: Optional[str] = _TOKEN,
              insecure: bool = _INSECURE, ca_bundle: Optional[Path] = _CA,
              deidentify_secret: Optional[str] = typer.Option(
                  None, "--deidentify-secret", envvar="MEDAI_DEID_SECRET",
                  help="De-identify before sending (PS3.15 basic profile; UIDs remapped with this key, the same "
                       "key giving the same UIDs across pushes); files that cannot be de-identified are not sent."),
              pseudonym: str = typer.Option("ANON", help="PatientName/PatientID written when de-identifying.")) -> None:
    """STOW-RS / C-STORE files (folders are walked) to a PACS, optionally de-identified on the way out."""
    import tempfile

    from medai.io.deidentify import deidentify_files
    from medai.io.dicom import iter_files
    from medai.io.pacs import push_files

    files = [f for p in paths for f in iter_files(p)]
    auth = {} if url.startswith("dicom://") else _pacs_auth(user, password, token, insecure, ca_bundle)
    with tempfile.TemporaryDirectory(prefix="medai-deid-") as staging:
        if deidentify_secret:
            files, refused = deidentify_files(files, staging, secret=deidentify_secret, pseudonym=pseudonym)
            for path, reason in refused:
                console.print(f"[red]NOT SENT[/] {path}: {reason}")
        stored = push_files(url, files, **auth)
    console.print(f"stored {stored} instance(s)" + (" (de-identified)" if deidentify_secret else ""))


@models_app.command("convert-medvit")
def models_convert_medvit(
    source: Path = typer.Argument(..., help="A MedViTV2 checkpoint released by the authors (.pth)."),
    destination: Path = typer.Argument(..., help="Where to write the safetensors file."),
) -> None:
    """Convert a public MedViTV2 checkpoint to safetensors (names mapped, loaded strictly)."""
    from medai.pipelines.convert_medvit import convert_medvit_checkpoint

    result = convert_medvit_checkpoint(source, destination)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in result["kwargs"].items())
    console.print(f"wrote {result['path']}: create_model('{result['variant']}', pretrained='{result['path']}', {kwargs})")


from medai.cli_mil import mil_app  # noqa: E402  (the `medai mil` group)

app.add_typer(mil_app, name="mil")


def main() -> None:
    """Console entry point: medai's own errors (bad config, missing data, unreadable input) print one line, exit 2."""
    from medai.errors import MedaiError

    try:
        app()
    except MedaiError as exc:
        # The message already names the file and what is wrong; a traceback would only bury it.
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
