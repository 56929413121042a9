"""`medai finetune` and `medai evaluate`: the training engine's door."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medai.cli.options import override_option

console = Console()


def finetune(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="YAML training config (see configs/)."),
    override: list[str] = override_option("Config key"),
    resume: Optional[bool] = typer.Option(
        None, "--resume/--no-resume", help="Require resuming / refuse an existing run (default: resume if found)."
    ),
    seeds: int = typer.Option(1, help="Repeat over this many seeds and report mean ± sd."),
) -> None:
    """Fine-tune a registered model on a dataset with the shared engine (resumable)."""
    from medai.pipelines.finetune import finetune as run_finetune
    from medai.pipelines.finetune import finetune_seeds
    from medai.pipelines.train_config import load_train_config

    cfg = load_train_config(config, override)
    mode = "auto" if resume is None else ("must" if resume else "never")
    if seeds > 1:
        summary = finetune_seeds(cfg, seeds, mode)
        for name, m in summary["metrics"].items():
            console.print(f"{name}: {m['mean']:.4f} ± {m['sd']:.4f} over {len(summary['seeds'])} seeds")
        return
    result = run_finetune(cfg, mode)
    console.print(f"run: {result.run_dir}  best validation metric {result.best_metric} (epoch {result.best_epoch})")
    if result.test_report:
        for name, m in result.test_report["metrics"].items():
            console.print(f"{result.test_report['split']} {name}: {m['value']:.4f} (95% CI {m['low']:.4f}-{m['high']:.4f})")


def evaluate(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A run folder written by `medai finetune`."),
    split: str = typer.Option("test", help="Which split to evaluate."),
    checkpoint: str = typer.Option("best", help="best or last."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the CIs."),
    compare: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="Another run: paired bootstrap of every metric."),
) -> None:
    """Evaluate a run: metrics with bootstrap 95% CIs, plots, optional paired comparison."""
    from medai.pipelines.evaluate import compare_runs, evaluate_run

    report = evaluate_run(run_dir, split, n_boot, checkpoint)
    for name, m in report["metrics"].items():
        console.print(f"{split} {name}: {m['value']:.4f} (95% CI {m['low']:.4f}-{m['high']:.4f})")
    console.print(f"report: {run_dir / f'eval_{split}.md'}")
    if compare:
        result = compare_runs(run_dir, compare, split, n_boot)
        for name, m in result["metrics"].items():
            console.print(f"{name}: a-b = {m['difference']:+.4f} (95% CI {m['low']:+.4f} to {m['high']:+.4f}, "
                          f"p={m['p_value']:.3f})")
