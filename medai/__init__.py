"""medai: medical multimodal AI pipeline (DICOM, WSI, EHR in; grounded model outputs out).

One import root. The product card keeps `models/`, `kernels/`, `pipelines/`, `checkpoints/`,
`configs/` and `data_cards/` at the repository root; they are the subpackages `medai.models`,
`medai.kernels`, `medai.pipelines`, `medai.checkpoints`, `medai.configs` and `medai.data_cards`:
- in a built wheel, setuptools' `package-dir` mapping (pyproject.toml) places them inside `medai/`;
- in a source checkout (editable install, or tests run from the root), the finder below maps each
  name onto its root folder, relative to this file, so a second worktree imports its own copy.
`kernels/` and `pipelines/` hold no `__init__.py`: the root folder is then only a namespace portion,
so Python started in the checkout still imports Hugging Face's top-level `kernels`, not medai's.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"

# subpackage name -> folder beside medai/ in a source checkout
_CARD_FOLDERS = ("models", "kernels", "pipelines", "checkpoints", "configs", "data_cards")


class _CheckoutLayoutFinder:
    """Map `medai.<folder>` onto `<checkout>/<folder>` when medai runs from its source tree."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001 (importlib protocol)
        """Return the spec of `medai.<card folder>` from the checkout, else None."""
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in _CARD_FOLDERS:
            return None
        # Python's own path finder, pointed at the checkout root: a folder with `__init__.py` becomes a
        # regular package, one without a namespace package that importlib.resources can read.
        return importlib.machinery.PathFinder.find_spec(fullname, [str(self.root)])


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
