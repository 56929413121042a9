"""EHR data preparation: timelines -> tokenizer -> leakage-free task samples and model inputs.

The patient timelines and their patient-level split come from the dataset format `ehr_timelines`
(`medai.io.datasets.ehr`). `prepare_ehr(..., out_dir)` writes the artifacts the later stages read:
`tokenizer/` (HF fast tokenizer + bins), `splits.parquet` (patient -> split), `samples.parquet`
(patient, task, prediction time, labels, split) and `meta.json` (tasks, condition groups,
classifier layout).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medai.io.datasets import load_dataset
from medai.io.ehr import PatientTimeline
from medai.transforms.ehr import TASK_TOKENS, EHRTokenizer, TaskSample, derive_task_samples, frequent_dx_groups

log = logging.getLogger(__name__)

ALL_TASKS = tuple(TASK_TOKENS)


@dataclass
class EHRDataOptions:
    """What `prepare_ehr` builds: sources, tasks, sequence length, vocabulary and split settings."""

    extra_sources: list[str] = field(default_factory=list)  # more FHIR/MIMIC/MEDS paths or dataset names
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    max_length: int = 512
    n_bins: int = 5
    min_count: int = 1
    dx_top_k: int = 5
    # 100 MIMIC demo patients: a 15% test split would hold 0-2 deaths, so test and val get 20% each
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_seed: int = 0
    pretrain_stride: int | None = None  # pretraining windows start every `stride` tokens (None: max_length)
    max_train_samples: int | None = None  # subsample the train split (CPU budget); val/test stay whole

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASK_TOKENS]
        if unknown:
            raise ValueError(f"unknown EHR tasks {unknown} (known: {', '.join(TASK_TOKENS)})")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")


@dataclass
class PreparedEHR:
    """Everything the EHR tasks need, built from training patients only where it matters."""

    options: EHRDataOptions
    tokenizer: EHRTokenizer
    timelines: dict[str, PatientTimeline]
    splits: dict[str, str]
    samples: list[TaskSample]
    dx_groups: list[str]
    layout: dict[str, tuple[int, int]]

    @property
    def num_labels(self) -> int:
        """Width of the multitask classifier output."""
        return max(stop for _, stop in self.layout.values())

    def samples_of(self, split: str) -> list[TaskSample]:
        """Task samples whose patient is in `split`."""
        return [s for s in self.samples if self.splits[s.patient_id] == split]


def classifier_layout(tasks: Sequence[str], dx_groups: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Task -> [start, stop) block of the classifier output (next_visit_dx: one logit per group)."""
    layout, start = {}, 0
    for task in tasks:
        width = len(dx_groups) if task == "next_visit_dx" else 1
        if width == 0:
            continue
        layout[task] = (start, start + width)
        start += width
    return layout


def prepare_ehr(sources: Sequence[str | Path], options: EHRDataOptions, out_dir: str | Path | None = None) -> PreparedEHR:
    """Read the sources (dataset format `ehr_timelines`: timelines split by patient), fit the tokenizer and
    condition groups on train, derive task samples."""
    data = load_dataset(sources[0], "ehr_timelines", extra_sources=sources[1:],
                        split_fractions=options.split_fractions, split_seed=options.split_seed)
    timelines = {tl.patient_id: tl for tl in data.items}
    splits = {data.items[i].patient_id: name for name, index in data.splits.items() for i in index}
    train = [tl for pid, tl in timelines.items() if splits[pid] == "train"]
    tokenizer = EHRTokenizer(n_bins=options.n_bins, min_count=options.min_count).fit(train)
    dx_groups = frequent_dx_groups(train, options.dx_top_k) if "next_visit_dx" in options.tasks else []
    samples = [s for tl in timelines.values() for s in derive_task_samples(tl, options.tasks, dx_groups)]
    if options.max_train_samples is not None:
        rng = np.random.default_rng(options.split_seed)
        train_idx = [i for i, s in enumerate(samples) if splits[s.patient_id] == "train"]
        drop = set(rng.permutation(train_idx)[options.max_train_samples:].tolist())
        samples = [s for i, s in enumerate(samples) if i not in drop]
    prepared = PreparedEHR(options, tokenizer, timelines, splits, samples, dx_groups,
                           classifier_layout(options.tasks, dx_groups))
    log.info("EHR data: %d patients, %d task samples, vocabulary %d, labels %d", len(timelines), len(samples),
             len(tokenizer), prepared.num_labels)
    if out_dir is not None:
        write_prepared(prepared, out_dir)
    return prepared


