"""Kernel tests run the Triton kernels through the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any kernel is decorated, i.e. before the kernel modules
are imported; a conftest is imported before the test modules of this directory.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """The device kernels run on: CUDA when present, else the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
