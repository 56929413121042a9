"""One import root: medai's folders never shadow installed top-level packages (Hugging Face's `kernels`)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.metadata, kernels, medai.kernels.ops, medai.models, medai.pipelines.finetune
import sys
assert importlib.metadata.version("kernels"), "Hugging Face's kernels is not installed"
assert "site-packages" in kernels.__file__, kernels.__file__
assert hasattr(kernels, "get_kernel"), "top-level kernels is not Hugging Face's"
assert medai.kernels.ops.__file__.startswith(sys.argv[1]), medai.kernels.ops.__file__
print("ok", kernels.__file__, medai.kernels.ops.__file__)
"""


def test_hugging_face_kernels_and_medai_kernels_side_by_side_from_the_repository_root():
    # `python -c` from the root puts the root first on sys.path, where a kernels/__init__.py would win
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_transformers_imports_with_hugging_face_kernels_installed():
    out = subprocess.run([sys.executable, "-c", "import transformers, kernels; "
                          "from transformers import AutoModelForCausalLM; print(transformers.__version__)"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_only_medai_is_installed_at_top_level():
    from importlib import metadata

    top = metadata.distribution("medai").read_text("top_level.txt")
    # an editable install records no top_level.txt; the wheel test checks the built one
    if top is not None:
        assert top.split() == ["medai"]


def _layers() -> list[str]:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [name.strip() for layer in contract["layers"] for name in layer.replace("|", ":").split(":")]


def test_every_medai_module_sits_in_a_layer():
    """A module outside every layer escapes the contract: each top-level name under medai is placed."""
    names = {"medai." + p.stem for p in (ROOT / "medai").glob("*.py") if p.stem != "__init__"}
    names |= {"medai." + p.name for p in (ROOT / "medai").iterdir() if (p / "__init__.py").is_file()}
    names |= {"medai.models", "medai.kernels", "medai.pipelines"}
    assert names <= set(_layers()), sorted(names - set(_layers()))


def test_layer_contract_is_kept(tmp_path):
    """lint-imports on the wheel's layout: imports point down only (see pyproject's [tool.importlinter])."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint_imports.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:]


def test_layer_contract_catches_a_planted_upward_import(tmp_path, monkeypatch):
    """The check can fail: a model module importing a pipeline breaks the contract."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "scripts" / "lint_imports.py")
    lint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lint)
    package = lint.stage(tmp_path)
    with open(package / "models" / "resnet.py", "a") as f:
        f.write("\nimport medai.pipelines.finetune  # planted\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    exe = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(exe), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "medai.models.resnet -> medai.pipelines.finetune" in out.stdout