def write_prepared(prepared: PreparedEHR, out_dir: str | Path) -> Path:
    """Write tokenizer/, splits.parquet, samples.parquet and meta.json into `out_dir`."""
    import polars as pl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepared.tokenizer.save(out / "tokenizer")
    pl.DataFrame({"patient_id": list(prepared.splits), "split": list(prepared.splits.values())}).write_parquet(
        out / "splits.parquet")
    pl.DataFrame({
        "patient_id": [s.patient_id for s in prepared.samples],
        "task": [s.task for s in prepared.samples],
        "cutoff": [s.cutoff for s in prepared.samples],
        "visit_id": [s.visit_id for s in prepared.samples],
        "labels": [list(s.labels) for s in prepared.samples],
        "split": [prepared.splits[s.patient_id] for s in prepared.samples],
    }).write_parquet(out / "samples.parquet")
    (out / "meta.json").write_text(json.dumps({
        "options": asdict(prepared.options), "dx_groups": prepared.dx_groups,
        "layout": {k: list(v) for k, v in prepared.layout.items()}, "vocab_size": len(prepared.tokenizer),
        "counts": task_counts(prepared),
    }, indent=1, default=str))
    return out


def task_counts(prepared: PreparedEHR) -> dict[str, dict[str, list[int]]]:
    """{task: {split: [samples, positives]}} (positives: any label set, for next_visit_dx)."""
    out: dict[str, dict[str, list[int]]] = {}
    for s in prepared.samples:
        row = out.setdefault(s.task, {}).setdefault(prepared.splits[s.patient_id], [0, 0])
        row[0] += 1
        row[1] += int(s.labels[0] > 0) if len(s.labels) == 1 else int(any(v > 0 for v in s.labels))
    return out


def encode_sample(prepared: PreparedEHR, sample: TaskSample) -> dict[str, Any]:
    """Model inputs for one sample (task token first, events up to the cutoff) with its target block."""
    tl = prepared.timelines[sample.patient_id]
    enc = prepared.tokenizer.encode(prepared.tokenizer.tokenize(tl, cutoff=sample.cutoff, task=sample.task),
                                    prepared.options.max_length)
    start, stop = prepared.layout[sample.task]
    targets = np.zeros(prepared.num_labels, dtype=np.float32)
    mask = np.zeros(prepared.num_labels, dtype=np.float32)
    targets[start:stop] = sample.labels
    mask[start:stop] = 1.0
    enc.update(targets=targets, target_mask=mask, task_index=np.int64(list(prepared.layout).index(sample.task)))
    return enc


def pretraining_windows(prepared: PreparedEHR, split: str) -> list[dict[str, Any]]:
    """Full timelines of `split` patients cut into windows of max_length tokens (each starts with [CLS])."""
    length = prepared.options.max_length
    stride = prepared.options.pretrain_stride or length - 1
    out = []
    for pid, tl in prepared.timelines.items():
        if prepared.splits[pid] != split:
            continue
        enc = prepared.tokenizer.encode(prepared.tokenizer.tokenize(tl))
        body = len(enc["input_ids"]) - 1  # tokens after [CLS], at positions 1..body
        for s in range(1, body + 1, stride):
            keep = np.concatenate([[0], np.arange(s, min(s + length - 1, body + 1))])
            out.append({k: v[keep] for k, v in enc.items()})
    return out
