"""Check medai's import layers (pyproject's [tool.importlinter]) on the layout a wheel installs.

import-linter finds a package's modules by walking its folder, and the product card keeps
models/, kernels/ and pipelines/ beside medai/ rather than inside it; so the Python files are copied
into a temporary `medai/` tree laid out as the wheel lays them out, and lint-imports runs there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"medai": "medai", "models": "medai/models", "kernels": "medai/kernels", "pipelines": "medai/pipelines"}


def stage(dest: Path) -> Path:
    """Copy medai's Python sources into `dest` in the wheel's layout; return the package folder."""
    for src, target in FOLDERS.items():
        for path in (ROOT / src).rglob("*.py"):
            out = dest / target / path.relative_to(ROOT / src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)
    for folder in (dest / "medai").rglob("*"):
        # namespace folders (kernels/, pipelines/) become plain packages, which the graph builder walks
        if folder.is_dir() and folder.name != "__pycache__" and not (folder / "__init__.py").exists():
            (folder / "__init__.py").touch()
    return dest / "medai"


def main() -> int:
    """Run lint-imports on the staged tree; return its exit code."""
    with tempfile.TemporaryDirectory(prefix="medai-layers-") as tmp:
        stage(Path(tmp))
        env = dict(os.environ, PYTHONPATH=tmp)
        exe = Path(sys.executable).with_name("lint-imports")
        cmd = [str(exe) if exe.exists() else "lint-imports", str(ROOT / "pyproject.toml"), "--no-cache"]
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
