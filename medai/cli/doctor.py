"""`medai doctor`: the preflight report (versions, devices, kernel backends, optional peers, data, binaries)."""

from __future__ import annotations

import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medai.utils import is_installed

console = Console()

OPTIONAL_PEERS = {
    "triton": "Triton kernels (CUDA, or CPU interpreter)",
    "natten": "NATTEN neighborhood attention (CUDA peer for tests)",
    "mamba_ssm": "mamba-ssm selective scan (CUDA)",
    "flash_attn": "FlashAttention (CUDA)",
    "monai": "MONAI transforms and metrics",
    "pydicom": "DICOM reading",
    "highdicom": "DICOM SEG/SR writing",
    "openslide": "OpenSlide WSI reader",
    "tiffslide": "tiffslide WSI reader",
    "wsidicom": "DICOM WSI reader",
    "transformers": "language models for the VLM head",
    "accelerate": "distributed fine-tuning",
    "gradio": "clinical demo app",
}

ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")


@dataclass
class Check:
    """One line of the doctor's report."""

    section: str
    name: str
    ok: bool
    detail: str


@dataclass
class DoctorReport:
    """All checks, with the ones that need attention."""

    checks: list[Check] = field(default_factory=list)

    def add(self, section: str, name: str, ok: bool, detail: str) -> None:
        """Append one check."""
        self.checks.append(Check(section, name, ok, detail))

    @property
    def missing(self) -> list[Check]:
        """Checks that failed."""
        return [c for c in self.checks if not c.ok]


def orthanc_dicomweb_plugin() -> Path | None:
    """Return the Orthanc DICOMweb plugin library, if installed."""
    for folder in ORTHANC_PLUGIN_DIRS:
        for lib in Path(folder).glob("libOrthancDicomWeb*.so*"):
            return lib
    return None


def run_doctor() -> DoctorReport:
    """Collect the preflight report (imports torch; takes a second or two)."""
    import torch

    from medai.kernels.dispatch import kernel_mode, triton_interpreting
    from medai.kernels.ops import backend_report
    from medai.io.data import data_root
    from medai.models.pretrained import packaged_weights

    r = DoctorReport()
    r.add("system", "python", True, f"{sys.version.split()[0]} on {platform.machine()}")
    r.add("system", "torch", True, torch.__version__)
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    r.add("system", "devices", True, "cpu" + "".join(f", cuda:{i} {n}" for i, n in enumerate(devices)))
    mode = f"MEDAI_KERNELS={kernel_mode()}, TRITON_INTERPRET={'1' if triton_interpreting() else '0'}"
    r.add("kernels", "mode", True, mode)
    import medai.kernels

    r.add("kernels", "package", True, f"medai.kernels at {list(medai.kernels.__path__)[0]}")
    for device in ["cpu"] + (["cuda"] if cuda else []):
        for op, backend in backend_report(device).items():
            r.add("kernels", f"{op} [{device}]", not backend.startswith("unavailable"), backend)
    for module, purpose in OPTIONAL_PEERS.items():
        r.add("packages", module, is_installed(module), purpose if is_installed(module) else f"not installed ({purpose})")
    for key, weights in packaged_weights().items():
        if not weights.available():
            r.add("weights", key, False, f"package missing: {weights.install_hint}")
        else:
            state = "converted" if weights.cached().exists() else "packaged (converted on first use)"
            r.add("weights", key, True, f"{state}: {weights.cached()}")
    root = data_root()
    has_data = (root / "SHA256SUMS").is_file()
    r.add("data", "shared data", has_data, str(root) if has_data else f"absent at {root} (set MEDAI_DATA)")
    for binary, purpose in (("Orthanc", "PACS for tests"), ("storescu", "dcmtk"), ("chromium", "browser tests")):
        found = shutil.which(binary)
        r.add("binaries", binary, bool(found), found or f"not found ({purpose}; `make system-deps`)")
    plugin = orthanc_dicomweb_plugin()
    r.add("binaries", "orthanc-dicomweb", plugin is not None, str(plugin) if plugin else "DICOMweb plugin not found")
    return r


def doctor() -> None:
    """Print a preflight report: versions, devices, kernel backends, peers, data, binaries."""
    report = run_doctor()
    table = Table(title="medai doctor", show_lines=False)
    for col in ("section", "check", "", "detail"):
        table.add_column(col)
    for c in report.checks:
        table.add_row(c.section, c.name, "[green]ok[/]" if c.ok else "[yellow]--[/]", c.detail)
    console.print(table)
    if report.missing:
        console.print(f"{len(report.missing)} item(s) missing: " + ", ".join(c.name for c in report.missing))
