"""Every benchmark script runs as `python benchmarks/X.py`: its imports resolve to the project's packages.

Run that way, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py would shadow
the `kernels` package; each script must put the repository root before it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))

# Load the script's top level (imports, path set-up) as `python benchmarks/X.py` would, without running main().
PROBE = """
import runpy, sys
sys.path.insert(0, sys.argv[2])  # what the interpreter does for a script: its folder first
runpy.run_path(sys.argv[1], run_name="benchmark_import_probe")
import kernels, kernels.ops
assert hasattr(kernels, "__path__"), f"'kernels' resolved to {kernels.__file__}, not the package"
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_imports_resolve_to_the_project(script):
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "benchmarks" / script), str(ROOT / "benchmarks")],
                         capture_output=True, text=True, cwd=ROOT / "benchmarks", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
