"""A real Orthanc (with DICOMweb) on loopback in a temporary folder, for the `orthanc` tests."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    if not Path(ORTHANC).exists():
        return "Orthanc not installed (scripts/install_system_deps.sh)"
    if not DICOMWEB_PLUGIN.exists():
        return "orthanc-dicomweb plugin not installed (scripts/install_system_deps.sh)"
    return None


@dataclass
class OrthancServer:
    """A running Orthanc: its DICOMweb URL, REST URL, DICOM port/AE, and the process to stop."""

    process: subprocess.Popen
    http_port: int
    dicom_port: int
    aet: str
    folder: Path
    move_port: int
    move_aet: str

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.rest_url}/dicom-web"

    def stop(self) -> None:
        """Stop this Orthanc by its PID (SIGTERM, then SIGKILL after 10 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_orthanc(folder: Path, *, users: dict[str, str] | None = None) -> OrthancServer:
    """Start Orthanc on free loopback ports with storage in `folder`; basic auth when `users` is given."""
    import requests

    http_port, dicom_port, move_port = free_port(), free_port(), free_port()
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "medai-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        # Loopback only: Orthanc refuses remote HTTP clients when RemoteAccessAllowed is false.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        # Orthanc 1.10 cannot bind its DICOM port to loopback only, so only the registered modality
        # (AE MEDAI from 127.0.0.1) may store/find/move; anyone may C-ECHO (the ping test needs it).
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalities": {"medai": ["MEDAI", "127.0.0.1", move_port]},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full"},
        "HttpThreadsCount": 4,
        "ConcurrentJobs": 1,
        "StableAge": 1,
        "SaveJobs": False,
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    log = open(folder / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=folder,
                            start_new_session=True)
    server = OrthancServer(proc, http_port, dicom_port, "ORTHANC", folder, move_port, "MEDAI")
    auth = next(iter(users.items())) if users else None
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}: {(folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            r = requests.get(f"{server.rest_url}/system", auth=auth, timeout=1)
            if r.status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer within 30 s: {(folder / 'orthanc.log').read_text()[-2000:]}")
