"""PACS access: DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) and DIMSE (C-ECHO/FIND/MOVE/STORE).

`ping(url)` checks a connection and says what is wrong (URL, nothing listening, TLS, auth, AE title),
because connection trouble is the first thing PACS users hit. URLs:
- ``http(s)://host:port/dicom-web`` — a DICOMweb root (Orthanc: ``/dicom-web``, DCM4CHEE: ``/dcm4chee-arc/aets/DCM4CHEE/rs``)
- ``dicom://CALLED_AE@host:port`` — a DIMSE peer (C-ECHO), for sites without DICOMweb.
Errors are PacsError naming the server (never credentials, never patient identifiers).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlparse, urlunparse

from medai.errors import PacsError
from medai.utils import optional_import

log = logging.getLogger(__name__)

# QIDO attribute keyword -> tag, for turning DICOM JSON into flat dicts.
_STUDY_FIELDS = {
    "StudyInstanceUID": "0020000D",
    "PatientID": "00100020",
    "StudyDate": "00080020",
    "StudyDescription": "00081030",
    "AccessionNumber": "00080050",
    "ModalitiesInStudy": "00080061",
    "NumberOfStudyRelatedSeries": "00201206",
    "NumberOfStudyRelatedInstances": "00201208",
}
_SERIES_FIELDS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "Modality": "00080060",
    "SeriesDescription": "0008103E",
    "SeriesNumber": "00200011",
    "NumberOfSeriesRelatedInstances": "00201209",
}


def _redact(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urlparse(url)
    if parts.username or parts.password:
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunparse(parts)


def _flatten(item: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    out = {}
    for keyword, tag in fields.items():
        values = item.get(tag, {}).get("Value")
        if not values:
            out[keyword] = None
        elif isinstance(values[0], dict) and "Alphabetic" in values[0]:
            out[keyword] = values[0]["Alphabetic"]
        else:
            out[keyword] = values if len(values) > 1 else values[0]
    return out


@dataclass
class PingResult:
    """Outcome of a connection check: ok, what was tried, and what to fix when it failed."""

    ok: bool
    url: str
    protocol: str
    detail: str


class DicomWebPacs:
    """A DICOMweb server: QIDO-RS searches, WADO-RS retrieval to files, STOW-RS stores."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        verify_tls: bool | str = True,
        timeout_s: float = 30.0,
    ):
        dicomweb_client = optional_import("dicomweb_client", "DICOMweb access", extra="dicom")
        requests = optional_import("requests", "DICOMweb access", extra="dicom")
        parts = urlparse(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(url, "not an http(s) DICOMweb URL (expected e.g. http://host:8042/dicom-web)")
        if parts.username and username is None:
            username, password = parts.username, parts.password or ""
        self.url = _redact(url).rstrip("/")
        session = requests.Session()
        session.verify = verify_tls
        adapter = _timeout_adapter(requests, timeout_s)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if username is not None:
            session.auth = (username, password or "")
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        self._session = session
        self.timeout_s = timeout_s
        try:
            # newer dicomweb-client sends its own timeout (20 s) on every request, which the adapter can't override
            self._client = dicomweb_client.DICOMwebClient(url=self.url, session=session, timeout=timeout_s)
        except TypeError:  # older releases take no timeout: the adapter's default applies
            self._client = dicomweb_client.DICOMwebClient(url=self.url, session=session)
        # dicomweb-client retries every failure 5 times with exponential back-off (a silent server cost
        # 130 s at a 2 s timeout); one retry, soon, keeps a 503 recoverable and bounds a dead server
        # at about twice the timeout.
        self._client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=250)

    def _call(self, what: str, fn, *args, **kwargs):
        """Run a client call and turn transport/HTTP failures into PacsError with the cause."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # requests and dicomweb_client raise many types
            raise PacsError(self.url, f"{what} failed: {explain_http_error(exc)}") from exc

    def search_studies(self, **filters: Any) -> list[dict[str, Any]]:
        """QIDO-RS study search (filters are DICOM keywords, e.g. PatientID='X', ModalitiesInStudy='MR')."""
        found = self._call("QIDO-RS study search", self._client.search_for_studies, search_filters=filters or None)
        return [_flatten(item, _STUDY_FIELDS) for item in found]

    def search_series(self, study_uid: str | None = None, **filters: Any) -> list[dict[str, Any]]:
        """QIDO-RS series search, optionally within one study."""
        found = self._call(
            "QIDO-RS series search",
            self._client.search_for_series,
            study_instance_uid=study_uid,
            search_filters=filters or None,
        )
        return [_flatten(item, _SERIES_FIELDS) for item in found]

    def retrieve_series(self, study_uid: str, series_uid: str, dest: str | Path) -> list[Path]:
        """WADO-RS retrieve of a whole series, written as Part 10 files named by SOP Instance UID."""
        datasets = self._call(
            "WADO-RS series retrieve",
            self._client.retrieve_series,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
        )
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in datasets:
            path = dest / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        log.info("retrieved %d instances into %s", len(paths), dest)
        return paths

    def store(self, items: Iterable[str | Path | Any]) -> int:
        """STOW-RS store of files or pydicom datasets; returns how many were stored, raises on any failure."""
        import pydicom

        datasets = [pydicom.dcmread(i) if isinstance(i, (str, Path)) else i for i in items]
        if not datasets:
            return 0
        response = self._call("STOW-RS store", self._client.store_instances, datasets=datasets)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(f.get("FailureReason", "?")) for f in failed})
            raise PacsError(self.url, f"STOW-RS refused {len(failed)} of {len(datasets)} instance(s) (failure reasons {reasons})")
        return len(datasets)

    def ping(self) -> PingResult:
        """QIDO-RS query with limit 1: checks URL, TLS, auth and that DICOMweb answers."""
        # One plain request: dicomweb-client retries failed connections with back-off (~30 s).
        try:
            response = self._session.get(f"{self.url}/studies", params={"limit": 1},
                                         headers={"Accept": "application/dicom+json"})
            response.raise_for_status()
        except Exception as exc:
            return PingResult(False, self.url, "dicomweb", explain_http_error(exc))
        if response.status_code == 204 or response.headers.get("Content-Type", "").startswith("application/dicom+json"):
            return PingResult(True, self.url, "dicomweb", "QIDO-RS answered")
        return PingResult(False, self.url, "dicomweb", f"answered HTTP {response.status_code} with "
                          f"'{response.headers.get('Content-Type', '?')}', not DICOM JSON: is this the DICOMweb root?")


def _timeout_adapter(requests, timeout_s: float):
    """An HTTPAdapter that applies a default timeout (dicomweb-client passes none, so a dead host would hang)."""

    class _TimeoutAdapter(requests.adapters.HTTPAdapter):
        def send(self, request, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout_s
            return super().send(request, **kwargs)

    return _TimeoutAdapter()


def explain_http_error(exc: BaseException) -> str:
    """A sentence saying what is wrong with an HTTP(S) PACS connection and what to check."""
    requests = optional_import("requests", "DICOMweb access", extra="dicom")
    if isinstance(exc, requests.exceptions.SSLError):
        if "wrong version number" in str(exc).lower():
            return "TLS handshake failed: this port speaks plain HTTP, not HTTPS (use http://)"
        return (
            "TLS failed (certificate not trusted, expired, or wrong host name): check the certificate, pass the "
            "site CA bundle (verify_tls=/path/ca.pem, --ca-bundle) or, for testing only, --insecure"
        )
    if isinstance(exc, requests.exceptions.ConnectTimeout) or isinstance(exc, requests.exceptions.ReadTimeout):
        return "timed out: the host does not answer on this port (firewall, VPN, wrong port?)"
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc)
        if "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text.lower():
            return "host name does not resolve (typo in the URL or DNS/VPN missing)"
        if "refused" in text.lower():
            return "connection refused: nothing listens at this host and port (server down or wrong port)"
        if "RemoteDisconnected" in text or "BadStatusLine" in text:
            return "server closed the connection (speaking https to an http port, or the reverse?)"
        return f"cannot connect ({type(exc).__name__})"
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status == 401:
        return "HTTP 401: authentication required or wrong credentials (--user/--password or --token)"
    if status == 403:
        return "HTTP 403: the credentials are valid but not allowed to do this"
    if status == 404:
        return "HTTP 404: the server answered but there is no DICOMweb service at this path (check the root, e.g. /dicom-web)"
    if status is not None:
        return f"HTTP {status}: {getattr(response, 'reason', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# DIMSE (pynetdicom)
# --------------------------------------------------------------------------------------------


def _pynetdicom():
    return optional_import("pynetdicom", "DIMSE networking (C-ECHO/FIND/MOVE/STORE)", extra="dicom")


@dataclass
class DimsePacs:
    """A DIMSE peer (host, port, called AE title) reached as `calling_ae`."""

    host: str
    port: int
    called_ae: str = "ANY-SCP"
    calling_ae: str = "MEDAI"
    timeout_s: float = 30.0
    _label: str = field(init=False, default="")

    def __post_init__(self):
        self._label = f"dicom://{self.called_ae}@{self.host}:{self.port}"

    def _check_reachable(self) -> None:
        """Raise PacsError when nothing accepts a TCP connection: pynetdicom reports that as an aborted association."""
        import socket

        try:
            socket.create_connection((self.host, self.port), timeout=self.timeout_s).close()
        except ConnectionRefusedError:
            raise PacsError(self._label, f"connection refused: nothing listens on {self.host}:{self.port} "
                                         "(is the PACS running, and is this its DICOM port?)") from None
        except (socket.timeout, TimeoutError):
            raise PacsError(self._label, f"no answer from {self.host}:{self.port} within {self.timeout_s:g} s "
                                         "(host down, firewall, VPN?)") from None
        except OSError as exc:
            raise PacsError(self._label, f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None

    def _associate(self, contexts: Sequence[str], ae=None):
        self._check_reachable()
        pynetdicom = _pynetdicom()
        ae = ae or pynetdicom.AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for ctx in contexts:
            ae.add_requested_context(ctx)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            raise PacsError(self._label, _explain_association(assoc))
        return assoc

    def echo(self) -> PingResult:
        """C-ECHO: checks host, port and that the peer accepts our AE titles."""
        try:
            assoc = self._associate(["1.2.840.10008.1.1"])
        except PacsError as exc:
            return PingResult(False, self._label, "dimse", exc.reason)
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        if _status_code(status) == 0:
            return PingResult(True, self._label, "dimse", "C-ECHO succeeded")
        return PingResult(False, self._label, "dimse", f"C-ECHO returned status {_status_code(status)}")

    def find(self, level: str = "STUDY", **keys: Any) -> list[dict[str, Any]]:
        """C-FIND (Study Root) at STUDY/SERIES/IMAGE level; keys are DICOM keywords ('' returns the field)."""
        from pydicom import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        query = Dataset()
        query.QueryRetrieveLevel = level
        defaults = {"STUDY": ["StudyInstanceUID", "PatientID", "StudyDate", "StudyDescription", "ModalitiesInStudy"],
                    "SERIES": ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber"],
                    "IMAGE": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber"]}[level]
        for k in defaults:
            setattr(query, k, "")
        for k, v in keys.items():
            setattr(query, k, v)
        assoc = self._associate([StudyRootQueryRetrieveInformationModelFind])
        out = []
        try:
            for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = _status_code(status)
                if code is None:
                    raise PacsError(self._label, "C-FIND: no status (association aborted: is this AE allowed to query?)")
                if code in (0xFF00, 0xFF01) and ident is not None:
                    out.append({e.keyword: (str(e.value) if e.VR not in ("IS", "US") else e.value) for e in ident if e.keyword})
                elif code not in (0x0000, 0xFF00, 0xFF01):
                    raise PacsError(self._label, f"C-FIND failed with status 0x{code:04X}")
        finally:
            assoc.release()
        return out

    def store(self, paths: Iterable[str | Path]) -> int:
        """C-STORE each file; returns how many succeeded, raises PacsError naming the first failure."""
        import pydicom

        datasets = [(Path(p), pydicom.dcmread(p)) for p in paths]
        if not datasets:
            return 0
        pynetdicom = _pynetdicom()
        ae = pynetdicom.AE(ae_title=self.calling_ae)
        for sop in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}):
            ae.add_requested_context(sop[0], [sop[1], "1.2.840.10008.1.2.1"])
        assoc = self._associate([], ae=ae)
        stored = 0
        try:
            for path, ds in datasets:
                code = _status_code(assoc.send_c_store(ds))
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    reason = "no status: association aborted (is this AE allowed to store?)" if code is None else f"status 0x{code:04X}"
                    raise PacsError(self._label, f"C-STORE of {path} failed ({reason})")
                stored += 1
        finally:
            assoc.release()
        return stored

    def move_series(self, study_uid: str, series_uid: str, dest: str | Path, *, port: int, ae_title: str | None = None) -> list[Path]:
        """C-MOVE a series to a temporary storage SCP on `port` (the peer must know our AE title -> host:port)."""
        from pynetdicom import evt
        from pynetdicom.presentation import AllStoragePresentationContexts
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove
        from pydicom import Dataset

        pynetdicom = _pynetdicom()
        ae_title = ae_title or self.calling_ae
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        received: list[Path] = []
        lock = threading.Lock()

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            path = dest / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            with lock:
                received.append(path)
            return 0x0000

        scp_ae = pynetdicom.AE(ae_title=ae_title)
        scp_ae.supported_contexts = AllStoragePresentationContexts
        server = scp_ae.start_server(("127.0.0.1" if self.host in ("127.0.0.1", "localhost") else "", port), block=False,
                                     evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = series_uid
            assoc = self._associate([StudyRootQueryRetrieveInformationModelMove])
            try:
                final = None
                for status, _ in assoc.send_c_move(query, ae_title, StudyRootQueryRetrieveInformationModelMove):
                    final = _status_code(status)
                    if final is None:
                        raise PacsError(self._label, "C-MOVE: no status (association aborted: is this AE allowed to move?)")
                if final not in (0x0000, None):
                    raise PacsError(
                        self._label,
                        f"C-MOVE ended with status 0x{final:04X} (is '{ae_title}' known to the peer as this host, port {port}?)",
                    )
            finally:
                assoc.release()
        finally:
            server.shutdown()
        return sorted(received)


def _status_code(status) -> int | None:
    """The DIMSE status value, or None when the peer sent none (pynetdicom returns an empty Dataset on abort)."""
    return int(status.Status) if status is not None and "Status" in status else None


def _explain_association(assoc) -> str:
    """Why an association failed, in words a site engineer can act on."""
    if assoc.is_rejected:
        return "association rejected: the peer does not accept this called/calling AE title pair (check both AE titles and the peer's allow-list)"
    if assoc.is_aborted:
        return "association aborted by the peer (AE title not allowed, or no common presentation context)"
    return "no association: connection refused or timed out (host, port, firewall)"


def parse_dimse_url(url: str) -> DimsePacs:
    """Parse dicom://CALLED_AE@host:port[?calling=MEDAI] into a DimsePacs."""
    parts = urlparse(url)
    if parts.scheme != "dicom" or not parts.hostname or not parts.port:
        raise PacsError(url, "not a DIMSE URL (expected dicom://CALLED_AE@host:port)")
    calling = "MEDAI"
    for pair in parts.query.split("&"):
        if pair.startswith("calling="):
            calling = pair.split("=", 1)[1]
    return DimsePacs(parts.hostname, parts.port, called_ae=parts.username or "ANY-SCP", calling_ae=calling)


