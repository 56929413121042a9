"""EHR tasks for the fine-tuning engine: next-token pretraining and multitask prompted fine-tuning.

Both build the same prepared data from the same options (`pipelines.ehr_data.prepare_ehr`: the
dataset format `ehr_timelines` split by patient, tokenizer fit on training patients), so a
pretraining run's weights load into the fine-tuning model (same vocabulary and classifier width). `data.path` is the main EHR source
(MIMIC-IV table folder, FHIR files or folder, MEDS folder); `data.options.extra_sources` adds more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from medai.pipelines.ehr_data import EHRDataOptions, encode_sample, prepare_ehr, pretraining_windows
from medai.pipelines.tasks import Task, TaskData, register_task


@dataclass
class EHRTaskOptions(EHRDataOptions):
    """EHRDataOptions plus where to write the prepared artifacts (tokenizer, samples, splits)."""

    prepared_dir: str | None = None


class _Encoded(Dataset):
    """Pre-encoded items (numpy arrays per key)."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch; targets and masks stacked when present."""
    from medai.transforms.ehr import pad_batch

    batch = pad_batch(items)
    for key in ("targets", "target_mask"):
        if key in items[0]:
            batch[key] = torch.as_tensor(np.stack([it[key] for it in items]))
    if "task_index" in items[0]:
        batch["task_index"] = torch.as_tensor(np.array([it["task_index"] for it in items]))
    return batch


def multitask_metrics(preds: dict[str, np.ndarray], layout: dict[str, tuple[int, int]]) -> dict[str, float]:
    """AUROC/AUPRC per task (macro over groups for next_visit_dx) and their means over tasks.

    `preds` holds per-item `task_index`, `probs` and `targets` (num_labels wide). A task whose
    items hold one class only gets NaN (reported, not hidden).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    out: dict[str, float] = {}
    for k, (task, (start, stop)) in enumerate(layout.items()):
        sel = preds["task_index"] == k
        y, p = preds["targets"][sel, start:stop], preds["probs"][sel, start:stop]
        if stop - start > 1:
            keep = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
            y, p = y[:, keep], p[:, keep]
            ok = len(keep) > 0
        else:
            y, p = y[:, 0], p[:, 0]
            ok = 0 < y.sum() < len(y)
        out[f"{task}_auroc"] = float(roc_auc_score(y, p, average="macro")) if ok else float("nan")
        out[f"{task}_auprc"] = float(average_precision_score(y, p, average="macro")) if ok else float("nan")
    for metric in ("auroc", "auprc"):
        values = [v for key, v in out.items() if key.endswith(metric) and np.isfinite(v)]
        out[f"mean_{metric}"] = float(np.mean(values)) if values else float("nan")
    return out


def _options(task: Task) -> EHRTaskOptions:
    from medai.config import from_dict

    opts = task.options
    return opts if isinstance(opts, EHRTaskOptions) else from_dict(EHRTaskOptions, dict(opts or {}))


def _prepare(task: Task, data_cfg: Any):
    opts = _options(task)
    return prepare_ehr([Path(data_cfg.path), *opts.extra_sources], opts, out_dir=opts.prepared_dir)


@register_task("ehr_pretrain")
class EHRPretrainTask(Task):
    """Next-token prediction on windows of whole patient timelines (EHRMamba's pretraining)."""

    default_monitor = "val_nll"
    default_monitor_mode = "min"
    options_cls = EHRTaskOptions

    def setup(self, data_cfg: Any, seed: int) -> TaskData:
        """Windows of max_length tokens from each split's patients."""
        prepared = _prepare(self, data_cfg)
        datasets = {split: _Encoded(pretraining_windows(prepared, split)) for split in ("train", "val", "test")}
        info = {"model_kwargs": {"vocab_size": len(prepared.tokenizer), "num_labels": prepared.num_labels},
                "layout": {k: list(v) for k, v in prepared.layout.items()}, "windows": {k: len(v) for k, v in datasets.items()}}
        return TaskData(datasets, info, collate_fn=collate)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean next-token cross-entropy."""
        loss = _unwrap(model).pretraining_loss(batch)
        return loss, {"nll": float(loss.detach())}

    def predict(self, model: nn.Module, batch: Any) -> dict[str, np.ndarray]:
        """Per window: summed negative log-likelihood and number of predicted tokens."""
        m = _unwrap(model)
        hidden = m.encode(batch)
        logits = m.next_token_logits(hidden[:, :-1]).float()
        target = batch["input_ids"][:, 1:]
        mask = batch["attention_mask"][:, 1:].float()
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none") * mask
        correct = (logits.argmax(-1) == target).float() * mask
        return {"nll_sum": nll.sum(1).cpu().numpy(), "n_tokens": mask.sum(1).cpu().numpy(),
                "correct": correct.sum(1).cpu().numpy()}

    def metrics(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """Token-weighted NLL, perplexity and next-token accuracy."""
        n = float(predictions["n_tokens"].sum())
        nll = float(predictions["nll_sum"].sum()) / max(n, 1.0)
        return {"nll": nll, "perplexity": float(np.exp(min(nll, 50.0))),
                "next_token_accuracy": float(predictions["correct"].sum()) / max(n, 1.0)}


@register_task("ehr_multitask")
class EHRMultitaskTask(Task):
    """All prediction tasks at once; the task token at the start of each sequence says which."""

    default_monitor = "val_mean_auroc"
    default_monitor_mode = "max"
    options_cls = EHRTaskOptions

    def setup(self, data_cfg: Any, seed: int) -> TaskData:
        """Encoded task samples per split (inputs end at each sample's prediction time)."""
        prepared = _prepare(self, data_cfg)
        self.layout = prepared.layout
        datasets = {split: _Encoded([encode_sample(prepared, s) for s in prepared.samples_of(split)])
                    for split in ("train", "val", "test")}
        info = {"model_kwargs": {"vocab_size": len(prepared.tokenizer), "num_labels": prepared.num_labels},
                "layout": {k: list(v) for k, v in prepared.layout.items()}, "dx_groups": prepared.dx_groups,
                "samples": {k: len(v) for k, v in datasets.items()}}
        return TaskData(datasets, info, collate_fn=collate)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Binary cross-entropy on each sample's own task block only."""
        logits = model(batch).float()
        mask = batch["target_mask"]
        loss = (F.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="none") * mask).sum() / mask.sum()
        return loss, {"bce": float(loss.detach())}

    def predict(self, model: nn.Module, batch: Any) -> dict[str, np.ndarray]:
        """Per sample: task index, targets and probabilities (all classifier outputs)."""
        probs = torch.sigmoid(model(batch).float())
        return {"task_index": batch["task_index"].cpu().numpy(), "targets": batch["targets"].cpu().numpy(),
                "probs": probs.cpu().numpy()}

    def metrics(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """AUROC/AUPRC per task and their means."""
        return multitask_metrics(predictions, self.layout)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
