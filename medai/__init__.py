"""medai: medical multimodal AI pipeline (DICOM, WSI, EHR in; grounded model outputs out).

One import root. The product card keeps `models/`, `kernels/`, `pipelines/`, `checkpoints/` and
`configs/` at the repository root; they are the subpackages `medai.models`, `medai.kernels`,
`medai.pipelines`, `medai.checkpoints` and `medai.configs`:
- in a built wheel, setuptools' `package-dir` mapping (pyproject.toml) places them inside `medai/`;
- in a source checkout (editable install, or tests run from the root), the finder below maps each
  name onto its root folder, relative to this file, so a second worktree imports its own copy.
`kernels/` and `pipelines/` hold no `__init__.py`: the root folder is then only a namespace portion,
so Python started in the checkout still imports Hugging Face's top-level `kernels`, not medai's.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

# subpackage name -> folder beside medai/ in a source checkout
_CARD_FOLDERS = ("models", "kernels", "pipelines", "checkpoints", "configs")


class _CheckoutLayoutFinder:
    """Map `medai.<folder>` onto `<checkout>/<folder>` when medai runs from its source tree."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001 (importlib protocol)
        """Return the spec of `medai.<card folder>` from the checkout, else None."""
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in _CARD_FOLDERS:
            return None
        folder = self.root / name
        init = folder / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(folder)])
        if folder.is_dir():
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = [str(folder)]
            return spec
        return None


def _install_checkout_finder() -> None:
    here = Path(__file__).resolve().parent
    if (here / "models").is_dir():
        return  # installed wheel: the folders are inside the package already
    root = here.parent
    if not (root / "pyproject.toml").is_file() or not (root / "models").is_dir():
        return
    if not any(isinstance(f, _CheckoutLayoutFinder) and f.root == root for f in sys.meta_path):
        # first, so an editable install's own finder (which may point at another worktree) never wins
        sys.meta_path.insert(0, _CheckoutLayoutFinder(root))


_install_checkout_finder()
