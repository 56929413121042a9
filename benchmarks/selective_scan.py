"""Selective scan: tokens/s and peak memory of medai's chunked reference vs a naive sequential loop.

Each (implementation, length) runs in a fresh subprocess so its peak RSS is its own. Prints a
table with the speed-up of the chunked scan over the loop measured in this same run.

    OMP_NUM_THREADS=1 python benchmarks/selective_scan.py [--lengths 1024 4096 16384 65536] [--dim 16]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _measure(impl: str, length: int, batch: int, dim: int, n_state: int, backward: bool, queue) -> None:
    import torch

    from medai.kernels.selective_scan_ref import selective_scan_chunked, selective_scan_sequential

    torch.manual_seed(0)
    fn = selective_scan_chunked if impl == "chunked" else selective_scan_sequential
    # Warm-up: the first autograd call pays one-time initialisation that is not the scan's cost.
    warm = [torch.randn(1, 2, 64), torch.randn(1, 2, 64), -torch.rand(2, 4), torch.randn(1, 4, 64), torch.randn(1, 4, 64)]
    fn(*(t.requires_grad_() for t in warm), delta_softplus=True).sum().backward()
    inputs = [
        torch.randn(batch, dim, length),
        torch.randn(batch, dim, length),
        -torch.rand(dim, n_state) * 8,
        torch.randn(batch, n_state, length),
        torch.randn(batch, n_state, length),
    ]
    for tensor in inputs:
        tensor.requires_grad_(backward)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    out = fn(*inputs, delta_softplus=True)
    if backward:
        out.sum().backward()
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": seconds, "peak_mib": (peak_kib - base_kib) / 1024})


def run(impl: str, length: int, batch: int, dim: int, n_state: int, backward: bool) -> dict:
    """Time one configuration in a spawned process; return seconds, tokens/s and peak MiB."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(impl, length, batch, dim, n_state, backward, queue))
    proc.start()
    result = queue.get()
    proc.join()
    result["tokens_per_s"] = batch * length / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--backward-max-length", type=int, default=4096, help="fwd+bwd rows up to this length")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    print(f"batch={args.batch} dim={args.dim} N={args.state}  (fp32, CPU)")
    print(f"{'pass':8} {'L':>7} {'loop tok/s':>12} {'chunked tok/s':>14} {'speed-up':>9} {'loop MiB':>9} {'chunked MiB':>12}")
    for backward in (False, True):
        for length in args.lengths:
            if backward and length > args.backward_max_length:
                continue
            loop = run("sequential", length, args.batch, args.dim, args.state, backward)
            chunked = run("chunked", length, args.batch, args.dim, args.state, backward)
            row = {"pass": "fwd+bwd" if backward else "fwd", "length": length, "loop": loop, "chunked": chunked,
                   "speedup": chunked["tokens_per_s"] / loop["tokens_per_s"]}
            rows.append(row)
            print(f"{row['pass']:8} {length:>7} {loop['tokens_per_s']:>12.0f} {chunked['tokens_per_s']:>14.0f} "
                  f"{row['speedup']:>8.1f}x {loop['peak_mib']:>9.0f} {chunked['peak_mib']:>12.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
