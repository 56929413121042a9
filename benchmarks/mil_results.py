"""Produce benchmarks/mil_results.md: MIL models cross-validated on the shared real bag sets.

    PYTHONPATH=. nice -n 10 python benchmarks/mil_results.py [--sets sicapv2 musk1 ...] [--seeds N] [--out runs/mil_benchmark]

Each set runs through `pipelines.mil_benchmark.run_mil_benchmark` (every fold is a `medai finetune`
run of task `mil`); finished folds are reused, so re-running continues an interrupted benchmark.
For SICAPv2 it also measures where attention lands: out of fold (each slide scored by the model
of the fold that tested it), the share of slide-level attention on high-grade patches (Gleason 4,
5, cribriform) of cancerous slides against their share of patches.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from medai.io.data import dataset_path
from medai.pipelines.mil_benchmark import BenchmarkSettings, results_markdown, run_mil_benchmark

MODELS = ("abmil", "acmil", "acmil_aem", "transmil")
# name -> (dataset key, path inside it, folds, epochs, standardise features, val fraction, default seeds, task options)
SETS = {
    "sicapv2": ("mil_sicapv2_128d", "", 5, 20, False, 0.2, 5, {}),
    "musk1": ("mil_classic", "musk1/musk1.mat", 10, 20, True, 0.1, 5, {}),
    "musk2": ("mil_classic", "musk2/musk2.mat", 10, 20, True, 0.1, 5, {}),
    "fox": ("mil_classic", "fox/fox.mat", 10, 20, True, 0.1, 5, {}),
    "tiger": ("mil_classic", "tiger/tiger.mat", 10, 20, True, 0.1, 5, {}),
    # MNIST-bags style from real BreastMNIST (positive = holds a malignant image, class 0); bags of each official
    # split use only that split's images. Folds/val fraction do not apply: the split is the images' own.
    "breastmnist_bags": ("breastmnist", "", 1, 20, False, 0.0, 5,
                         {"format": "medmnist_bags", "n_bags": 800, "bag_size": 10, "bag_size_sd": 2.0,
                          "prevalence": 0.5, "positive_class": 0}),
}
# Ilse et al. 2018, Table 1 (10-fold CV accuracy, mean of 5 runs): attention / gated attention.
PUBLISHED = {"musk1": (0.892, 0.900), "musk2": (0.858, 0.863), "fox": (0.615, 0.603), "tiger": (0.839, 0.845)}
SECTIONS = Path(__file__).resolve().parent / "results" / "mil"  # <set>.md generated, <set>.notes.md written by hand
HIGH_GRADE = (2, 3, 4)  # SICAPv2 patch labels: 0 NC, 1 G3, 2 G4, 3 G5, 4 G4 cribriform


def fold_model(run: Path, name: str, in_features: int):
    """The best checkpoint of one benchmark fold run, built with the kwargs that run was trained with."""
    from medai.models import create_model

    kwargs = yaml.safe_load((run / "config.yaml").read_text())["model"]["kwargs"]
    return create_model(name, pretrained=run / "checkpoints" / "best" / "model.safetensors",
                        in_features=in_features, num_classes=2, **kwargs)


def sicapv2_attention_by_grade(runs: Path, models: list[str], seed: int, folds: int, val_fraction: float) -> str:
    """Markdown table: out-of-fold high-grade share of attention vs of patches in cancerous SICAPv2 slides."""
    from medai.io.mil_bags import read_sicapv2_bags
    from medai.pipelines.mil_heatmaps import attention_by_instance_label, attention_grid_png, attention_maps
    from medai.io.datasets.bags import stratified_cv_split

    bags = read_sicapv2_bags(dataset_path("mil_sicapv2_128d"))
    labels = np.array([b.label for b in bags])
    test_fold = {int(i): fold for fold in range(folds)
                 for i in stratified_cv_split(labels, folds, fold, seed, val_fraction)["test"]}
    lines = [f"Where attention lands (seed {seed}, out of fold, cancerous slides):", "",
             "| model | slides | high-grade share of patches | high-grade share of attention | ratio |",
             "|---|---|---|---|---|"]
    for name in models:
        patch_shares, attention_shares = [], []
        for i, bag in enumerate(bags):
            model = fold_model(runs / name / f"seed{seed}" / f"fold{test_fold[i]}", name, in_features=128)
            maps = attention_maps(model, bag.features, bag.coords)
            attention_grid_png(maps, runs.parent / "attention" / name / f"{bag.bag_id}.png",
                               title=f"{name}: {bag.bag_id} (label {bag.label}, fold {test_fold[i]} test)")
            if bag.label == 1:
                shares = attention_by_instance_label(maps.slide_scores, bag.instance_labels)
                patch_shares.append(sum(shares[g]["patch_share"] for g in HIGH_GRADE if g in shares))
                attention_shares.append(sum(shares[g]["attention_share"] for g in HIGH_GRADE if g in shares))
        p, a = float(np.mean(patch_shares)), float(np.mean(attention_shares))
        lines.append(f"| {name} | {len(patch_shares)} | {p:.3f} | {a:.3f} | {a / p:.2f} |")
    return "\n".join(lines) + "\n"


def combined_table(names: list[str]) -> str:
    """mil_results.md: every set's generated section (in SETS order) followed by its hand-written notes."""
    parts = ["# MIL benchmark results (measured)", "",
             "Each section names the command, machine and commit that produced it; regenerate one set with "
             "`PYTHONPATH=. python benchmarks/mil_results.py --sets NAME` (finished folds are reused).", ""]
    for name in names:
        for suffix in (".md", ".notes.md"):
            path = SECTIONS / f"{name}{suffix}"
            if path.is_file():
                parts.append(path.read_text().rstrip() + "\n")
    return "\n".join(parts)


