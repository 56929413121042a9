"""Produce benchmarks/mil_results.md: MIL models cross-validated on the shared real bag sets.

    nice -n 10 python benchmarks/mil_results.py [--sets sicapv2 musk1 ...] [--seeds 5] [--out runs/mil_benchmark]

Each set runs through `pipelines.mil_benchmark.run_mil_benchmark` (every fold is a `medai finetune`
run of task `mil`); finished folds are reused, so re-running continues an interrupted benchmark.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medai.data import dataset_path
from pipelines.mil_benchmark import BenchmarkSettings, results_markdown, run_mil_benchmark

MODELS = ("abmil", "acmil", "acmil_aem", "transmil")
# name -> (path under the shared data, folds, epochs, standardise features, val fraction)
SETS = {
    "sicapv2": ("mil_sicapv2_128d", "", 5, 20, False, 0.2),
    "musk1": ("mil_classic", "musk1/musk1.mat", 10, 20, True, 0.1),
    "musk2": ("mil_classic", "musk2/musk2.mat", 10, 20, True, 0.1),
    "fox": ("mil_classic", "fox/fox.mat", 10, 20, True, 0.1),
    "tiger": ("mil_classic", "tiger/tiger.mat", 10, 20, True, 0.1),
}
# Ilse et al. 2018, Table 1 (10-fold CV accuracy, mean of 5 runs): attention / gated attention.
PUBLISHED = {"musk1": (0.892, 0.900), "musk2": (0.858, 0.863), "fox": (0.615, 0.603), "tiger": (0.839, 0.845)}


def main() -> None:
    """Run the selected sets and write the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["sicapv2", "musk1"], choices=sorted(SETS))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/mil_benchmark"))
    parser.add_argument("--table", type=Path, default=Path(__file__).with_name("mil_results.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sections = ["# MIL benchmark results (measured)", "",
                f"Command: `python benchmarks/mil_results.py --sets {' '.join(args.sets)} --models "
                f"{' '.join(args.models)} --seeds {args.seeds}` (CPU).", ""]
    for name in args.sets:
        dataset, relative, folds, epochs, standardize, val_fraction = SETS[name]
        path = dataset_path(dataset) / relative if relative else dataset_path(dataset)
        settings = BenchmarkSettings(models=tuple(args.models), folds=folds, seeds=tuple(range(args.seeds)),
                                     epochs=epochs, standardize=standardize, val_fraction=val_fraction)
        results = run_mil_benchmark(path, settings, args.out / name)
        sections.append(results_markdown(results))
        if name in PUBLISHED:
            att, gated = PUBLISHED[name]
            sections.append(f"Published (Ilse et al. 2018, Table 1, accuracy): attention {att:.3f}, gated attention {gated:.3f}.\n")
        args.table.write_text("\n".join(sections))  # after every set, so partial results are kept


if __name__ == "__main__":
    main()
