import subprocess
import sys

from typer.testing import CliRunner

from medai.cli import app


def test_doctor_reports_versions_backends_and_data():
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for needle in ("torch", "MEDAI_KERNELS", "natten", "mamba_ssm", "flash_attn", "shared data", "Orthanc",
                   "'kernels' is medai's package"):
        assert needle in result.output


def test_doctor_names_the_hugging_face_kernels_clash(monkeypatch):
    from importlib import metadata

    from medai.doctor import kernels_name_clash

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.19.1" if name == "kernels" else real(name))
    assert "Hugging Face's 'kernels' 0.19.1" in kernels_name_clash()


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
