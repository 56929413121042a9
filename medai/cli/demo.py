"""`medai demo`: the main job on the bundled defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()


def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo run is written."),
    epochs: Optional[int] = typer.Option(None, help="Override the bundled config's epochs (default: as configured)."),
) -> None:
    """Run the main job on the bundled defaults: preflight, BreastMNIST fine-tuning, its evaluation."""
    from medai.utils import shipped_file
    from medai.pipelines.finetune import finetune as run_finetune
    from medai.pipelines.train_config import load_train_config

    from medai.cli.doctor import doctor

    doctor()
    config = shipped_file("configs/breastmnist_resnet18.yaml")
    overrides = [f"output_dir={output_dir}", "run_name=breastmnist-resnet18-demo"]
    if epochs is not None:
        overrides.append(f"trainer.epochs={epochs}")
    cfg = load_train_config(config, overrides)
    console.print(f"Fine-tuning {cfg.model.name} on {cfg.data.path} ({config.name}, up to {cfg.trainer.epochs} epochs; "
                  "re-running resumes an interrupted run)...")
    result = run_finetune(cfg)
    if result.test_report:
        for name, m in result.test_report["metrics"].items():
            console.print(f"{result.test_report['split']} {name}: {m['value']:.4f} (95% CI {m['low']:.4f}-{m['high']:.4f})")
    console.print(f"Report, curves and checkpoints: {result.run_dir} "
                  f"(eval_{cfg.trainer.evaluate_split}.md, curves.png, checkpoints/)")
