import subprocess
import sys

from typer.testing import CliRunner

from medai.cli import app


def test_doctor_reports_versions_backends_and_data():
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for needle in ("torch", "MEDAI_KERNELS", "natten", "mamba_ssm", "flash_attn", "shared data", "Orthanc"):
        assert needle in result.output


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "medai.cli", "models", "list"], capture_output=True, text=True)
    assert out.returncode == 0 and "efficientnet_lite0" in out.stdout
