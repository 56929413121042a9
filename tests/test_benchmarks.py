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


def test_mil_results_writes_a_section_per_set_and_keeps_the_others(mil_classic_path, tmp_path, monkeypatch):
    import runpy

    script = runpy.run_path(str(ROOT / "benchmarks" / "mil_results.py"), run_name="mil_results_under_test")
    main = script["main"]
    sections = tmp_path / "sections"
    sections.mkdir()
    (sections / "fox.md").write_text("### fox.mat (an earlier run)\n")
    (sections / "musk1.notes.md").write_text("Notes (Musk1): kept.\n")
    main.__globals__["SECTIONS"] = sections
    main.__globals__["SETS"]["musk1"] = ("mil_classic", "musk1/musk1.mat", 2, 1, True, 0.1, 1, {})
    monkeypatch.setattr(sys, "argv", ["mil_results.py", "--sets", "musk1", "--models", "abmil",
                                      "--out", str(tmp_path / "runs"), "--table", str(tmp_path / "table.md")])
    main()
    section = (sections / "musk1.md").read_text()
    assert "| abmil | 0 |" in section and "gated attention 0.900" in section and "--sets musk1" in section
    table = (tmp_path / "table.md").read_text()
    assert table.index("### musk1.mat") < table.index("Notes (Musk1): kept.") < table.index("### fox.mat (an earlier run)")
