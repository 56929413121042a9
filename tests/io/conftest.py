"""Fixtures for I/O tests: a real Orthanc for the `orthanc`-marked tests."""

from __future__ import annotations

import pytest

from tests.io.orthanc import orthanc_available, start_orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A fresh Orthanc (DICOMweb + DIMSE) on loopback, stopped by its PID at the end."""
    missing = orthanc_available()
    if missing:
        pytest.skip(missing)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orthanc_with_auth(tmp_path_factory):
    """An Orthanc that requires HTTP basic auth (user medai / password secret)."""
    missing = orthanc_available()
    if missing:
        pytest.skip(missing)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc-auth"), users={"medai": "secret"})
    yield server
    server.stop()
