"""Every benchmark script runs as `python benchmarks/X.py`: its imports resolve to the project's packages.

Run that way, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py would shadow
Hugging Face's `kernels` (which transformers imports); each script takes its folder off the path.
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
import kernels, medai.kernels.ops
assert hasattr(kernels, "get_kernel"), f"'kernels' resolved to {kernels.__file__}, not Hugging Face's package"
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


def test_hippocampus_report_reads_engine_runs_and_pairs_them(msd_hippocampus_path, tmp_path):
    """Two tiny Task04 engine runs -> the card's table: a row per model and the paired difference."""
    import json

    from medai.pipelines.finetune import finetune
    from medai.pipelines.train_config import load_train_config

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["hippocampus_001", "hippocampus_004"],
                                 "val": ["hippocampus_007", "hippocampus_008"]}))
    for model in ("dynunet_3d", "umamba_bot_3d"):
        finetune(load_train_config(f"{ROOT}/configs/hippocampus_{model}.yaml", [
            f"data.path={msd_hippocampus_path}", f"data.options.split_file={split}", f"output_dir={tmp_path}",
            f"run_name=hippocampus_{model}", "model.kwargs.features=[4, 8, 8]", "data.options.roi_size=[16, 16, 16]",
            "trainer.epochs=1", "trainer.time_budget_minutes=null", "trainer.n_boot=20"]))
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hippocampus_report.py"), "--runs", str(tmp_path),
                           "--out", str(out), "--plot", str(tmp_path / "loss.png")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "| DynUNet (baseline) | 2 | 1 |" in text and "| U-Mamba-Bot | 2 | 1 |" in text
    assert "- U-Mamba-Bot: " in text and "n = 2)" in text and "U-Mamba-Enc" not in text
    assert (tmp_path / "loss.png").stat().st_size > 5000
