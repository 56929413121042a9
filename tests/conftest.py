"""Shared fixtures: the real data root and per-dataset paths (skip only when truly absent), system tools."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

from medai.io.data import DATASETS, data_root

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


def system_tools_required() -> bool:
    """True under CI (CI set, not 0/false) or MEDAI_REQUIRE_SYSTEM_TOOLS=1: a missing system program fails."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("MEDAI_REQUIRE_SYSTEM_TOOLS") == "1"


def system_tool_missing(reason: str) -> NoReturn:
    """Fail (CI, MEDAI_REQUIRE_SYSTEM_TOOLS=1) or skip the test, saying what is missing and how to install it."""
    message = f"{reason}; install it with `make system-deps`"
    if system_tools_required():
        pytest.fail(f"{message} (required here: CI or MEDAI_REQUIRE_SYSTEM_TOOLS=1 is set)", pytrace=False)
    pytest.skip(message)


def require_system_tool(name: str) -> str:
    """Return the path of system program `name` (Orthanc, dciodvfy, ...); fail or skip when it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        system_tool_missing(f"system program '{name}' not found on PATH")
    return path
