"""One import root: medai's folders never shadow installed top-level packages (Hugging Face's `kernels`)."""

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