def medmnist_attention_on_positives(runs: Path, models: list[str], seed: int, path: Path, options: dict) -> str:
    """Markdown table: in positive test bags, the malignant images' share of attention vs of instances."""
    from medai.pipelines.mil_heatmaps import attention_by_instance_label, attention_maps
    from medai.io.datasets import load_dataset
    from medai.io.datasets.bags import bag_splits
    from medai.pipelines.tasks.mil import MILOptions

    opts = MILOptions(**options)
    data = load_dataset(path, kind="bags", **vars(opts))
    test = [data.items[i] for i in bag_splits(data, opts.folds, opts.fold, opts.split_seed, opts.val_fraction)["test"]
            if data.items[i].label == 1]
    lines = [f"Where attention lands (seed {seed}, positive test bags; instance labels are the images' own):", "",
             "| model | bags | malignant share of images | malignant share of attention | ratio |",
             "|---|---|---|---|---|"]
    for name in models:
        model = fold_model(runs / name / f"seed{seed}" / "fold0", name, in_features=test[0].features.shape[1])
        image_shares, attention_shares = [], []
        for bag in test:
            shares = attention_by_instance_label(attention_maps(model, bag.features).slide_scores, bag.instance_labels)
            image_shares.append(shares[1]["patch_share"])
            attention_shares.append(shares[1]["attention_share"])
        p, a = float(np.mean(image_shares)), float(np.mean(attention_shares))
        lines.append(f"| {name} | {len(test)} | {p:.3f} | {a:.3f} | {a / p:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the selected sets, write each set's section, and rebuild the combined table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["sicapv2", "musk1"], choices=sorted(SETS))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", type=int, default=None, help="Seeds per set (default: the set's own)")
    parser.add_argument("--out", type=Path, default=Path("runs/mil_benchmark"))
    parser.add_argument("--table", type=Path, default=Path(__file__).with_name("mil_results.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    SECTIONS.mkdir(parents=True, exist_ok=True)
    for name in args.sets:
        dataset, relative, folds, epochs, standardize, val_fraction, seeds, options = SETS[name]
        path = dataset_path(dataset) / relative if relative else dataset_path(dataset)
        settings = BenchmarkSettings(models=tuple(args.models), folds=folds, seeds=tuple(range(args.seeds or seeds)),
                                     epochs=epochs, standardize=standardize, val_fraction=val_fraction,
                                     data_options=dict(options))
        results = run_mil_benchmark(path, settings, args.out / name)
        section = [results_markdown(results).rstrip(), "",
                   f"Produced by `PYTHONPATH=. python benchmarks/mil_results.py --sets {name} --models "
                   f"{' '.join(args.models)}" + (f" --seeds {args.seeds}" if args.seeds else "") +
                   f"` on {platform.node() or 'this machine'} ({os.cpu_count()} CPUs, no GPU), "
                   f"{time.strftime('%Y-%m-%d')}, commit `{commit}` (folds finished by an earlier run of the same "
                   f"settings are reused, not retrained).", ""]
        if name in PUBLISHED:
            att, gated = PUBLISHED[name]
            section.append(f"Published (Ilse et al. 2018, Table 1, accuracy; values as listed in the shared data "
                           f"README, not re-checked against the paper here): attention {att:.3f}, "
                           f"gated attention {gated:.3f}.\n")
        if options.get("format") == "medmnist_bags":
            section.append(medmnist_attention_on_positives(args.out / name / "runs", list(args.models), 0, path,
                                                           options))
        if name == "sicapv2":
            section.append(sicapv2_attention_by_grade(args.out / name / "runs", list(args.models), 0, folds,
                                                      val_fraction))
        (SECTIONS / f"{name}.md").write_text("\n".join(section))
        args.table.write_text(combined_table(list(SETS)))  # after every set, so partial results are kept


if __name__ == "__main__":
    main()
