"""Validation of written DICOM objects: highdicom parsing and, when installed, dciodvfy (dicom3tools)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from medai.errors import OptionalDependencyError


@dataclass
class ValidationReport:
    """dciodvfy's errors and warnings for one file."""

    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when dciodvfy reported no error."""
        return not self.errors


def dciodvfy(path: str | Path, timeout_s: float = 120.0) -> ValidationReport:
    """Run dciodvfy (Debian package dicom3tools) on a file and collect its Error/Warning lines."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise OptionalDependencyError("dicom3tools", "IOD validation with dciodvfy (apt-get install dicom3tools)")
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=timeout_s)
    report = ValidationReport(str(path))
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("Error"):
            report.errors.append(line)
        elif line.startswith("Warning"):
            report.warnings.append(line)
    return report
