"""Table of validation Dice/HD95 (95% bootstrap CIs) for the Task04 engine runs, for the model card.

Reads each run folder written by `medai finetune configs/hippocampus_<model>.yaml` (its
`predictions_val.npz`, `checkpoints/last/trainer_state.json` and `run.json`), summarises Dice and
HD95 per label over the validation volumes, and pairs each U-Mamba with the DynUNet baseline on the
same volumes (paired bootstrap of the per-volume mean Dice over labels).

    python benchmarks/hippocampus_report.py [--runs runs/seg_engine] [--out benchmarks/results/hippocampus.md]
                                            [--plot benchmarks/results/hippocampus_loss.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from medai.pipelines.metrics import paired_bootstrap
from medai.pipelines.segmentation import HIPPOCAMPUS_LABELS, NNUNET_TASK04_DICE, summarize_cases

MODELS = {"dynunet_3d": "DynUNet (baseline)", "umamba_bot_3d": "U-Mamba-Bot", "umamba_enc_3d": "U-Mamba-Enc"}
KEYS = [f"{m}_{n}" for n in HIPPOCAMPUS_LABELS.values() for m in ("dice", "hd95")]
N_BOOT = 2000


def load_engine_run(run_dir: Path) -> dict:
    """Per-volume metrics, steps, training minutes and parameter count of one finished engine run."""
    from safetensors import safe_open

    with np.load(run_dir / "predictions_val.npz") as f:
        preds = {k: f[k] for k in f.files}
    state = json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())
    with safe_open(str(run_dir / "checkpoints" / "last" / "model.safetensors"), "pt") as f:
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    run = json.loads((run_dir / "run.json").read_text())
    return {"preds": preds, "steps": state["global_step"], "budget_steps": state.get("budget_steps"),
            "train_minutes": state.get("train_seconds", float("nan")) / 60, "params": params,
            "commit": run.get("git_commit", "?")}


def _row(name: str, run: dict) -> str:
    p = run["preds"]
    per_case = [{k: float(p[k][i]) for k in KEYS} for i in range(len(p["index"]))]
    s = summarize_cases(per_case, KEYS, n_boot=N_BOOT)
    cells = []
    for label in HIPPOCAMPUS_LABELS.values():
        d, h = s[f"dice_{label}"], s[f"hd95_{label}"]
        cells.append(f"{d['value']:.3f} [{d['low']:.3f}, {d['high']:.3f}]")
        cells.append(f"{h['value']:.2f} [{h['low']:.2f}, {h['high']:.2f}]"
                     + (f" ({h['n_undefined']} undef.)" if h["n_undefined"] else ""))
    return (f"| {name} | {len(per_case)} | {run['steps']} | {run['train_minutes']:.1f} | "
            f"{run['params'] / 1e6:.2f}M | " + " | ".join(cells) + " |")


def _mean_dice(preds: dict) -> dict[str, np.ndarray]:
    return {"dice_mean": np.mean([preds[f"dice_{n}"] for n in HIPPOCAMPUS_LABELS.values()], axis=0)}


def report(runs: dict[str, dict]) -> str:
    """Markdown: the per-model table, the paired differences against DynUNet and the published reference."""
    lines = ["| model | val volumes | steps | train min | params | Dice anterior [95% CI] | HD95 anterior mm | "
             "Dice posterior [95% CI] | HD95 posterior mm |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(MODELS.get(m, m), r) for m, r in runs.items()]
    if "dynunet_3d" in runs:
        base = runs["dynunet_3d"]["preds"]
        lines += ["", "Paired bootstrap, model minus DynUNet, per-volume mean Dice over both labels:", ""]
        for m, r in runs.items():
            if m == "dynunet_3d":
                continue
            if not np.array_equal(r["preds"]["index"], base["index"]):
                lines.append(f"- {MODELS.get(m, m)}: not scored on the same volumes as DynUNet; no pairing")
                continue
            d = paired_bootstrap(lambda p: {"dice_mean": float(p["dice_mean"].mean())}, _mean_dice(r["preds"]),
                                 _mean_dice(base), n_boot=N_BOOT)["dice_mean"]
            lines.append(f"- {MODELS.get(m, m)}: {d['difference']:+.3f} (95% CI {d['low']:+.3f} to {d['high']:+.3f}, "
                         f"p = {d['p_value']:.3f}, n = {len(base['index'])})")
    lines += ["", f"Published nnU-Net (MSD Task04, 5-fold CV on the 260 training cases): Dice anterior "
              f"{NNUNET_TASK04_DICE['anterior']:.2f}, posterior {NNUNET_TASK04_DICE['posterior']:.2f}."]
    return "\n".join(lines) + "\n"


def plot_loss(run_dirs: dict[str, Path], path: Path) -> Path:
    """Training loss per epoch against training minutes and against steps, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for model, run_dir in run_dirs.items():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        loss = [r["train_loss"] for r in rows]
        axes[0].plot([r["train_minutes"] for r in rows], loss, label=MODELS.get(model, model))
        axes[1].plot([r["step"] for r in rows], loss, label=MODELS.get(model, model))
    axes[0].set(xlabel="training minutes", ylabel="train loss (Dice + CE, epoch mean)", title="same time budget")
    axes[1].set(xlabel="optimizer steps", title="per step", xscale="log")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/seg_engine"))
    parser.add_argument("--out", type=Path, default=None, help="Also write the Markdown here.")
    parser.add_argument("--plot", type=Path, default=None, help="Also draw the training-loss curves here (PNG).")
    args = parser.parse_args()
    runs = {m: load_engine_run(args.runs / f"hippocampus_{m}") for m in MODELS
            if (args.runs / f"hippocampus_{m}" / "predictions_val.npz").is_file()}
    if not runs:
        print(f"no finished runs under {args.runs}: train them first "
              "(medai finetune configs/hippocampus_<model>.yaml -o run_name=hippocampus_<model> "
              f"-o output_dir={args.runs})")
        return
    text = report(runs)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.plot:
        print(f"wrote {plot_loss({m: args.runs / f'hippocampus_{m}' for m in runs}, args.plot)}")


if __name__ == "__main__":
    main()