def ping(url: str, *, username: str | None = None, password: str | None = None, token: str | None = None,
         verify_tls: bool | str = True, timeout_s: float = 10.0) -> PingResult:
    """Check a PACS connection (DICOMweb QIDO for http(s) URLs, C-ECHO for dicom:// URLs) and explain failures."""
    scheme = urlparse(url).scheme
    if scheme == "dicom":
        peer = parse_dimse_url(url)
        peer.timeout_s = timeout_s
        return peer.echo()
    if scheme in ("http", "https"):
        try:
            client = DicomWebPacs(url, username=username, password=password, token=token, verify_tls=verify_tls, timeout_s=timeout_s)
        except PacsError as exc:
            return PingResult(False, _redact(url), "dicomweb", exc.reason)
        return client.ping()
    return PingResult(False, url, "?", "unknown URL scheme: use http(s)://host:port/dicom-web or dicom://AE@host:port")


def pull_series(url: str, study_uid: str, series_uid: str, dest: str | Path, **auth: Any) -> list[Path]:
    """Retrieve one series from a DICOMweb server into dest (files named by SOP Instance UID)."""
    return DicomWebPacs(url, **auth).retrieve_series(study_uid, series_uid, dest)


def push_files(url: str, paths: Iterable[str | Path], **auth: Any) -> int:
    """Store files on a DICOMweb (STOW-RS) or DIMSE (C-STORE) server; returns how many were stored."""
    if urlparse(url).scheme == "dicom":
        return parse_dimse_url(url).store(paths)
    return DicomWebPacs(url, **auth).store(paths)


def push_paths(url: str, paths: Iterable[str | Path], *, deidentify_secret: str | None = None,
               pseudonym: str = "ANON", **auth: Any) -> tuple[int, list[tuple[str, str]]]:
    """Store files (folders walked) on a PACS, de-identified on the way out when `deidentify_secret` is given.

    Returns how many instances were stored and the (path, reason) of each file not sent.
    """
    import tempfile

    from medai.io.deidentify import deidentify_files
    from medai.io.dicom import iter_files

    files: list[Path] = [f for p in paths for f in iter_files(p)]
    refused: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="medai-deid-") as staging:
        if deidentify_secret:
            files, refused = deidentify_files(files, staging, secret=deidentify_secret, pseudonym=pseudonym)
        return push_files(url, files, **auth), refused

