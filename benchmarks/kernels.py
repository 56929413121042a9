"""Kernel benchmarks: throughput of each op's Triton kernel vs its PyTorch reference (and SDPA / NATTEN / mamba-ssm /
flash-attn where installed), the slide-attention block sparsity vs its FLOP reduction, and the MIL pool's peak memory vs N.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/kernels.py [--json results.json] [--pool-sizes 10000 100000 1000000]

On a CUDA device every implementation is timed (CUDA events, median of --repeats after a warm-up) and
reported as TFLOP/s or GB/s with its ratio to the reference. On CPU the Triton kernels only run
through the interpreter, whose speed means nothing: the script times the references, computes the
sparsity figures (host-side, exact) and measures the pool's memory through the reference's chunked
path, and says that kernel timings need a GPU. `--json` writes everything so a GPU run can be
compared with this one later.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

log = logging.getLogger("benchmarks.kernels")


def _time(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _entry(name: str, seconds: float, flops: float | None = None, bytes_moved: float | None = None, **extra) -> dict:
    row = {"impl": name, "seconds": seconds, **extra}
    if flops:
        row["tflops"] = flops / seconds / 1e12
    if bytes_moved:
        row["gbps"] = bytes_moved / seconds / 1e9
    return row


def bench_pool(device: str, repeats: int, n: int) -> dict:
    """Gated attention pool (K=2 branches, D=1024, L=256): forward instance throughput."""
    from medai.kernels.gated_attention_pool_ref import gated_attention_pool_ref

    d, hidden, k = 1024, 256, 2
    g = torch.Generator().manual_seed(0)
    h = torch.rand(n, d, generator=g).to(device)
    params = [t.to(device) for t in (torch.randn(hidden, d, generator=g) / d**0.5, torch.zeros(hidden),
                                      torch.randn(hidden, d, generator=g) / d**0.5, torch.zeros(hidden),
                                      torch.randn(k, hidden, generator=g), torch.zeros(k))]
    flops = 2 * n * d * hidden * 2 + 2 * n * hidden * k + 2 * n * k * d
    rows = []
    with torch.no_grad():
        rows.append(_entry("reference", _time(lambda: gated_attention_pool_ref(h, *params), repeats, device), flops,
                           h.numel() * h.element_size()))
        if device == "cuda":
            from medai.kernels.gated_attention_pool import gated_attention_pool

            rows.append(_entry("triton", _time(lambda: gated_attention_pool(h, *params), repeats, device), flops,
                               h.numel() * h.element_size()))
    return {"op": "gated_attention_pool", "shape": dict(n=n, d=d, hidden=hidden, k=k), "rows": rows}


def bench_slide_attention(device: str, repeats: int, n: int) -> dict:
    """Slide attention (1 slide, 8 heads, head_dim 64): dense and LongNet-dilated; SDPA and flash-attn as baselines."""
    from medai.kernels.slide_attention_ref import slide_attention_ref

    heads, dim = 8, 64
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype) for _ in range(3))
    dense_flops = 4 * heads * n * n * dim
    segment = dict(segment_length=max(64, n // 8), dilation=2)
    rows = []
    with torch.no_grad():
        rows.append(_entry("reference_dense", _time(lambda: slide_attention_ref(q, k, v), repeats, device), dense_flops))
        rows.append(_entry("sdpa_dense", _time(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats, device), dense_flops))
        if device == "cuda":
            from medai.kernels.slide_attention import slide_attention

            rows.append(_entry("triton_dense", _time(lambda: slide_attention(q, k, v), repeats, device), dense_flops))
            rows.append(_entry("triton_dilated", _time(lambda: slide_attention(q, k, v, **segment), repeats, device),
                               dense_flops / (8 * 2), pattern=segment))
            if importlib.util.find_spec("flash_attn"):
                from flash_attn import flash_attn_func

                qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
                rows.append(_entry("flash_attn_dense", _time(lambda: flash_attn_func(qt, kt, vt), repeats, device),
                                   dense_flops))
    return {"op": "slide_attention", "shape": dict(n=n, heads=heads, head_dim=dim, dtype=str(dtype)), "rows": rows}


def slide_sparsity(n: int) -> dict:
    """Fraction of (query, key) block pairs the kernel visits vs the pattern's FLOP fraction, at slide-sized N."""
    from medai.kernels.slide_attention import visited_block_fraction

    rows = []
    for segment_length, dilation in [(n // 8, 1), (n // 8, 4), (n // 64, 2)]:
        rows.append(dict(pattern=f"segments {segment_length}, dilation {dilation}",
                         flop_fraction=1 / ((n / segment_length) * dilation),
                         visited_block_fraction=visited_block_fraction(n, segment_length=segment_length,
                                                                       dilation=dilation)))
    # A tissue-only irregular grid: a disc of tissue on a square grid, tokens in scan order (as a tiler writes them).
    side = int((n / 0.785) ** 0.5) + 1
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    tissue = ((xs - side / 2) ** 2 + (ys - side / 2) ** 2) <= (side / 2) ** 2
    coords = torch.stack([xs[tissue], ys[tissue]], -1)[:n][None]
    tokens = coords.shape[1]
    for radius in (2, 8):
        window = (2 * radius + 1) ** 2
        rows.append(dict(pattern=f"2D window radius {radius} on a {tokens}-token tissue disc",
                         flop_fraction=window / tokens,
                         visited_block_fraction=visited_block_fraction(tokens, coords=coords, window_radius=radius)))
    return {"n": n, "rows": rows}


def bench_neighborhood_attention(device: str, repeats: int) -> dict:
    """DiNA (batch 64, 4 heads, 28x28, head_dim 32, kernel 7, dilation 2): kernel vs the unfused gather reference."""
    from medai.kernels.neighborhood_attention_ref import neighborhood_attention_2d as reference

    shape = (64 if device == "cuda" else 4, 4, 28, 28, 32)
    q, k, v = (torch.randn(*shape, device=device) for _ in range(3))
    rpb = torch.randn(4, 13, 13, device=device)
    flops = 4 * q.numel() * 49
    rows = []
    with torch.no_grad():
        rows.append(_entry("reference_gather", _time(lambda: reference(q, k, v, 7, 2, rpb), repeats, device), flops))
        if device == "cuda":
            from medai.kernels.neighborhood_attention import neighborhood_attention_2d

            rows.append(_entry("triton", _time(lambda: neighborhood_attention_2d(q, k, v, 7, 2, rpb), repeats, device),
                               flops))
            if importlib.util.find_spec("natten"):
                from natten.functional import na2d

                qn, kn, vn = (t.permute(0, 2, 3, 1, 4).contiguous() for t in (q, k, v))
                rows.append(_entry("natten", _time(lambda: na2d(qn, kn, vn, 7, dilation=2), repeats, device), flops))
    return {"op": "neighborhood_attention_2d", "shape": dict(zip("B heads H W head_dim".split(), shape)), "rows": rows}


def bench_selective_scan(device: str, repeats: int) -> dict:
    """Selective scan (batch 4, dim 768, N 16, L 2048 on CUDA; smaller on CPU): bytes of u, Δ, B, C, z, out."""
    from medai.kernels.selective_scan_ref import selective_scan_chunked

    batch, dim, n_state, length = (4, 768, 16, 2048) if device == "cuda" else (1, 64, 16, 512)
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(batch, dim, length, generator=g).to(device) for _ in range(3))
    A = -torch.rand(dim, n_state, generator=g).to(device)
    B, C = (torch.randn(batch, n_state, length, generator=g).to(device) for _ in range(2))
    moved = 4 * (4 * batch * dim * length + 2 * batch * n_state * length)
    args = (u, delta, A, B, C, None, z, None, True)
    rows = []
    with torch.no_grad():
        rows.append(_entry("reference_chunked", _time(lambda: selective_scan_chunked(*args), repeats, device), None, moved))
        if device == "cuda":
            from medai.kernels.selective_scan import selective_scan

            rows.append(_entry("triton", _time(lambda: selective_scan(*args), repeats, device), None, moved))
            if importlib.util.find_spec("mamba_ssm"):
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

                rows.append(_entry("mamba_ssm", _time(lambda: selective_scan_fn(*args), repeats, device), None, moved))
    return {"op": "selective_scan", "shape": dict(batch=batch, dim=dim, n_state=n_state, length=length), "rows": rows}


POOL_MEMORY_CHILD = r"""
import json, sys, torch
n, device = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
from medai.kernels.ops import gated_attention_pool
d, hidden, k = 128, 128, 2
params = [t.to(device) for t in (torch.randn(hidden, d) * 0.05, torch.zeros(hidden), torch.randn(hidden, d) * 0.05,
                                 torch.zeros(hidden), torch.randn(k, hidden), torch.zeros(k))]
def status_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
with torch.no_grad():
    gated_attention_pool(torch.rand(40_000, d, device=device), *params)
    h = torch.rand(n, d, device=device)
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated() / 2**20
    else:
        open("/proc/self/clear_refs", "w").write("5"); base = status_mib("VmRSS")
    pooled, logits = gated_attention_pool(h, *params)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else status_mib("VmHWM")
print(json.dumps({"n": n, "features_mib": h.numel() * 4 / 2**20, "extra_peak_mib": peak - base,
                  "logits_mib": logits.numel() * 4 / 2**20}))
"""


def pool_memory(device: str, sizes: list[int]) -> dict:
    """Peak memory above the features of `kernels.ops.gated_attention_pool` per N, one child process each."""
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, "-c", POOL_MEMORY_CHILD, str(n), device], capture_output=True, text=True,
                             cwd=ROOT, timeout=600, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        log.info("pool N=%d: extra peak %.0f MiB", n, rows[-1]["extra_peak_mib"])
    path = "Triton kernel" if device == "cuda" else "PyTorch reference (chunked online softmax)"
    return {"path": path, "d": 128, "hidden": 128, "k": 2, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    """Run every benchmark; print a summary; return (and with --json write) the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool-sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": None if device == "cuda" else "no GPU: only the PyTorch references were timed; kernel timings need a GPU",
        "benchmarks": [
            bench_pool(device, args.repeats, 1_000_000 if device == "cuda" else 20_000),
            bench_slide_attention(device, args.repeats, 65_536 if device == "cuda" else 2_048),
            bench_neighborhood_attention(device, args.repeats),
            bench_selective_scan(device, args.repeats),
        ],
        "slide_sparsity": slide_sparsity(131_072),
        "pool_memory": pool_memory(device, args.pool_sizes),
    }
    for bench in results["benchmarks"]:
        reference = bench["rows"][0]["seconds"]
        for row in bench["rows"]:
            rate = f"{row['tflops']:.4f} TFLOP/s" if "tflops" in row else f"{row.get('gbps', 0):.2f} GB/s"
            log.info("%-26s %-18s %9.2f ms  %s  x%.2f vs reference", bench["op"], row["impl"], row["seconds"] * 1e3,
                     rate, reference / row["seconds"])
    for row in results["slide_sparsity"]["rows"]:
        log.info("slide sparsity %-48s FLOPs %.4f of dense, blocks visited %.4f", row["pattern"], row["flop_fraction"],
                 row["visited_block_fraction"])
    for row in results["pool_memory"]["rows"]:
        log.info("pool memory N=%-8d features %6.0f MiB, extra peak %5.0f MiB (logits %.0f MiB)", row["n"],
                 row["features_mib"], row["extra_peak_mib"], row["logits_mib"])
    if results["note"]:
        log.info("%s", results["note"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
