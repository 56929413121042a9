"""The fine-tuning engine every model trains through (`medai finetune CONFIG.yaml`).

One loop for all tasks (classification, segmentation, MIL, sequences, vision-language): the task
plug-in (`pipelines.tasks`) supplies data, model, loss, predictions and metrics; the run's
settings are `pipelines.train_config.TrainConfig`; this module supplies devices and processes
(Hugging Face accelerate: one CPU, one GPU, or `accelerate launch` / `torchrun` across processes),
precision, accumulation, clipping, EMA, schedules, non-finite guards, early stopping, safetensors
checkpoints with exact resume, progress bars, metric logs and curves. Equal-time comparisons (`trainer.time_budget_minutes`)
calibrate each run's step count on its first steps, so the run stays deterministic afterwards.

`Trainer.fit()` trains and returns; `finetune()` composes a run: train, then score the best
checkpoint on the held-out split with `pipelines.evaluate.evaluate_run`.

Exact resume: the sampler's order and each item's augmentation are functions of
(seed, epoch, index), and every optimizer step boundary can be checkpointed with the RNG states,
so a run killed at any point and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from medai.config import ConfigError, from_dict, save_config, to_dict
from medai.errors import MedaiError
from medai.utils import atomic_write, replace_folder, repo_root, seed_everything
from medai.pipelines import checkpointing as ckpt
from medai.pipelines.batching import EpochSampler, make_loader, move_to
from medai.pipelines.evaluate import evaluate_run
from medai.pipelines.lora import apply_lora, in_module
from medai.pipelines.tasks import Task, TaskData, get_task
from medai.pipelines.train_config import OptimConfig, ScheduleConfig, TrainConfig, config_diffs

log = logging.getLogger(__name__)


class TrainingError(MedaiError, RuntimeError):
    """Training cannot continue (non-finite losses past the limit, config changed on resume...)."""


# --------------------------------------------------------------------------- pieces


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW/SGD with weight decay only on matrices and convolution kernels, and per-module LR scales."""
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    matched: set[str] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        for module, value in cfg.lr_scale.items():
            if in_module(name, module):
                scale = value
                matched.add(module)
                break
        buckets.setdefault((scale, p.ndim > 1 and not name.endswith(".bias")), []).append(p)
    unmatched = sorted(set(cfg.lr_scale) - matched)
    if unmatched:
        raise ConfigError(f"optim.lr_scale names no trainable module: {', '.join(unmatched)}", key="optim.lr_scale")
    # Unscaled groups first, decayed before not: the progress bar and logs read group 0's LR, and
    # without lr_scale the order is the one older checkpoints' optimizer states were saved in.
    order = sorted(buckets, key=lambda k: (k[0] != 1.0, not k[1], k[0]))
    groups = [{"params": buckets[k], "lr": cfg.lr * k[0], "weight_decay": cfg.weight_decay if k[1] else 0.0}
              for k in order]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_lambda(cfg: ScheduleConfig, total_steps: int):
    """Return step -> multiplier: linear warmup, then cosine/linear decay to min_lr_ratio."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's bytes, in name order (replicas must agree)."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        digest.update(name.encode())
        digest.update(p.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_metadata(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """Git commit, command, versions, host facts for the run folder."""
    commit, dirty = None, None
    checkout = repo_root()
    if checkout is not None:  # None when medai runs from an installed wheel: no commit to record
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
            dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True,
                                        text=True, timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            commit, dirty = None, None
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("medai", "torch", "torchvision", "timm", "accelerate", "monai", "numpy", "transformers", "peft"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "seed": cfg.seed,
        "command": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "world_size": world_size,
        "cuda": torch.cuda.is_available(),
        "versions": versions,
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))


# --------------------------------------------------------------------------- the engine


@dataclass
class RunResult:
    """Where a run wrote its outputs and what it measured (`test_report`: filled in by `finetune()`)."""

    run_dir: Path
    best_metric: float | None
    best_epoch: int | None
    test_report: dict[str, Any] | None
    history: list[dict[str, Any]]


class _Stop(Exception):
    pass


class Trainer:
    """One run of the engine (construct, then `fit()`); it trains and checkpoints, evaluation is the caller's."""

    def __init__(self, cfg: TrainConfig, resume: Literal["auto", "never", "must"] = "auto"):
        from accelerate import Accelerator

        self.cfg, self.resume_mode = cfg, resume
        t = cfg.trainer
        precision = t.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        # cpu=True lets accelerate treat torchrun processes without CUDA as one gloo process group
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        self.task: Task = get_task(cfg.task)
        if self.task.options_cls is not None:
            self.task.options = from_dict(self.task.options_cls, cfg.data.options, prefix="data.options")
        self.monitor = t.monitor or self.task.default_monitor
        self.mode = t.monitor_mode or self.task.default_monitor_mode
        name = cfg.run_name or f"{cfg.task}-{cfg.model.name}-seed{cfg.seed}"
        self.run_dir = Path(cfg.output_dir) / name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._stop_signal: int | None = None
        self.trained = False  # whether this fit() ran the loop to its end (not a finished run found again)

    # -- setup -----------------------------------------------------------------

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(cfg.seed)
        self.data: TaskData = self.task.setup(cfg.data, cfg.seed)
        for split in ("train", "val"):
            if split not in self.data.datasets:
                raise TrainingError(f"task '{cfg.task}' gave no '{split}' split for {cfg.data.path}")
        seed_everything(cfg.seed)  # model init independent of what setup consumed
        model = self.task.build_model(cfg.model, self.data.info)
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg.model.lora)
        self.model_raw = model
        train = self.data.datasets["train"]
        weights = self.data.train_sample_weights if cfg.data.balanced_sampling else None
        if cfg.data.balanced_sampling and weights is None:
            raise ConfigError(f"task '{cfg.task}' does not support balanced sampling", key="data.balanced_sampling")
        self.sampler = EpochSampler(len(train), cfg.data.batch_size, cfg.seed, True, weights, self.rank, self.world,
                                    t.limit_train_batches)
        batches_per_epoch = len(self.sampler.all_batches())
        if batches_per_epoch == 0:
            raise TrainingError(f"train split of {cfg.data.path} is smaller than one batch per process")
        self.steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum)
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, self.total_steps))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.ema = None
        if t.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.accelerator.unwrap_model(self.model), decay=t.ema_decay)
        self.state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "best_metric": None, "best_epoch": None,
                      "epochs_without_improvement": 0, "nonfinite_steps": 0, "history": [], "finished": False,
                      "train_seconds": 0.0, "budget_steps": None}
        self._step_seconds: list[float] = []

    def _set_total_steps(self, total: int) -> None:
        """Cap the run at `total` optimizer steps and stretch the LR schedule over them."""
        self.total_steps = total
        self.scheduler.lr_lambdas = [lr_lambda(self.cfg.schedule, total)] * len(self.scheduler.lr_lambdas)

    def _account_step(self, seconds: float) -> None:
        """Add one step's wall time; once calibrated, fix the step count that fits the time budget."""
        t = self.cfg.trainer
        self.state["train_seconds"] += seconds
        if not t.time_budget_minutes or self.state["budget_steps"] is not None:
            return
        self._step_seconds.append(seconds)
        # The first steps pay one-off costs (allocator growth, lazy imports): leave two out.
        if len(self._step_seconds) < t.budget_calibration_steps + 2:
            return
        per_step = float(np.median(self._step_seconds[2:]))
        steps = max(self.state["global_step"], int(t.time_budget_minutes * 60 / per_step))
        # Gather so that every process stops at the same step.
        steps = int(self.accelerator.gather(torch.tensor([steps], device=self.accelerator.device)).min())
        self.state["budget_steps"] = steps
        self._set_total_steps(min(self.total_steps, steps))
        log.info("time budget %.1f min at %.3f s/step: %d steps", t.time_budget_minutes, per_step, steps)

    # -- checkpoints -------------------------------------------------------------

    def _save(self, name: str, weights_only: bool = False) -> None:
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".{name}.tmp"
        if self.main:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        if self.main:
            from safetensors.torch import save_file

            evaluated = self.ema.module if (weights_only and self.ema is not None) else model
            save_file(ckpt.model_state(evaluated), str(tmp / "model.safetensors"),
                      metadata={"task": self.cfg.task, "model": self.cfg.model.name})
            if not weights_only:
                ckpt.optimizer_to_safetensors(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                                              else self.optimizer, tmp / "optimizer.safetensors")
                if self.ema is not None:
                    save_file(ckpt.model_state(self.ema.module), str(tmp / "ema.safetensors"))
        if not weights_only:
            ckpt.save_rng(tmp / f"rng_rank{self.rank}.safetensors")
        self.accelerator.wait_for_everyone()
        if self.main:
            state = dict(self.state, scheduler=self.scheduler.state_dict(), world_size=self.world)
            write_json(tmp / "trainer_state.json", state)
            replace_folder(tmp, final)
        self.accelerator.wait_for_everyone()

    def _try_resume(self) -> bool:
        found = ckpt.find_checkpoint(self.ckpt_dir / "last")
        if found is None:
            if self.resume_mode == "must":
                raise TrainingError(f"--resume given but no checkpoint in {self.ckpt_dir / 'last'}")
            return False
        if self.resume_mode == "never":
            raise TrainingError(f"{self.run_dir} already holds a run; resume it or choose another run_name")
        saved_cfg = self.run_dir / "config.yaml"
        if saved_cfg.is_file():
            import yaml

            # Read the saved config through TrainConfig, so that a field added to medai since the run
            # was saved takes its default there and only a real change refuses the resume.
            old = to_dict(from_dict(TrainConfig, yaml.safe_load(saved_cfg.read_text()), source=saved_cfg))
            new = to_dict(self.cfg)
            diffs = config_diffs(old, new, ignore={"trainer.epochs", "trainer.max_steps",
                                                    "trainer.early_stopping_patience", "trainer.evaluate_test"})
            if diffs:
                raise TrainingError(f"cannot resume {self.run_dir}: config changed at {', '.join(diffs)}")
        state = ckpt.read_trainer_state(found)
        if state.get("world_size", 1) != self.world:
            raise TrainingError(f"checkpoint was written by {state.get('world_size')} processes, now {self.world}")
        model = self.accelerator.unwrap_model(self.model)
        ckpt.load_model_state(model, found / "model.safetensors")
        opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        ckpt.optimizer_from_safetensors(opt, found / "optimizer.safetensors")
        if self.ema is not None and (found / "ema.safetensors").is_file():
            ckpt.load_model_state(self.ema.module, found / "ema.safetensors")
        self.scheduler.load_state_dict(state.pop("scheduler"))
        state.pop("world_size", None)
        self.state.update(state)
        if self.state["budget_steps"] is not None:
            self._set_total_steps(min(self.total_steps, self.state["budget_steps"]))
        ckpt.load_rng(found / f"rng_rank{self.rank}.safetensors")
        log.info("resumed %s at epoch %d batch %d (step %d)", self.run_dir, state["epoch"],
                 state["batch_in_epoch"], state["global_step"])
        return True

    # -- loop --------------------------------------------------------------------

    def _evaluate(self, split: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        dataset = self.data.datasets[split]
        eval_model = self.evaluation_model()
        was_training = eval_model.training
        eval_model.eval()
        bs = self.cfg.data.eval_batch
        sampler = EpochSampler(len(dataset), bs, 0, shuffle=False)
        loader = make_loader(dataset, sampler, self.cfg.data, self.data.collate_fn, self.cfg.seed)
        outputs: dict[str, list[np.ndarray]] = {}
        losses = []
        with torch.no_grad():
            for batch in loader:
                batch = move_to(batch, self.accelerator.device)
                with self.accelerator.autocast():
                    loss, _ = self.task.loss(eval_model, batch)
                    pred = self.task.predict(eval_model, batch)
                losses.append((float(loss), _batch_len(pred)))
                for k, v in pred.items():
                    outputs.setdefault(k, []).append(v)
        eval_model.train(was_training)
        preds = {k: np.concatenate(v) for k, v in outputs.items()}
        metrics = {f"{split}_{k}": v for k, v in self.task.metrics(preds).items()}
        total = sum(n for _, n in losses)
        metrics[f"{split}_loss"] = sum(l * n for l, n in losses) / max(total, 1)
        return metrics, preds

    def evaluation_model(self) -> nn.Module:
        """The module validation scores and `best` saves: the EMA copy when one is kept, else the model."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)

    def _improved(self, value: float) -> bool:
        best = self.state["best_metric"]
        if value is None or not math.isfinite(value):
            return False
        return best is None or (value > best if self.mode == "max" else value < best)

    def _handle_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def fit(self) -> RunResult:
        """Train (or resume) and keep best/last checkpoints; return the result, without a test report."""
        cfg, t = self.cfg, self.cfg.trainer
        self._setup()
        resumed = self._try_resume() if self.resume_mode != "never" or self.ckpt_dir.exists() else False
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            meta = run_metadata(cfg, self.world)
            meta["resumed"] = resumed
            meta["data_info"] = {k: v for k, v in self.data.info.items() if k != "model_kwargs"}
            previous = self.run_dir / "run.json"
            if resumed and previous.is_file():
                # The first start's commit and versions stay traceable after any number of resumes.
                earlier = json.loads(previous.read_text())
                meta["earlier_starts"] = earlier.pop("earlier_starts", []) + [earlier]
            write_json(self.run_dir / "run.json", meta)
        if self.state["finished"]:
            log.info("%s already finished", self.run_dir)
            return self._result()
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._handle_signal)
        tb = None
        if t.tensorboard and self.main:
            from medai.utils import optional_import

            optional_import("tensorboard", "trainer.tensorboard: true")
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        try:
            self._loop(tb)
        except _Stop:
            log.warning("stopped by signal %s; state saved in %s", self._stop_signal, self.ckpt_dir / "last")
            raise SystemExit(128 + (self._stop_signal or 0))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if tb is not None:
                tb.close()
        self._finish()
        self.trained = True
        return self._result()

    def _loop(self, tb: Any) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        from tqdm.auto import tqdm

        model, optimizer = self.model, self.optimizer
        model.train()
        train = self.data.datasets["train"]
        for epoch in range(self.state["epoch"], t.epochs):
            if self.state["global_step"] >= self.total_steps:
                break
            start = self.state["batch_in_epoch"] if epoch == self.state["epoch"] else 0
            self.sampler.set_epoch(epoch, start)
            if hasattr(train, "set_epoch"):
                train.set_epoch(epoch)
            loader = make_loader(train, self.sampler, cfg.data, self.data.collate_fn, cfg.seed + epoch)
            n_batches = len(self.sampler.all_batches())
            bar = tqdm(total=n_batches, initial=start, desc=f"epoch {epoch + 1}/{t.epochs}",
                       disable=not self.main, leave=False, dynamic_ncols=True)
            running, count = 0.0, 0
            optimizer.zero_grad(set_to_none=True)
            tick = time.perf_counter()
            for i, batch in enumerate(loader, start=start):
                batch = move_to(batch, self.accelerator.device)
                boundary = (i + 1) % t.grad_accum == 0 or i + 1 == n_batches
                sync = self.accelerator.no_sync(model) if not boundary else nullcontext()
                with sync:
                    with self.accelerator.autocast():
                        loss, logs = self.task.loss(model, batch)
                    finite = bool(torch.isfinite(loss.detach()).all())
                    if finite:
                        self.accelerator.backward(loss / t.grad_accum)
                if not finite:
                    self._nonfinite(f"loss at epoch {epoch + 1} batch {i + 1}")
                    optimizer.zero_grad(set_to_none=True)
                else:
                    running += float(loss.detach())
                    count += 1
                bar.update(1)
                if not boundary:
                    continue
                if t.clip_grad_norm:
                    norm = self.accelerator.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                    if norm is not None and not torch.isfinite(torch.as_tensor(norm)):
                        self._nonfinite(f"gradient norm at step {self.state['global_step'] + 1}")
                        optimizer.zero_grad(set_to_none=True)
                        self.state["batch_in_epoch"] = i + 1
                        continue
                optimizer.step()
                self.scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.accelerator.unwrap_model(model), step=self.state["global_step"])
                self.state["global_step"] += 1
                self.state["batch_in_epoch"] = i + 1
                now = time.perf_counter()
                self._account_step(now - tick)
                tick = now
                step = self.state["global_step"]
                if count and step % t.log_every_steps == 0:
                    bar.set_postfix(loss=f"{running / count:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                    if tb is not None:
                        tb.add_scalar("train/loss", running / count, step)
                last_step = step >= self.total_steps
                if (t.save_every_steps and step % t.save_every_steps == 0 and not last_step) or self._stop_signal:
                    self._save("last")
                    if self._stop_signal:
                        raise _Stop()
                if last_step:
                    break
            bar.close()
            record = {"epoch": epoch + 1, "step": self.state["global_step"],
                      "train_loss": running / count if count else float("nan"),
                      "lr": self.scheduler.get_last_lr()[0],
                      "train_minutes": self.state["train_seconds"] / 60}
            last_epoch = self.state["global_step"] >= self.total_steps or epoch + 1 == t.epochs
            stop_early = False
            if last_epoch or (epoch + 1) % max(1, t.eval_every_epochs) == 0:
                val_metrics, _ = self._evaluate("val")
                record.update(val_metrics)
                value = val_metrics.get(self.monitor)
                if value is None:
                    raise TrainingError(f"monitor '{self.monitor}' not among the metrics {sorted(val_metrics)}")
                if self._improved(value):
                    self.state.update(best_metric=value, best_epoch=epoch + 1, epochs_without_improvement=0)
                    self._save("best", weights_only=True)
                else:
                    self.state["epochs_without_improvement"] += 1
                stop_early = bool(t.early_stopping_patience
                                  and self.state["epochs_without_improvement"] >= t.early_stopping_patience)
            self.state["history"].append(record)
            self.state["epoch"], self.state["batch_in_epoch"] = epoch + 1, 0
            if self.main:
                self._log_epoch(record, tb)
            done = stop_early or last_epoch
            self.state["finished"] = bool(done)
            self._save("last")
            if self._stop_signal:
                raise _Stop()
            if stop_early:
                log.info("early stopping after epoch %d (%s did not improve for %d epochs)", epoch + 1,
                         self.monitor, t.early_stopping_patience)
            if done:
                break
        self.state["finished"] = True

    def _nonfinite(self, where: str) -> None:
        self.state["nonfinite_steps"] += 1
        log.warning("non-finite %s: step skipped (%d so far)", where, self.state["nonfinite_steps"])
        if self.state["nonfinite_steps"] > self.cfg.trainer.max_nonfinite_steps:
            raise TrainingError(f"more than {self.cfg.trainer.max_nonfinite_steps} non-finite steps; "
                                "lower the learning rate or check the data")

    def _log_epoch(self, record: dict[str, Any], tb: Any) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record, default=_json_default) + "\n")
        import csv

        keys = sorted({k for r in self.state["history"] for k in r}, key=lambda k: (k != "epoch", k))
        with open(self.run_dir / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.state["history"])
        if tb is not None:
            for k, v in record.items():
                if isinstance(v, float) and k != "epoch":
                    tb.add_scalar(k.replace("_", "/", 1), v, record["epoch"])
        shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
        log.info("epoch %d: %s", record["epoch"], shown)

    def _finish(self) -> None:
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        digest = parameter_digest(model)
        if self.world > 1:
            import torch.distributed as dist

            digests: list[str | None] = [None] * self.world
            dist.all_gather_object(digests, digest)
            if self.main:
                write_json(self.run_dir / "replicas.json", {"world_size": self.world, "digests": digests,
                                                            "identical": len(set(digests)) == 1})
            if len(set(digests)) != 1:
                raise TrainingError(f"replicas diverged: parameter digests {digests}")
        if self.main:
            write_json(self.run_dir / "final_digest.json", {"parameters_sha256": digest})
            plot_history(self.state["history"], self.run_dir / "curves.png", self.monitor)
        self.accelerator.wait_for_everyone()

    def _result(self) -> RunResult:
        return RunResult(self.run_dir, self.state["best_metric"], self.state["best_epoch"], None,
                         self.state["history"])


def _batch_len(pred: dict[str, np.ndarray]) -> int:
    return len(next(iter(pred.values()))) if pred else 1


def plot_history(history: list[dict[str, Any]], path: Path, monitor: str) -> None:
    """Save loss and monitored-metric curves per epoch as a PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train")
    axes[0].plot(epochs, [r.get("val_loss", np.nan) for r in history], label="val")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[0].legend()
    axes[1].plot(epochs, [r.get(monitor, np.nan) for r in history], marker="o")
    axes[1].set(xlabel="epoch", ylabel=monitor, title=monitor)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finetune(cfg: TrainConfig, resume: Literal["auto", "never", "must"] = "auto") -> RunResult:
    """Train one run of `cfg`, then score its best checkpoint on `trainer.evaluate_split` with bootstrap CIs.

    The run resumes from its last checkpoint when one exists (resume='auto'); a run found already
    finished keeps the report its first evaluation saved.
    """
    trainer = Trainer(cfg, resume)
    result = trainer.fit()
    t = cfg.trainer
    if (trainer.trained and trainer.main and t.evaluate_test and t.evaluate_split in trainer.data.datasets
            and (trainer.ckpt_dir / "best").exists()):
        result.test_report = evaluate_run(result.run_dir, split=t.evaluate_split, n_boot=t.n_boot, task=trainer.task,
                                          data=trainer.data, model=trainer.evaluation_model(),
                                          batch_size=cfg.data.eval_batch)
    # The other processes read the report the main process writes.
    trainer.accelerator.wait_for_everyone()
    saved = result.run_dir / f"eval_{t.evaluate_split}.json"
    if result.test_report is None and saved.is_file():
        result.test_report = json.loads(saved.read_text())
    return result


def finetune_seeds(cfg: TrainConfig, n_seeds: int, resume: Literal["auto", "never", "must"] = "auto") -> dict[str, Any]:
    """Repeat a run over seeds seed..seed+n-1; report mean ± sd of each test metric across seeds."""
    base = cfg.run_name or f"{cfg.task}-{cfg.model.name}"
    results = []
    for k in range(n_seeds):
        run_cfg = dataclasses.replace(cfg, seed=cfg.seed + k, run_name=f"{base}/seed{cfg.seed + k}")
        results.append(finetune(run_cfg, resume))
    summary: dict[str, Any] = {"seeds": [cfg.seed + k for k in range(n_seeds)],
                               "runs": [str(r.run_dir) for r in results], "metrics": {}}
    reports = [r.test_report for r in results if r.test_report]
    if reports:
        for name in reports[0]["metrics"]:
            values = np.array([rep["metrics"][name]["value"] for rep in reports], dtype=float)
            summary["metrics"][name] = {"mean": float(np.nanmean(values)),
                                        "sd": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0,
                                        "per_seed": values.tolist(),
                                        "bootstrap_ci_per_seed": [[rep["metrics"][name]["low"],
                                                                   rep["metrics"][name]["high"]] for rep in reports]}
    out = Path(cfg.output_dir) / base / "seeds_summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, summary)
    return summary
