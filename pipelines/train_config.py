"""What a fine-tuning run is: the config dataclasses a YAML file fills, and their loader.

`TrainConfig` holds the task, the model, the data and the optimizer, schedule and loop settings;
`load_train_config` reads one from YAML with `-o key.sub=value` overrides and checks the task's
`data.options`. The engine (`pipelines.finetune`) and evaluation (`pipelines.evaluate`) both read
runs through these types, so they live apart from either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medai.config import ConfigError, from_dict, load_config
from medai.pipelines.tasks import get_task


@dataclass
class LoraConfig:
    """Parameter-efficient fine-tuning with peft's LoRA on the named modules."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)
    # modules trained in full beside the adapters (e.g. a new classifier head), as peft copies
    modules_to_save: list[str] = field(default_factory=list)
    # modules trained in place beside the adapters, without a peft copy: for one the model calls
    # through methods other than forward (a VLM's vision encoder, called via forward_features)
    unfreeze: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """Which registered model to build and how."""

    name: str
    pretrained: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    """Where the data is and how it is batched; `options` are validated by the task."""

    path: Path
    batch_size: int = 32
    eval_batch_size: int | None = None
    num_workers: int = 0
    balanced_sampling: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_batch(self) -> int:
        """Batch size for validation and test (eval_batch_size, else the training batch size)."""
        return self.eval_batch_size or self.batch_size


@dataclass
class OptimConfig:
    """Optimizer settings (AdamW by default; no weight decay on biases and norms)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    # learning-rate multipliers by module name, e.g. {backbone: 0.25}: a parameter whose dotted name
    # holds that module name trains at lr * scale (the first match wins)
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over optimizer steps: linear warmup then cosine/linear/constant."""

    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    """Loop settings."""

    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (all epochs)
    # Equal-time comparisons: after `budget_calibration_steps` steps the median step time fixes the
    # run's step count to fit this budget (then the run is deterministic and resumes exactly).
    time_budget_minutes: float | None = None
    budget_calibration_steps: int = 20
    eval_every_epochs: int = 1  # validate every N epochs and always after the last one
    limit_train_batches: int | None = None  # use only the first N batches of each epoch (quick checks)
    grad_accum: int = 1
    precision: Literal["auto", "no", "fp16", "bf16"] = "no"
    clip_grad_norm: float | None = 1.0
    ema_decay: float | None = None
    monitor: str | None = None  # e.g. val_auroc; default: the task's
    monitor_mode: Literal["max", "min"] | None = None
    early_stopping_patience: int | None = None  # epochs without improvement
    save_every_steps: int | None = None  # resumable checkpoint every N optimizer steps (+ each epoch end)
    deterministic: bool = True
    max_nonfinite_steps: int = 10  # stop after this many skipped non-finite losses/gradients
    log_every_steps: int = 10
    tensorboard: bool = False
    n_boot: int = 1000  # bootstrap resamples for the test-set CIs
    evaluate_test: bool = True
    evaluate_split: str = "test"  # split scored with CIs at the end ("val" where a set has no test split)

    def __post_init__(self) -> None:
        # A run with no step would exit 0 leaving a run folder with no checkpoint in it.
        for name in ("epochs", "grad_accum", "eval_every_epochs", "budget_calibration_steps", "log_every_steps",
                     "max_steps", "limit_train_batches", "save_every_steps", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"trainer.{name} must be at least 1, got {value}")
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            raise ValueError(f"trainer.time_budget_minutes must be positive, got {self.time_budget_minutes}")


@dataclass
class TrainConfig:
    """A whole fine-tuning run."""

    task: str
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    output_dir: Path = Path("runs")
    run_name: str | None = None


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load and validate a training config; the task's `data.options` are checked too.

    `${MEDAI_DATA}` in `data.path` stands for the shared data root (medai.io.data.data_root()).
    """
    from medai.io.data import data_root

    cfg = load_config(TrainConfig, path, overrides)
    if "${MEDAI_DATA}" in str(cfg.data.path):
        cfg.data.path = Path(str(cfg.data.path).replace("${MEDAI_DATA}", str(data_root())))
    task = get_task(cfg.task)
    if task.options_cls is not None:
        from_dict(task.options_cls, cfg.data.options, source=path, prefix="data.options")
    if not Path(cfg.data.path).exists():
        raise ConfigError(f"data path does not exist: {cfg.data.path}", path, "data.path")
    return cfg


def config_diffs(old: Any, new: Any, prefix: str = "", ignore: set[str] = frozenset()) -> list[str]:
    """Dotted keys where two config dicts (as `medai.config.to_dict` gives them) differ, except `ignore`."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else key
            if path not in ignore:
                out += config_diffs(old.get(key), new.get(key), path, ignore)
        return out
    return [] if old == new else [prefix]
