"""Table of validation Dice/HD95 (95% bootstrap CIs) for the Task04 runs, for the model card.

Reads runs/seg/hippocampus_<model>/eval.json (written by `medai seg train`), recomputes every
summary with the engine's bootstrap on (a) each model's own validation cases and (b) the cases
all models were scored on, and pairs each U-Mamba with the DynUNet baseline on shared cases.

    python benchmarks/hippocampus_report.py [--runs runs/seg]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # before benchmarks/: its kernels.py would shadow the package

from pipelines.metrics import paired_bootstrap
from pipelines.segmentation import HIPPOCAMPUS_LABELS, NNUNET_TASK04_DICE, summarize_cases

MODELS = ("dynunet_3d", "umamba_bot_3d", "umamba_enc_3d")
KEYS = [f"{m}_{n}" for n in HIPPOCAMPUS_LABELS.values() for m in ("dice", "hd95")]


def _row(name: str, result: dict, per_case: list[dict]) -> str:
    s = summarize_cases(per_case, KEYS)
    cells = []
    for label in HIPPOCAMPUS_LABELS.values():
        d, h = s[f"dice_{label}"], s[f"hd95_{label}"]
        cells.append(f"{d['value']:.3f} [{d['low']:.3f}, {d['high']:.3f}]")
        cells.append(f"{h['value']:.2f} [{h['low']:.2f}, {h['high']:.2f}]" + (f" ({h['n_undefined']} undef.)"
                                                                              if h["n_undefined"] else ""))
    return (f"| {name} | {len(per_case)} | {result['steps']} | {result['train_minutes']:.1f} | "
            f"{result['parameters'] / 1e6:.2f}M | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/seg"))
    args = parser.parse_args()
    results = {m: json.loads((args.runs / f"hippocampus_{m}" / "eval.json").read_text())
               for m in MODELS if (args.runs / f"hippocampus_{m}" / "eval.json").is_file()}
    if not results:
        print(f"no runs under {args.runs}: train them first (medai seg train configs/seg/hippocampus_<model>.yaml)")
        return
    header = ("| model | val cases | steps | train min | params | Dice anterior [95% CI] | HD95 anterior mm | "
              "Dice posterior [95% CI] | HD95 posterior mm |\n|---|---|---|---|---|---|---|---|---|")
    print("All validation cases each model was scored on:\n" + header)
    for m, r in results.items():
        print(_row(m, r, r["per_case"]))
    shared = set.intersection(*(set(row["case"] for row in r["per_case"]) for r in results.values()))
    print(f"\nThe {len(shared)} validation cases every model was scored on:\n" + header)
    for m, r in results.items():
        print(_row(m, r, [row for row in r["per_case"] if row["case"] in shared]))
    if "dynunet_3d" in results:
        base = {row["case"]: row for row in results["dynunet_3d"]["per_case"]}
        print("\nPaired bootstrap, model - DynUNet, mean Dice over labels, on cases both were scored on:")
        for m, r in results.items():
            if m == "dynunet_3d":
                continue
            rows = [row for row in r["per_case"] if row["case"] in base]
            a = {"dice_mean": np.array([(row["dice_anterior"] + row["dice_posterior"]) / 2 for row in rows])}
            b = {"dice_mean": np.array([(base[row["case"]]["dice_anterior"] + base[row["case"]]["dice_posterior"]) / 2
                                        for row in rows])}
            diff = paired_bootstrap(lambda p: {"dice_mean": float(p["dice_mean"].mean())}, a, b, n_boot=2000)
            d = diff["dice_mean"]
            print(f"- {m}: {d['difference']:+.3f} (95% CI {d['low']:+.3f} to {d['high']:+.3f}, p={d['p_value']:.3f}, "
                  f"n={len(rows)})")
    print(f"\nPublished nnU-Net (MSD Task04, 5-fold CV on the 260 training cases): Dice anterior "
          f"{NNUNET_TASK04_DICE['anterior']:.2f}, posterior {NNUNET_TASK04_DICE['posterior']:.2f}")


if __name__ == "__main__":
    main()
