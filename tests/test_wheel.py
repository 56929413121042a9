"""A built wheel works outside the checkout: one top-level package, shipped checkpoints and configs found."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Loads the two shipped checkpoints through the registry and scores the BreastMNIST one on a few
# test images, so a wheel that lost its checkpoints (or found the checkout's) fails here.
PROBE = """
import sys
from pathlib import Path
import numpy as np, torch
import medai, medai.models
from medai.models.registry import create_model
here = Path(medai.__file__).resolve().parent
assert str(here).startswith(sys.argv[1]), f"medai imported from {here}, not the wheel's venv"
assert (here / "models").is_dir() and (here / "checkpoints").is_dir(), sorted(p.name for p in here.iterdir())
medvit = create_model("medvit_tiny", pretrained="breastmnist", num_classes=2, in_chans=1).eval()
data = np.load(sys.argv[2])
x = torch.from_numpy(data["test_images"][:32]).float().div(255).sub(0.5).div(0.5).unsqueeze(1)
with torch.no_grad():
    accuracy = (medvit(x).argmax(-1).numpy() == data["test_labels"][:32, 0]).mean()
assert accuracy > 0.6, accuracy
umamba = create_model("umamba_bot_3d", pretrained="msd_hippocampus", features=(16, 32, 64, 128)).eval()
with torch.no_grad():
    assert umamba(torch.zeros(1, 1, 32, 48, 32)).shape[1] == 3
print("ok", here, accuracy)
"""


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """Build medai's wheel and install it (not editable) into a fresh venv; return (venv, wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the files git would commit: setuptools writes build/ and *.egg-info into the
    # source folder and reuses build/lib, so a module deleted since would come back in a later wheel.
    source = tmp / "source"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp),
                    str(source)], check=True, capture_output=True, cwd=tmp)
    wheel = next(tmp.glob("medai-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, cwd=tmp)
    # medai's dependencies (torch, ...) come from this venv's site-packages, appended after the new
    # venv's own: a path listed in a .pth file has its own .pth files ignored, so the editable
    # install's finder there stays inactive and `medai` is the wheel's.
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()] + [sysconfig.get_paths()["purelib"]]
    (purelib / "medai_test_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    return venv, wheel


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["COLUMNS"] = "400"  # rich would wrap the paths in doctor's table
    env["MEDAI_DATA"] = os.environ.get("MEDAI_DATA", str(ROOT.parent / "shared" / "data"))
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_wheel_holds_only_the_medai_package(wheel_venv):
    _, wheel = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"medai"}, top
    for shipped in ("medai/checkpoints/breastmnist/medvit_tiny_f16.safetensors",
                    "medai/checkpoints/msd_hippocampus/umamba_bot_3d_f16.safetensors",
                    "medai/configs/breastmnist_medvit_tiny.yaml", "medai/data_cards/checkpoints/medvit.md",
                    "medai/kernels/ops.py",
                    "medai/models/registry.py", "medai/pipelines/finetune.py", "medai/cli/__init__.py"):
        assert shipped in names, shipped


def test_installed_wheel_runs_doctor_lists_models_and_loads_shipped_checkpoints(wheel_venv, tmp_path, breastmnist_path):
    venv, _ = wheel_venv
    bin_ = venv / "bin"
    doctor = _run(venv, str(bin_ / "medai"), "doctor", cwd=tmp_path)
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    assert f"medai.kernels at {venv}" in doctor.stdout, doctor.stdout
    listing = _run(venv, str(bin_ / "medai"), "models", "list", cwd=tmp_path)
    assert listing.returncode == 0 and "medvit_tiny" in listing.stdout and "umamba_bot_3d" in listing.stdout, listing.stderr
    probe = _run(venv, str(bin_ / "python"), "-c", PROBE, str(venv), str(breastmnist_path), cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.startswith("ok")
