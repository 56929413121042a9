"""Choose, per call, between an op's Triton kernel and its PyTorch reference.

Rules (MEDAI_KERNELS = auto | triton | reference, default auto):
- auto: on CUDA tensors an op's installed third-party peer kernel when it has one (mamba-ssm's
  fused scan), else the Triton kernel when Triton imports; the reference elsewhere;
- triton: the Triton kernel on any device; on CPU this needs TRITON_INTERPRET=1 set before
  the kernel modules are imported (that is how CPU tests exercise kernels);
- reference: always the PyTorch reference.

Ops are registered by `kernels/ops.py`, which imports this module; this module never imports the
ops, so the dependency runs one way (ops -> dispatch).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from medai.errors import MedaiError
from medai.registry import Registry

Backend = Literal["triton", "reference", "peer"]
MODES = ("auto", "triton", "reference")


class KernelUnavailableError(MedaiError, RuntimeError):
    """The forced backend cannot run this op on this device; says why and what to set."""


@dataclass(frozen=True)
class KernelOp:
    """One op: a reference, an optional Triton kernel and an optional CUDA peer, as 'module:function' paths.

    The peer is another project's fused CUDA kernel with the same call signature (mamba-ssm's
    `selective_scan_fn`); auto mode prefers it on CUDA when its package is installed.
    """

    name: str
    reference: str
    triton: str | None = None
    peer: str | None = None

    def load(self, backend: Backend) -> Callable:
        """Import and return the implementation for `backend`."""
        target = {"reference": self.reference, "triton": self.triton, "peer": self.peer}[backend]
        if target is None:
            raise KernelUnavailableError(f"op '{self.name}' has no {backend} implementation")
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)


OPS: Registry[KernelOp] = Registry("kernel op")


def register_op(name: str, reference: str, triton: str | None = None, peer: str | None = None) -> KernelOp:
    """Register an op by the import paths of its implementations."""
    return OPS.add(name, KernelOp(name, reference, triton, peer))


def kernel_mode() -> str:
    """Return the MEDAI_KERNELS setting, validated."""
    mode = os.environ.get("MEDAI_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise KernelUnavailableError(f"MEDAI_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    return mode


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the triton package imports."""
    try:
        importlib.import_module("triton")
    except Exception:  # triton raises more than ImportError on machines without a driver
        return False
    return True


def peer_installed(op: KernelOp) -> bool:
    """True when the op has a peer kernel and its top-level package is installed (not imported here)."""
    if op.peer is None:
        return False
    return importlib.util.find_spec(op.peer.partition(":")[0].split(".")[0]) is not None


def select_backend(op_name: str, device: torch.device | str) -> Backend:
    """Return which implementation of `op_name` runs for tensors on `device` under the current setting."""
    op = OPS.get(op_name)
    device = torch.device(device)
    mode = kernel_mode()
    if mode == "reference":
        return "reference"
    if mode == "triton":
        if op.triton is None:
            raise KernelUnavailableError(f"MEDAI_KERNELS=triton but op '{op_name}' has no Triton kernel yet")
        if not triton_available():
            raise KernelUnavailableError("MEDAI_KERNELS=triton but the triton package does not import")
        if device.type != "cuda" and not triton_interpreting():
            raise KernelUnavailableError(
                f"MEDAI_KERNELS=triton on a {device.type} tensor needs TRITON_INTERPRET=1 "
                "(set before medai's kernels are imported)"
            )
        return "triton"
    if device.type == "cuda" and peer_installed(op):
        return "peer"
    if device.type == "cuda" and op.triton is not None and triton_available():
        return "triton"
    return "reference"


def dispatch(op_name: str, device: torch.device | str) -> Callable:
    """Return the implementation of `op_name` chosen for `device`."""
    return OPS.get(op_name).load(select_backend(op_name, device))

