"""Where does attention land on SICAPv2? Out-of-fold attention of the benchmark's models vs patch Gleason labels.

    PYTHONPATH=. python benchmarks/mil_sicapv2_attention.py --runs runs/mil_benchmark/sicapv2/runs [--models abmil acmil] [--seed 0]

For each slide, the model of the fold in which that slide was a *test* slide gives its attention
(slide-level map = mean over branches). Patch labels (SICAPv2): 0 non-cancerous, 1 Gleason 3,
2 Gleason 4, 3 Gleason 5, 4 Gleason 4 cribriform. Benign slides hold only label-0 patches and
cancerous slides none, so the check is the grade mix inside cancerous slides: the share of
attention on high-grade (G4/G5/cribriform) patches against their share of patches.
Writes `attention_by_grade.md` beside the runs folder and a preview PNG per slide.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from medai.data import dataset_path
from medai.io.mil_bags import read_sicapv2_bags
from models import create_model
from pipelines.mil_heatmaps import attention_by_instance_label, attention_grid_png, attention_maps
from pipelines.tasks.mil import stratified_cv_split

HIGH_GRADE = (2, 3, 4)


def main() -> None:
    """Compute out-of-fold attention shares per grade and write the table and PNGs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["abmil", "acmil", "acmil_aem", "transmil"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    args = parser.parse_args()
    bags = read_sicapv2_bags(dataset_path("mil_sicapv2_128d"))
    labels = np.array([b.label for b in bags])
    test_fold = {}
    for fold in range(args.folds):
        for i in stratified_cv_split(labels, args.folds, fold, args.seed, args.val_fraction)["test"]:
            test_fold[int(i)] = fold
    lines = ["| model | cancerous slides | high-grade share of patches | high-grade share of attention | ratio |",
             "|---|---|---|---|---|"]
    out_dir = args.runs.parent / "attention"
    for name in args.models:
        seed_dir = args.runs / name / f"seed{args.seed}"
        if not seed_dir.is_dir():
            continue
        patch_shares, attention_shares = [], []
        for i, bag in enumerate(bags):
            run = seed_dir / f"fold{test_fold[i]}"
            config = yaml.safe_load((run / "config.yaml").read_text())
            model = create_model(name, pretrained=run / "checkpoints" / "best" / "model.safetensors",
                                 in_features=128, num_classes=2, **config["model"]["kwargs"])
            maps = attention_maps(model, bag.features, bag.coords)
            if i < 6:
                attention_grid_png(maps, out_dir / name / f"{bag.bag_id}.png",
                                   title=f"{name} (fold {test_fold[i]} test): {bag.bag_id}, label {bag.label}")
            if bag.label == 1:
                shares = attention_by_instance_label(maps.slide_scores, bag.instance_labels)
                patch_shares.append(sum(shares[g]["patch_share"] for g in HIGH_GRADE if g in shares))
                attention_shares.append(sum(shares[g]["attention_share"] for g in HIGH_GRADE if g in shares))
        p, a = float(np.mean(patch_shares)), float(np.mean(attention_shares))
        lines.append(f"| {name} | {len(patch_shares)} | {p:.3f} | {a:.3f} | {a / p:.2f} |")
    text = "\n".join(lines) + "\n"
    (args.runs.parent / "attention_by_grade.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
