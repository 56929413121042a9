import subprocess
import sys

from typer.testing import CliRunner

from medai.cli import app


def test_doctor_reports_versions_backends_and_data():
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for needle in ("torch", "MEDAI_KERNELS", "natten", "mamba_ssm", "flash_attn", "shared data", "Orthanc",
                   "medai.kernels at"):
        assert needle in result.output


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "medai.cli", "models", "list"], capture_output=True, text=True)
    assert out.returncode == 0 and "efficientnet_lite0" in out.stdout


def test_bad_config_is_one_clear_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: classification\nmodel: {name: resnet10t}\ndata: {path: /nowhere.npz}\ntrainer: {epohcs: 2}\n")
    out = subprocess.run([sys.executable, "-m", "medai.cli", "finetune", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: key 'trainer.epohcs': unknown key")
    assert "Traceback" not in out.stderr + out.stdout
