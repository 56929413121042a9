"""EHR jobs: prepare task data (timelines -> tokenizer -> leakage-free samples), bag-of-codes
baselines, per-task metrics, and token attributions mapped back to a patient's events.

The stages write artifacts the next one reads (`prepare_ehr(..., out_dir)`): `tokenizer/` (HF
fast tokenizer + bins), `splits.parquet` (patient -> split), `samples.parquet` (patient, task,
prediction time, labels, split) and `meta.json` (tasks, condition groups, classifier layout).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medai.io.datasets.ehr import split_patients
from medai.io.ehr import EHRTables, PatientTimeline, ingest
from medai.transforms.ehr import (
    TASK_TOKENS,
    EHRTokenizer,
    TaskSample,
    derive_task_samples,
    frequent_dx_groups,
)

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


def resolve_source(source: str | Path) -> Path:
    """A dataset name of medai.io.data.DATASETS or a path -> an existing path."""
    from medai.io.data import DATASETS, dataset_path

    if isinstance(source, str) and source in DATASETS:
        return dataset_path(source)
    path = Path(source)
    if not path.exists():
        from medai.errors import DatasetNotFoundError

        raise DatasetNotFoundError(path, "EHR source")
    return path


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
    """Ingest sources, split patients, fit the tokenizer and condition groups on train, derive task samples."""
    tables: EHRTables = ingest([resolve_source(s) for s in sources])
    timelines = {tl.patient_id: tl for tl in tables.timelines()}
    # Stratified by death so the few deaths (15 in hospital among 100 MIMIC demo patients) reach every split.
    strata = {pid: str(tl.death_time is not None) for pid, tl in timelines.items()}
    splits = split_patients(timelines, options.split_fractions, options.split_seed, strata)
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


# --------------------------------------------------------------------------------------------
# Metrics per task
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Bag-of-codes baselines (scikit-learn)
# --------------------------------------------------------------------------------------------


def bag_of_codes(encoded: Sequence[dict[str, Any]], vocab_size: int):
    """Sparse (n, vocab) counts of the input tokens of each encoded sample (the models' inputs)."""
    from scipy.sparse import csr_matrix

    rows, cols = [], []
    for i, enc in enumerate(encoded):
        ids = enc["input_ids"]
        rows.append(np.full(len(ids), i))
        cols.append(ids)
    data = np.ones(sum(len(r) for r in rows), dtype=np.float32)
    matrix = csr_matrix((data, (np.concatenate(rows), np.concatenate(cols))), shape=(len(encoded), vocab_size))
    matrix.sum_duplicates()
    return matrix


def run_code_count_baselines(prepared: PreparedEHR, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Logistic regression and gradient boosting per task (per group) on bag-of-codes; test predictions.

    Same samples, splits and inputs (the truncated pre-cutoff tokens) as the neural models;
    one model per task output, fit on train (val is not needed: fixed standard settings).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    enc = {split: [encode_sample(prepared, s) for s in prepared.samples_of(split)] for split in ("train", "test")}
    x = {split: bag_of_codes(enc[split], len(prepared.tokenizer)) for split in enc}
    # Codes present in at least 3 training samples only (chosen on train): keeps boosting fast on 2 cores.
    used = np.flatnonzero(np.asarray((x["train"] > 0).sum(0)).ravel() >= 3)
    x = {split: m[:, used] for split, m in x.items()}
    x_log = {split: x[split].log1p() for split in x}
    results: dict[str, dict[str, np.ndarray]] = {}
    for name in ("logistic_regression", "gradient_boosting"):
        probs = np.zeros((len(enc["test"]), prepared.num_labels), dtype=np.float32)
        for k, (task, (start, stop)) in enumerate(prepared.layout.items()):
            tr = np.array([e["task_index"] == k for e in enc["train"]])
            te = np.array([e["task_index"] == k for e in enc["test"]])
            for j in range(start, stop):
                y = np.array([e["targets"][j] for e in enc["train"]])[tr]
                if tr.sum() == 0 or te.sum() == 0:
                    continue
                if y.min() == y.max():
                    probs[te, j] = y[0]  # one class in train: the only honest constant
                    continue
                if name == "logistic_regression":
                    model = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
                    model.fit(x_log["train"][tr], y)
                    probs[te, j] = model.predict_proba(x_log["test"][te])[:, 1]
                else:
                    model = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, random_state=seed)
                    model.fit(x["train"][tr].toarray(), y)
                    probs[te, j] = model.predict_proba(x["test"][te].toarray())[:, 1]
        results[name] = {
            "task_index": np.array([e["task_index"] for e in enc["test"]]),
            "targets": np.stack([e["targets"] for e in enc["test"]]),
            "probs": probs,
        }
    return results


# --------------------------------------------------------------------------------------------
# Explanations
# --------------------------------------------------------------------------------------------


def explain_sample(model, prepared: PreparedEHR, sample: TaskSample, steps: int = 32, output: int | None = None
                   ) -> list[dict[str, Any]]:
    """Integrated gradients of one task logit w.r.t. the concept embeddings, per token, mapped to events.

    Baseline: the [PAD] embedding (zero vector) for every token; the attribution of a token is
    sum_d (x - x0)_d · mean_alpha dF/dx_d (Sundararajan et al. 2017). Returns one row per token
    (token, attribution, and the event's time/kind/system/code/value when the token is an event),
    in sequence order; completeness error is logged.
    """
    import torch

    from medai.transforms.ehr import pad_batch

    tl = prepared.timelines[sample.patient_id]
    tokenized = prepared.tokenizer.tokenize(tl, cutoff=sample.cutoff, task=sample.task)
    enc = prepared.tokenizer.encode(tokenized, prepared.options.max_length)
    batch = pad_batch([enc])
    start, _ = prepared.layout[sample.task]
    output = start if output is None else output
    model.eval()
    emb = model.embeddings.concept_embeddings(batch["input_ids"]).detach()
    baseline = torch.zeros_like(emb)
    alphas = torch.linspace(1.0 / steps, 1.0, steps)
    total = torch.zeros_like(emb)
    for a in alphas:
        x = (baseline + a * (emb - baseline)).requires_grad_(True)
        logit = model.classify(batch, concept_embeds=x)[0, output]
        (grad,) = torch.autograd.grad(logit, x)
        total += grad
    attributions = ((emb - baseline) * total / steps).sum(-1)[0]
    with torch.no_grad():
        f_x = model.classify(batch)[0, output]
        f_0 = model.classify(batch, concept_embeds=baseline)[0, output]
    log.info("integrated gradients: sum %.4f vs F(x)-F(0) %.4f", float(attributions.sum()), float(f_x - f_0))
    id_to_token = {i: t for t, i in prepared.tokenizer.vocab.items()}
    rows = []
    for pos, (tid, ev_idx) in enumerate(zip(enc["input_ids"].tolist(), enc["event_index"].tolist())):
        row: dict[str, Any] = {"position": pos, "token": id_to_token.get(tid, "?"), "attribution": float(attributions[pos])}
        if ev_idx >= 0:
            ev = tl.events[ev_idx]
            row.update(time=ev.time, kind=ev.kind, system=ev.system, code=ev.code, value=ev.numeric_value,
                       unit=ev.unit, text_value=ev.text_value)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# The whole experiment, one command: pretrain + multitask fine-tune each model, baselines, report
# --------------------------------------------------------------------------------------------


@dataclass
class NeuralModelSpec:
    """A registered sequence model to pretrain and fine-tune."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageSpec:
    """Optimisation settings of one stage (pretraining or fine-tuning)."""

    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    limit_train_batches: int | None = None
    warmup_ratio: float = 0.05


@dataclass
class EHRExperimentConfig:
    """`medai ehr experiment CONFIG`: data, models, stages, and where results go."""

    data_path: Path
    options: dict[str, Any] = field(default_factory=dict)
    models: list[NeuralModelSpec] = field(default_factory=lambda: [
        NeuralModelSpec("ehrmamba_small"), NeuralModelSpec("ehr_transformer_small")])
    pretrain: StageSpec = field(default_factory=StageSpec)
    finetune: StageSpec = field(default_factory=lambda: StageSpec(epochs=4))
    baselines: bool = True
    n_boot: int = 1000
    seed: int = 0
    output_dir: Path = Path("runs/ehr")


def load_experiment_config(path: str | Path, overrides: Sequence[str] = ()) -> EHRExperimentConfig:
    """Load an EHR experiment YAML strictly; `${MEDAI_DATA}` stands for the shared data root."""
    from medai.config import from_dict, load_config
    from medai.io.data import data_root

    cfg = load_config(EHRExperimentConfig, path, overrides)
    cfg.data_path = Path(str(cfg.data_path).replace("${MEDAI_DATA}", str(data_root())))
    from medai.pipelines.tasks.ehr import EHRTaskOptions

    from_dict(EHRTaskOptions, cfg.options, source=path, prefix="options")  # fail early on a typo
    return cfg


def _train_config(cfg: EHRExperimentConfig, task: str, spec: NeuralModelSpec, stage: StageSpec, run_name: str,
                  pretrained: str | None, monitor: str, mode: str, options: dict[str, Any]):
    from medai.pipelines.train_config import (DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig,
                                              TrainerConfig)

    return TrainConfig(
        task=task,
        model=ModelConfig(name=spec.name, pretrained=pretrained, kwargs=dict(spec.kwargs)),
        data=DataConfig(path=cfg.data_path, batch_size=stage.batch_size, options=dict(options)),
        optim=OptimConfig(lr=stage.lr, weight_decay=stage.weight_decay),
        schedule=ScheduleConfig(name="cosine", warmup_ratio=stage.warmup_ratio),
        trainer=TrainerConfig(epochs=stage.epochs, limit_train_batches=stage.limit_train_batches, monitor=monitor,
                              monitor_mode=mode, n_boot=cfg.n_boot, log_every_steps=5),
        seed=cfg.seed, output_dir=cfg.output_dir, run_name=run_name,
    )


def run_ehr_experiment(cfg: EHRExperimentConfig) -> dict[str, Any]:
    """Pretrain + multitask fine-tune each model through the engine, fit the bag-of-codes baselines on
    the same split, and write report.json / report.md (AUROC, AUPRC with 95% bootstrap CIs per task)
    plus an integrated-gradients explanation of one test prediction. Reruns resume finished stages."""
    import time

    import torch

    from medai.models import create_model
    from medai.pipelines.checkpointing import run_weights
    from medai.pipelines.finetune import finetune, write_json
    from medai.pipelines.metrics import bootstrap_ci, paired_bootstrap
    from medai.pipelines.tasks.ehr import EHRTaskOptions

    from medai.config import from_dict

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(cfg.options, prepared_dir=str(out / "prepared"))
    task_options = from_dict(EHRTaskOptions, options)
    prepared = prepare_ehr([cfg.data_path, *task_options.extra_sources], task_options, out_dir=out / "prepared")
    metrics_fn = lambda p: multitask_metrics(p, prepared.layout)  # noqa: E731
    results: dict[str, Any] = {"counts": task_counts(prepared), "layout": {k: list(v) for k, v in prepared.layout.items()},
                               "dx_groups": prepared.dx_groups, "vocab_size": len(prepared.tokenizer), "models": {}}
    test_preds: dict[str, dict[str, np.ndarray]] = {}
    finetuned: dict[str, Path] = {}
    for spec in cfg.models:
        t0 = time.time()
        pre = finetune(_train_config(cfg, "ehr_pretrain", spec, cfg.pretrain, f"{spec.name}/pretrain", None,
                                     "val_nll", "min", options))
        weights = run_weights(pre.run_dir)
        fine = finetune(_train_config(cfg, "ehr_multitask", spec, cfg.finetune, f"{spec.name}/multitask",
                                      str(weights), "val_mean_auroc", "max", options))
        test_preds[spec.name] = dict(np.load(fine.run_dir / "predictions_test.npz"))
        finetuned[spec.name] = fine.run_dir
        pre_test = json.loads((pre.run_dir / "eval_test.json").read_text())["metrics"] if (pre.run_dir / "eval_test.json").is_file() else {}
        model = create_model(spec.name, **{"vocab_size": len(prepared.tokenizer), "num_labels": prepared.num_labels,
                                           **spec.kwargs})
        results["models"][spec.name] = {
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "pretrain_run": str(pre.run_dir), "finetune_run": str(fine.run_dir),
            "pretrain_test": {k: v["value"] for k, v in pre_test.items()},
            "best_val_mean_auroc": fine.best_metric, "best_epoch": fine.best_epoch,
            "wall_s": round(time.time() - t0, 1),
            "test": fine.test_report["metrics"] if fine.test_report else
            bootstrap_ci(metrics_fn, test_preds[spec.name], n_boot=cfg.n_boot, seed=cfg.seed),
        }
    if cfg.baselines:
        t0 = time.time()
        for name, preds in run_code_count_baselines(prepared, seed=cfg.seed).items():
            test_preds[name] = preds
            results["models"][name] = {"test": bootstrap_ci(metrics_fn, preds, n_boot=cfg.n_boot, seed=cfg.seed),
                                       "wall_s": round(time.time() - t0, 1)}
    names = list(test_preds)
    reference = names[0] if names else None
    if reference:
        results["paired_vs_" + reference] = {
            other: {k: v for k, v in paired_bootstrap(metrics_fn, test_preds[reference], test_preds[other],
                                                      n_boot=cfg.n_boot, seed=cfg.seed).items() if k.startswith("mean_")}
            for other in names[1:]
            if np.array_equal(test_preds[reference]["task_index"], test_preds[other]["task_index"])
        }
    if cfg.models:
        spec = cfg.models[0]
        model = create_model(spec.name, pretrained=str(run_weights(finetuned[spec.name])),
                             vocab_size=len(prepared.tokenizer), num_labels=prepared.num_labels, **spec.kwargs)
        results["explanation"] = write_explanation(model, prepared, test_preds[spec.name], out)
        del model
        torch.set_grad_enabled(True)
    write_json(out / "report.json", results)
    (out / "report.md").write_text(report_markdown(results, prepared))
    return results


def write_explanation(model, prepared: PreparedEHR, preds: dict[str, np.ndarray], out: Path, top: int = 15) -> dict:
    """Explain the test sample with the highest predicted in-hospital mortality (else the first task)."""
    import polars as pl

    tests = prepared.samples_of("test")
    task = "mortality_inhospital" if "mortality_inhospital" in prepared.layout else next(iter(prepared.layout))
    k = list(prepared.layout).index(task)
    start, _ = prepared.layout[task]
    idx = [i for i, s in enumerate(tests) if s.task == task]
    best = max(idx, key=lambda i: preds["probs"][i, start])
    rows = explain_sample(model, prepared, tests[best])
    frame = pl.DataFrame([{k2: (str(v) if k2 == "time" else v) for k2, v in r.items()} for r in rows])
    frame.write_csv(out / "explanation.csv")
    ranked = sorted((r for r in rows if "code" in r), key=lambda r: -abs(r["attribution"]))[:top]
    lines = [f"Sample: task {task}, prediction time {tests[best].cutoff:%Y-%m-%d %H:%M} UTC (shifted MIMIC date), "
             f"predicted risk {preds['probs'][best, start]:.3f}, label {tests[best].labels[0]:.0f}, task index {k}.",
             "", "| time (UTC) | kind | code | value | attribution |", "|---|---|---|---|---|"]
    for r in ranked:
        value = "" if r.get("value") is None else f"{r['value']:g} {r.get('unit') or ''}".strip()
        lines.append(f"| {r['time']:%Y-%m-%d %H:%M} | {r['kind']} | {r['system']}/{r['code']} | {value} | {r['attribution']:+.4f} |")
    (out / "explanation.md").write_text("\n".join(lines) + "\n")
    return {"task": task, "patient_index_in_test": best, "top_events": len(ranked), "file": str(out / "explanation.md")}


def report_markdown(results: dict[str, Any], prepared: PreparedEHR) -> str:
    """Per-task AUROC / AUPRC [95% CI] of every model, as a Markdown table."""
    def cell(metrics: dict, key: str) -> str:
        m = metrics.get(key)
        if not m or not np.isfinite(m["value"]):
            return "n/a"
        return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"

    lines = ["| task | test n (pos) | " + " | ".join(results["models"]) + " |",
             "|---|---|" + "---|" * len(results["models"])]
    counts = results["counts"]
    for task in [*prepared.layout, "mean"]:
        n = counts.get(task, {}).get("test", ["", ""])
        for metric in ("auroc", "auprc"):
            key = f"{task}_{metric}"
            lines.append(f"| {task} {metric.upper()} | {n[0]} ({n[1]}) | "
                         + " | ".join(cell(m["test"], key) for m in results["models"].values()) + " |")
    return "\n".join(lines) + "\n"
