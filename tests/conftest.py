"""Shared fixtures: the real data root and per-dataset paths (skip only when truly absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medai.data import DATASETS, data_root

# Tests run on 2 cores; more threads only thrash.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data root; skips with the path when it is not there (CI always has it)."""
    root = data_root()
    if not (root / "SHA256SUMS").is_file():
        pytest.skip(f"shared data absent at {root} (set MEDAI_DATA)")
    return root


def dataset_fixture(name: str):
    """Build a fixture returning the path of dataset `name` under the shared root."""

    @pytest.fixture(scope="session", name=f"{name}_path")
    def _fixture(shared_data: Path) -> Path:
        path = shared_data / DATASETS[name]
        if not path.exists():
            pytest.skip(f"dataset '{name}' absent at {path}")
        return path

    return _fixture


for _name in DATASETS:
    globals()[f"_fixture_{_name}"] = dataset_fixture(_name)
