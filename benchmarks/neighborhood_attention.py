"""Neighborhood attention 2D: the PyTorch reference against its peers, measured in one run.

Prints median milliseconds per call and the ratio to the reference (>1: the peer is slower) for
forward and forward+backward, on the device given. Peers: the brute-force per-query loop from
the tests (small maps only), dense attention with FlexAttention's materialised neighborhood
mask, FlexAttention eager, and (with --compiled) FlexAttention under torch.compile (forward only
on CPU: FlexAttention has no CPU backward). Wall-clock numbers depend on the machine; read
the ratios.

  OMP_NUM_THREADS=1 nice -n 10 python benchmarks/neighborhood_attention.py [--compiled] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from medai.kernels import ops  # noqa: E402
from tests.kernels.test_neighborhood_attention import (  # noqa: E402
    na2d_brute_force,
    na2d_dense_from_mask_mod,
    na2d_flex,
)


def _time(fn, backward: bool, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = fn()
        if backward:
            out.sum().backward()
        if out.is_cuda:
            torch.cuda.synchronize()
        if i:  # the first call warms up (allocations, compilation)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _inputs(batch, heads, height, width, dim, kernel_size, device, grad):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(batch, heads, height, width, dim, generator=gen) for _ in range(3)]
    tensors.append(torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen) * 0.1)
    return [t.to(device).requires_grad_(grad) for t in tensors]


def run(device: str, compiled: bool, repeats: int) -> None:
    """Print a table of timings and ratios for a few representative shapes."""
    cases = [
        # (label, batch, heads, H, W, dim, kernel, dilation, include brute force)
        ("LFP stage-1 map, 56 px input", 8, 2, 14, 14, 32, 7, 1, True),
        ("DiNA, odd non-square", 4, 4, 21, 27, 32, 7, 2, False),
        ("LFP stage-1 map, 224 px input", 2, 2, 56, 56, 32, 7, 1, False),
        ("DiNA d=8, 224 px input", 2, 2, 56, 56, 32, 7, 8, False),
    ]
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'case':34s} {'peer':22s} {'fwd ms':>9s} {'ratio':>7s} {'fwd+bwd ms':>11s} {'ratio':>7s}")
    for label, b, n, h, w, d, k, dil, brute in cases:
        peers = [("reference (kernels.ops)", ops.neighborhood_attention_2d, True)]
        if brute:
            peers.append(("brute-force loop", na2d_brute_force, True))
        peers.append(("dense + flex mask", na2d_dense_from_mask_mod, True))
        peers.append(("flex eager", na2d_flex, device != "cpu"))
        if compiled:
            peers.append(("flex compiled", lambda *a, **kw: na2d_flex(*a, **kw, compiled=True), device != "cpu"))
        base = {}
        for name, fn, has_backward in peers:
            row = []
            for backward in (False, True):
                if backward and not has_backward:
                    row.append(None)
                    continue
                q, key, v, rpb = _inputs(b, n, h, w, d, k, device, backward)
                with torch.set_grad_enabled(backward):
                    ms = _time(lambda: fn(q, key, v, k, dil, rpb), backward, repeats if name != "brute-force loop" else 1)
                row.append(ms)
            if not base:
                base = {0: row[0], 1: row[1]}
            cells = []
            for i, ms in enumerate(row):
                cells.append(f"{'-':>9s} {'-':>7s}" if ms is None else f"{ms:9.1f} {ms / base[i]:7.2f}")
            print(f"{label:34s} {name:22s} {cells[0]} {cells[1]:>19s}")
            label = ""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile(flex_attention)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    run(args.device, args.compiled, args.repeats)
