"""`medai pacs ...`: talk to a PACS over DICOMweb or DIMSE."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(help="PACS over DICOMweb (QIDO/WADO/STOW) or DIMSE: ping, search, pull, push.", no_args_is_help=True)
console = Console()

_USER = typer.Option(None, "--user", envvar="MEDAI_PACS_USER", help="HTTP basic auth user.")
_PASSWORD = typer.Option(None, "--password", envvar="MEDAI_PACS_PASSWORD", help="HTTP basic auth password.")
_TOKEN = typer.Option(None, "--token", envvar="MEDAI_PACS_TOKEN", help="Bearer token.")
_INSECURE = typer.Option(False, "--insecure", help="Do not verify TLS certificates (testing only).")
_CA = typer.Option(None, "--ca-bundle", exists=True, dir_okay=False, help="CA bundle (PEM) for the site's TLS certificates.")
_TIMEOUT = typer.Option(30.0, "--timeout", help="Seconds to wait for the server per request (one retry).")


def _pacs_auth(user: Optional[str], password: Optional[str], token: Optional[str], insecure: bool,
               ca_bundle: Optional[Path], timeout: float) -> dict:
    return {"username": user, "password": password, "token": token, "timeout_s": timeout,
            "verify_tls": str(ca_bundle) if ca_bundle else not insecure}


@app.command("ping")
def pacs_ping(url: str = typer.Argument(..., help="http(s)://host:port/dicom-web or dicom://AE@host:port"),
              user: Optional[str] = _USER, password: Optional[str] = _PASSWORD, token: Optional[str] = _TOKEN,
              insecure: bool = _INSECURE, ca_bundle: Optional[Path] = _CA, timeout: float = _TIMEOUT) -> None:
    """Check a PACS connection (QIDO query or C-ECHO); exit 2 saying what is wrong: URL, TLS, auth, AE title."""
    from medai.io.pacs import ping

    result = ping(url, **_pacs_auth(user, password, token, insecure, ca_bundle, timeout))
    console.print(f"{'[green]OK[/]' if result.ok else '[red]FAILED[/]'} {result.protocol} {result.url}: {result.detail}")
    if not result.ok:
        raise typer.Exit(2)  # the URL, TLS settings or credentials given are wrong: bad input, as in search and pull


@app.command("search")
def pacs_search(url: str = typer.Argument(..., help="DICOMweb root URL."),
                study: Optional[str] = typer.Option(None, help="List the series of this Study Instance UID."),
                user: Optional[str] = _USER, password: Optional[str] = _PASSWORD, token: Optional[str] = _TOKEN,
                insecure: bool = _INSECURE, ca_bundle: Optional[Path] = _CA, timeout: float = _TIMEOUT) -> None:
    """QIDO-RS: list studies, or the series of one study."""
    import json

    from medai.io.pacs import DicomWebPacs

    pacs = DicomWebPacs(url, **_pacs_auth(user, password, token, insecure, ca_bundle, timeout))
    rows = pacs.search_series(study) if study else pacs.search_studies()
    typer.echo(json.dumps(rows, indent=1, default=str))


@app.command("pull")
def pacs_pull(url: str = typer.Argument(..., help="DICOMweb root URL."), study: str = typer.Argument(...),
              series: str = typer.Argument(...), dest: Path = typer.Argument(..., help="Output folder."),
              user: Optional[str] = _USER, password: Optional[str] = _PASSWORD, token: Optional[str] = _TOKEN,
              insecure: bool = _INSECURE, ca_bundle: Optional[Path] = _CA, timeout: float = _TIMEOUT) -> None:
    """WADO-RS: retrieve one series into DEST."""
    from medai.io.pacs import pull_series

    paths = pull_series(url, study, series, dest, **_pacs_auth(user, password, token, insecure, ca_bundle, timeout))
    console.print(f"retrieved {len(paths)} instance(s) into {dest}")


@app.command("push")
def pacs_push(url: str = typer.Argument(..., help="DICOMweb root URL (STOW-RS) or dicom://AE@host:port (C-STORE)."),
              paths: list[Path] = typer.Argument(..., exists=True, help="Files or folders to store."),
              user: Optional[str] = _USER, password: Optional[str] = _PASSWORD, token: Optional[str] = _TOKEN,
              insecure: bool = _INSECURE, ca_bundle: Optional[Path] = _CA, timeout: float = _TIMEOUT,
              deidentify_secret: Optional[str] = typer.Option(
                  None, "--deidentify-secret", envvar="MEDAI_DEID_SECRET",
                  help="De-identify before sending (PS3.15 basic profile; UIDs remapped with this key, the same "
                       "key giving the same UIDs across pushes); files that cannot be de-identified are not sent."),
              pseudonym: str = typer.Option("ANON", help="PatientName/PatientID written when de-identifying.")) -> None:
    """STOW-RS / C-STORE files (folders walked) to a PACS, optionally de-identified; exit 1 naming files not sent."""
    from medai.io.pacs import push_paths

    stored, refused = push_paths(url, paths, deidentify_secret=deidentify_secret, pseudonym=pseudonym,
                                 **_pacs_auth(user, password, token, insecure, ca_bundle, timeout))
    for path, reason in refused:
        console.print(f"[red]NOT SENT[/] {path}: {reason}")
    console.print(f"stored {stored} instance(s)" + (" (de-identified)" if deidentify_secret else ""))
    if refused:
        raise typer.Exit(1)
