"""Fixtures for I/O tests: a real Orthanc for the `orthanc`-marked tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import system_tool_missing
from tests.io.orthanc import OrthancServer, orthanc_available, start_orthanc


def start_test_orthanc(folder: Path, *, users: dict[str, str] | None = None) -> OrthancServer:
    """Start Orthanc for a test; without Orthanc or its DICOMweb plugin, fail under CI and skip elsewhere."""
    missing = orthanc_available()
    if missing:
        system_tool_missing(missing)
    return start_orthanc(folder, users=users)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A fresh Orthanc (DICOMweb + DIMSE) on loopback, stopped by its PID at the end."""
    server = start_test_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orthanc_with_auth(tmp_path_factory):
    """An Orthanc that requires HTTP basic auth (user medai / password secret)."""
    server = start_test_orthanc(tmp_path_factory.mktemp("orthanc-auth"), users={"medai": "secret"})
    yield server
    server.stop()
