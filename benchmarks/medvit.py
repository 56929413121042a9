"""MedViT-V2 sizes against timm's resnet50 and convnext_tiny: images/s and peak memory, one run.

Each (model, mode) runs in its own subprocess so peak memory is its own: on CUDA
`torch.cuda.max_memory_allocated`, on CPU the growth of the process's peak resident set over
the model-built baseline. Modes: inference forward (eval, no grad) and a training step
(forward + backward). Ratios are against resnet50 measured in the same run; absolute numbers
depend on the machine and its load.

  OMP_NUM_THREADS=2 nice -n 10 python benchmarks/medvit.py [--device cuda] [--batch 2] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
MODELS = ["resnet50", "convnext_tiny", "medvit_tiny", "medvit_small", "medvit_base", "medvit_large"]


def measure(name: str, mode: str, device: str, batch: int, size: int, repeats: int) -> dict:
    """Build `name`, time `repeats` calls of `mode` after one warm-up; return throughput and memory."""
    import torch

    torch.manual_seed(0)
    if name.startswith("medvit"):
        from medai.models import create_model

        model = create_model(name)
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
    model = model.to(device)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        if mode == "forward":
            with torch.no_grad():
                model(x)
        else:
            model.zero_grad(set_to_none=True)
            model(x).logsumexp(-1).sum().backward()

    model.train(mode == "train")
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    seconds = (time.perf_counter() - start) / repeats
    if device.startswith("cuda"):
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 1024
    return {"model": name, "mode": mode, "params_m": params / 1e6, "images_per_s": batch / seconds, "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=None,
                        help="default: all on CUDA; on CPU the two baselines, medvit_tiny and medvit_small (make bench)")
    parser.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(measure(args._one[0], args._one[1], args.device, args.batch, args.size, args.repeats)))
        return
    if args.models is None:
        args.models = MODELS if args.device.startswith("cuda") else MODELS[:4]
    rows = []
    print(f"device={args.device} batch={args.batch} size={args.size}px repeats={args.repeats}", flush=True)
    for name in args.models:
        for mode in ("forward", "train"):
            cmd = [sys.executable, __file__, "--_one", name, mode, "--device", args.device,
                   "--batch", str(args.batch), "--size", str(args.size), "--repeats", str(args.repeats)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                print(f"{name} {mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)  # partial results survive an interrupted run
    base = {r["mode"]: r for r in rows if r["model"] == "resnet50"}
    print(f"{'model':15s} {'params M':>9s} {'mode':8s} {'img/s':>8s} {'x resnet50':>10s} {'peak MiB':>9s} {'x resnet50':>10s}")
    for r in rows:
        b = base.get(r["mode"])
        speed = f"{r['images_per_s'] / b['images_per_s']:10.2f}" if b else f"{'-':>10s}"
        memory = f"{r['peak_mib'] / b['peak_mib']:10.2f}" if b and b["peak_mib"] > 0 else f"{'-':>10s}"
        print(f"{r['model']:15s} {r['params_m']:9.2f} {r['mode']:8s} {r['images_per_s']:8.2f} {speed} {r['peak_mib']:9.0f} {memory}")


if __name__ == "__main__":
    main()
