"""EHR throughput in one run: ingestion + tokenization (patients/s) and EHRMamba vs the Transformer
baseline (sequences/s, peak memory) at 512 .. 16k tokens.

Ingestion: Synthea FHIR bundles (validated per resource) and the MIMIC-IV demo tables, each timed
through ingest -> timelines -> tokens. Models: ehrmamba_small and ehr_transformer_small at the same
width and depth (inference, batch 1, random token sequences with realistic features); peak memory
is the process's resident-set growth during the call on CPU (torch.cuda.max_memory_allocated on
GPU). Read the ratios: wall-clock depends on the machine and its load.

  OMP_NUM_THREADS=2 nice -n 10 python benchmarks/ehr.py [--lengths 512,2048,8192,16384] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from medai.io.data import dataset_path  # noqa: E402
from medai.io.ehr import ingest_fhir, ingest_mimic  # noqa: E402
from medai.transforms.ehr import EHRTokenizer, pad_batch  # noqa: E402
from medai.models import create_model  # noqa: E402


def bench_ingestion(n_bundles: int) -> None:
    """Patients/s through ingest + tokenize for Synthea bundles and the MIMIC demo tables."""
    print(f"{'source':<34}{'patients':>9}{'events':>9}{'ingest s':>10}{'tokenize s':>11}{'patients/s':>11}")
    bundles = sorted((dataset_path("synthea_r4") / "bundles").glob("*.json.gz"))[:n_bundles]
    for label, load in (
        (f"Synthea FHIR ({len(bundles)} bundles)", lambda: ingest_fhir(bundles)),
        ("MIMIC-IV demo tables", lambda: ingest_mimic(dataset_path("mimic_iv_demo"))),
    ):
        t0 = time.perf_counter()
        tables = load()
        timelines = list(tables.timelines())
        t1 = time.perf_counter()
        tokenizer = EHRTokenizer().fit(timelines)
        n_tokens = sum(len(tokenizer.encode(tokenizer.tokenize(tl))["input_ids"]) for tl in timelines)
        t2 = time.perf_counter()
        print(f"{label:<34}{len(timelines):>9}{tables.events.height:>9}{t1 - t0:>10.2f}{t2 - t1:>11.2f}"
              f"{len(timelines) / (t2 - t0):>11.1f}   ({n_tokens} tokens)")


class _PeakRSS:
    """Samples the resident set size in a thread; peak growth over the baseline in MiB."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _batch(length: int, vocab: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(length)
    item = {
        "input_ids": rng.integers(1, vocab, length), "type_ids": rng.integers(0, 14, length),
        "time_stamps": (70000 + np.cumsum(rng.random(length) * 0.1)).astype(np.float32),
        "ages": np.full(length, 60.0, np.float32), "visit_orders": np.arange(length) // 100,
        "visit_segments": (np.arange(length) // 100) % 2 + 1,
    }
    return pad_batch([item])


def bench_models(lengths: list[int], device: str, d_model: int, n_layers: int, repeats: int) -> None:
    """Sequences/s and peak memory of EHRMamba and the Transformer baseline per length."""
    vocab = 4000
    common = {"vocab_size": vocab, "num_labels": 4, "d_model": d_model, "n_layers": n_layers, "dropout": 0.0}
    models = {
        "ehrmamba_small": create_model("ehrmamba_small", **common).to(device).eval(),
        "ehr_transformer_small": create_model("ehr_transformer_small", n_heads=4, **common).to(device).eval(),
    }
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(f"\nmodels at d_model={d_model}, {n_layers} layers: " + ", ".join(f"{k} {v / 1e6:.2f}M params" for k, v in params.items()))
    print(f"{'length':>7}  {'mamba seq/s':>12}{'mamba MiB':>10}  {'transf seq/s':>13}{'transf MiB':>11}  {'speed ratio mamba/transf':>25}")
    for length in lengths:
        batch = {k: v.to(device) for k, v in _batch(length, vocab).items()}
        row = {}
        for name, model in models.items():
            times = []
            gc.collect()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with _PeakRSS() as mem, torch.no_grad():
                for i in range(repeats + 1):
                    t0 = time.perf_counter()
                    model(batch)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    if i:
                        times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else mem.mib
            row[name] = (1.0 / statistics.median(times), peak)
        (ms, mm), (ts, tm) = row["ehrmamba_small"], row["ehr_transformer_small"]
        print(f"{length:>7}  {ms:>12.3f}{mm:>10.0f}  {ts:>13.3f}{tm:>11.0f}  {ms / ts:>25.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192,16384")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bundles", type=int, default=50)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    bench_ingestion(args.bundles)
    bench_models([int(x) for x in args.lengths.split(",")], args.device, args.d_model, args.layers, args.repeats)


if __name__ == "__main__":
    main()
