"""Patient timelines -> EHRMamba token sequences (Odyssey style), and prediction tasks without look-ahead.

A sequence reads `[task or CLS] [VS] event ... [VE] [W_2] [VS] ... [VE]`:

- concept tokens are `SYSTEM/code` (`ICD10CM/I10`, `LOINC/2345-7`); a numeric lab/observation
  value is quantized into per-code quantile bins fitted on training data: `LOINC/2345-7_Q3`;
- `[VS]`/`[VE]` open and close a visit; a visit still open at the prediction time gets no `[VE]`;
- between visits an interval token says how long the gap was: `[W_0]`..`[W_3]` (weeks, under
  28 days), `[M_0]`..`[M_12]` (months of 30 days), `[LT]` (over a year);
- the first token is `[CLS]` for pretraining or a task token (`[MOR_INHOSP]` ...) for prompted
  fine-tuning.

Per token the encoder also returns what EHRMamba embeds: `type_ids` (see TOKEN_TYPES), `ages`
(years), `time_stamps` (days since 1970-01-01 UTC), `visit_orders` (1-based visit index, 0 for
tokens outside visits) and `visit_segments` (1/2 alternating per visit, 0 outside). The vocabulary
and lab bins come from training timelines only; unseen codes map to `[UNK]`. The tokenizer saves
and loads as a Hugging Face fast tokenizer (`tokenizer.json` + `ehr_tokenizer.json` for bins).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medai.errors import MedaiError
from medai.io.ehr import Event, PatientTimeline, Visit

log = logging.getLogger(__name__)

PAD, UNK, CLS, MASK, VS, VE = "[PAD]", "[UNK]", "[CLS]", "[MASK]", "[VS]", "[VE]"
WEEK_TOKENS = tuple(f"[W_{i}]" for i in range(4))
MONTH_TOKENS = tuple(f"[M_{i}]" for i in range(13))
LONG_TERM = "[LT]"
# Prompted fine-tuning: the task token takes [CLS]'s place at the start of the sequence.
TASK_TOKENS: dict[str, str] = {
    "mortality_inhospital": "[MOR_INHOSP]",
    "mortality_30d": "[MOR_30D]",
    "los_gt_7d": "[LOS_7D]",
    "readmission_30d": "[REA_30D]",
    "next_visit_dx": "[NEXT_DX]",
}
SPECIAL_TOKENS = (PAD, UNK, CLS, MASK, VS, VE, *WEEK_TOKENS, *MONTH_TOKENS, LONG_TERM, *TASK_TOKENS.values())

# token type ids (the embedding table size is len(TOKEN_TYPES))
TOKEN_TYPES: dict[str, int] = {
    "pad": 0, "cls": 1, "task": 2, "visit_start": 3, "visit_end": 4, "interval": 5,
    "condition": 6, "diagnosis": 7, "observation": 8, "lab": 9, "medication": 10, "procedure": 11,
    "immunization": 12, "unk": 13,
}
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SECONDS_PER_DAY = 86400.0


class TokenizerError(MedaiError, ValueError):
    """The tokenizer is used before fitting, or its files are incomplete; names the file."""


def interval_token(gap: timedelta) -> str:
    """The Odyssey time-interval token for the gap between two visits."""
    days = max(gap.total_seconds(), 0.0) / SECONDS_PER_DAY
    if days < 28:
        return WEEK_TOKENS[int(days // 7)]
    months = int(days // 30)
    if months <= 12:
        return MONTH_TOKENS[months]
    return LONG_TERM


def _days(t: datetime) -> float:
    return t.timestamp() / SECONDS_PER_DAY


@dataclass
class TokenizedTimeline:
    """A patient's tokens with per-token features; `event_index` points back into timeline.events."""

    patient_id: str
    tokens: list[str] = field(default_factory=list)
    type_ids: list[int] = field(default_factory=list)
    ages: list[float] = field(default_factory=list)
    time_stamps: list[float] = field(default_factory=list)
    visit_orders: list[int] = field(default_factory=list)
    visit_segments: list[int] = field(default_factory=list)
    event_index: list[int] = field(default_factory=list)

    def append(self, token: str, type_id: int, age: float, stamp: float, order: int, segment: int, index: int = -1) -> None:
        """Add one token and its features."""
        self.tokens.append(token)
        self.type_ids.append(type_id)
        self.ages.append(age)
        self.time_stamps.append(stamp)
        self.visit_orders.append(order)
        self.visit_segments.append(segment)
        self.event_index.append(index)

    def __len__(self) -> int:
        return len(self.tokens)


def _top_visit(visit_id: str | None, by_id: dict[str, Visit]) -> str | None:
    """Follow partOf links up to the admission (ICU stays belong to their hospital stay)."""
    seen = set()
    while visit_id is not None and visit_id in by_id and by_id[visit_id].parent_visit_id and visit_id not in seen:
        seen.add(visit_id)
        parent = by_id[visit_id].parent_visit_id
        if parent not in by_id:
            break
        visit_id = parent
    return visit_id


def group_into_visits(timeline: PatientTimeline) -> list[tuple[Visit, list[int]]]:
    """Return (visit, indices of its events) in time order; events outside any visit get a day visit.

    ICU stays merge into their admission. An event with no (known) visit joins the top-level visit
    whose period contains it, else a pseudo visit for its calendar day (UTC).
    """
    by_id = {v.visit_id: v for v in timeline.visits}
    tops = [v for v in timeline.visits if not (v.parent_visit_id and v.parent_visit_id in by_id) and v.start is not None]
    groups: dict[str, list[int]] = {v.visit_id: [] for v in tops}
    visit_of: dict[str, Visit] = {v.visit_id: v for v in tops}
    for i, ev in enumerate(timeline.events):
        vid = _top_visit(ev.visit_id, by_id)
        if vid not in groups:
            vid = next((v.visit_id for v in tops if v.start <= ev.time <= (v.end or v.start)), None)
        if vid is None:
            vid = f"day:{ev.time:%Y-%m-%d}"
            if vid not in groups:
                groups[vid] = []
                visit_of[vid] = Visit(vid, ev.time, ev.time, "DAY")
        groups[vid].append(i)
        v = visit_of[vid]
        if v.visit_class == "DAY" and ev.time > (v.end or ev.time):
            visit_of[vid] = Visit(vid, v.start, ev.time, "DAY")
    ordered = sorted(visit_of.values(), key=lambda v: (v.start, v.visit_id))
    return [(v, groups[v.visit_id]) for v in ordered if groups[v.visit_id] or v.visit_class != "DAY"]


class EHRTokenizer:
    """Odyssey-style EHR tokenizer: fit on training timelines, encode with an optional cutoff."""

    def __init__(self, n_bins: int = 5, min_count: int = 1):
        self.n_bins, self.min_count = n_bins, min_count
        self.vocab: dict[str, int] = {}
        self.bin_edges: dict[str, list[float]] = {}
        self._fast = None

    # ---- fitting ------------------------------------------------------------------------
    @staticmethod
    def concept(ev: Event) -> str:
        """The concept part of an event's token: `SYSTEM/code` (whitespace removed)."""
        return f"{ev.system}/{ev.code}".replace(" ", "_")

    def fit(self, timelines: Iterable[PatientTimeline]) -> "EHRTokenizer":
        """Build the vocabulary and per-code value bins from training timelines only."""
        values: dict[str, list[float]] = {}
        counts: Counter[str] = Counter()
        timelines = list(timelines)
        for tl in timelines:
            for ev in tl.events:
                c = self.concept(ev)
                if ev.numeric_value is not None and math.isfinite(ev.numeric_value):
                    values.setdefault(c, []).append(ev.numeric_value)
        for c, vals in values.items():
            arr = np.asarray(vals)
            qs = np.quantile(arr, np.linspace(0, 1, self.n_bins + 1)[1:-1])
            # Edges above the minimum only, so repeated values (or a single one) fall into Q0 first.
            self.bin_edges[c] = sorted(set(float(q) for q in qs if q > arr.min()))
        for tl in timelines:
            for ev in tl.events:
                counts[self.event_token(ev)] += 1
        vocab = list(SPECIAL_TOKENS) + sorted(t for t, n in counts.items() if n >= self.min_count)
        self.vocab = {t: i for i, t in enumerate(vocab)}
        self._fast = None
        log.info("EHR vocabulary: %d tokens (%d concepts with value bins)", len(self.vocab), len(self.bin_edges))
        return self

    def event_token(self, ev: Event) -> str:
        """The token for one event: its concept, with a quantile bin when it has a numeric value."""
        c = self.concept(ev)
        edges = self.bin_edges.get(c)
        if ev.numeric_value is None or edges is None or not math.isfinite(ev.numeric_value):
            return c
        return f"{c}_Q{bisect.bisect_right(edges, ev.numeric_value)}"

    # ---- tokenizing ---------------------------------------------------------------------
    def tokenize(
        self, timeline: PatientTimeline, cutoff: datetime | None = None, task: str | None = None
    ) -> TokenizedTimeline:
        """Tokens of `timeline` using only events at or before `cutoff`; the first token is CLS or the task's."""
        if task is not None and task not in TASK_TOKENS:
            raise TokenizerError(f"unknown task '{task}' (known: {', '.join(TASK_TOKENS)})")
        out = TokenizedTimeline(timeline.patient_id)
        visits = group_into_visits(timeline)
        first_time = next((v.start for v, _ in visits if v.start is not None), None)
        head_time = first_time or cutoff or EPOCH

        birth_days = _days(timeline.birth_time) if timeline.birth_time is not None else None

        def age(t: datetime) -> float:
            return (_days(t) - birth_days) / 365.25 if birth_days is not None else 0.0

        head = TASK_TOKENS[task] if task else CLS
        out.append(head, TOKEN_TYPES["task" if task else "cls"], age(head_time), _days(head_time), 0, 0)
        prev_end: datetime | None = None
        order = 0
        for visit, idx in visits:
            start = visit.start
            if cutoff is not None and start > cutoff:
                break
            events = [i for i in idx if cutoff is None or timeline.events[i].time <= cutoff]
            order += 1
            segment = 1 if order % 2 else 2
            if prev_end is not None:
                out.append(interval_token(start - prev_end), TOKEN_TYPES["interval"], age(prev_end), _days(prev_end), 0, 0)
            out.append(VS, TOKEN_TYPES["visit_start"], age(start), _days(start), order, segment)
            for i in events:
                ev = timeline.events[i]
                out.append(self.event_token(ev), TOKEN_TYPES.get(ev.kind, TOKEN_TYPES["unk"]), age(ev.time),
                           _days(ev.time), order, segment, i)
            end = visit.end or (timeline.events[events[-1]].time if events else start)
            if cutoff is None or end <= cutoff:
                out.append(VE, TOKEN_TYPES["visit_end"], age(end), _days(end), order, segment)
                prev_end = end
            else:
                break  # the visit is still open at the prediction time: nothing later exists yet
        return out

    def encode(self, tokenized: TokenizedTimeline, max_length: int | None = None) -> dict[str, np.ndarray]:
        """Ids and features as arrays; longer sequences keep the head token and the most recent rest."""
        if not self.vocab:
            raise TokenizerError("the tokenizer has no vocabulary: call fit() or load() first")
        unk = self.vocab[UNK]
        ids = [self.vocab.get(t, unk) for t in tokenized.tokens]
        feats = {
            "input_ids": np.asarray(ids, dtype=np.int64),
            "type_ids": np.asarray(tokenized.type_ids, dtype=np.int64),
            "ages": np.asarray(tokenized.ages, dtype=np.float32),
            "time_stamps": np.asarray(tokenized.time_stamps, dtype=np.float32),
            "visit_orders": np.asarray(tokenized.visit_orders, dtype=np.int64),
            "visit_segments": np.asarray(tokenized.visit_segments, dtype=np.int64),
            "event_index": np.asarray(tokenized.event_index, dtype=np.int64),
        }
        if max_length is not None and len(ids) > max_length:
            keep = np.concatenate([[0], np.arange(len(ids) - max_length + 1, len(ids))])
            feats = {k: v[keep] for k, v in feats.items()}
        # Unknown-type tokens mapped to UNK are also typed 'unk' so the model sees them as such.
        feats["type_ids"] = np.where(feats["input_ids"] == unk, TOKEN_TYPES["unk"], feats["type_ids"])
        return feats

    @property
    def pad_id(self) -> int:
        """Id of [PAD] (always 0)."""
        return self.vocab[PAD]

    def __len__(self) -> int:
        return len(self.vocab)

    # ---- Hugging Face fast tokenizer ------------------------------------------------------
    def hf_tokenizer(self):
        """A `transformers.PreTrainedTokenizerFast` over the same vocabulary (whitespace-split tokens)."""
        if self._fast is None:
            from tokenizers import Tokenizer, models, pre_tokenizers
            from transformers import PreTrainedTokenizerFast

            if not self.vocab:
                raise TokenizerError("the tokenizer has no vocabulary: call fit() or load() first")
            core = Tokenizer(models.WordLevel(vocab=dict(self.vocab), unk_token=UNK))
            core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
            self._fast = PreTrainedTokenizerFast(
                tokenizer_object=core, unk_token=UNK, pad_token=PAD, cls_token=CLS, mask_token=MASK,
                additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, UNK, CLS, MASK)],
            )
        return self._fast

    def save(self, directory: str | Path) -> Path:
        """Save as a Hugging Face fast tokenizer plus `ehr_tokenizer.json` (bins, settings)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer().save_pretrained(str(out))
        (out / "ehr_tokenizer.json").write_text(json.dumps(
            {"n_bins": self.n_bins, "min_count": self.min_count, "bin_edges": self.bin_edges}, indent=1, sort_keys=True))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "EHRTokenizer":
        """Load a tokenizer saved by `save` (vocabulary from tokenizer.json via transformers)."""
        from transformers import PreTrainedTokenizerFast

        base = Path(directory)
        meta_path = base / "ehr_tokenizer.json"
        if not meta_path.is_file() or not (base / "tokenizer.json").is_file():
            raise TokenizerError(f"{base}: not an EHR tokenizer folder (needs tokenizer.json and ehr_tokenizer.json)")
        meta = json.loads(meta_path.read_text())
        tok = cls(n_bins=meta["n_bins"], min_count=meta["min_count"])
        tok.bin_edges = {k: list(v) for k, v in meta["bin_edges"].items()}
        fast = PreTrainedTokenizerFast.from_pretrained(str(base))
        tok.vocab = dict(sorted(fast.get_vocab().items(), key=lambda kv: kv[1]))
        tok._fast = fast
        return tok


# --------------------------------------------------------------------------------------------
# Prediction tasks: labels from the data, inputs only from before the prediction time
# --------------------------------------------------------------------------------------------

OBSERVATION_WINDOW = timedelta(hours=24)
AMBULATORY_CLASSES = {"AMB", "WELLNESS", "VR", "HH", "OBSENC", "DAY", "ambulatory", "outpatient", "ICU"}


@dataclass(frozen=True)
class TaskSample:
    """One prediction: patient, task, the prediction time (inputs strictly from then or earlier), labels."""

    patient_id: str
    task: str
    cutoff: datetime
    labels: tuple[float, ...]
    visit_id: str


def is_hospital_stay(visit: Visit) -> bool:
    """A top-level, non-ambulatory visit with start and end (MIMIC admissions, FHIR IMP/EMER/ACUTE)."""
    return (
        visit.parent_visit_id is None
        and visit.start is not None
        and visit.end is not None
        and (visit.visit_class or "") not in AMBULATORY_CLASSES
    )


def condition_group(ev: Event) -> str | None:
    """Coarse condition group of a diagnosis: ICD-10 chapter letter / ICD-9 range, or the SNOMED code."""
    if ev.kind not in ("condition", "diagnosis"):
        return None
    code = ev.code.strip().upper()
    if ev.system.startswith("ICD10"):
        return f"ICD10:{code[:1]}"
    if ev.system.startswith("ICD9"):
        if code.startswith("V"):
            return "ICD9:V"
        if code.startswith("E"):
            return "ICD9:E"
        try:
            n = int(code[:3])
        except ValueError:
            return None
        bounds = [139, 239, 279, 289, 319, 389, 459, 519, 579, 629, 679, 709, 739, 759, 779, 799, 999]
        return f"ICD9:{next(i for i, b in enumerate(bounds) if n <= b):02d}"
    return f"{ev.system}:{ev.code}"


def derive_task_samples(
    timeline: PatientTimeline, tasks: Sequence[str], dx_groups: Sequence[str] = ()
) -> list[TaskSample]:
    """Task samples for one patient; each label looks only after its cutoff, each input only before.

    - mortality_inhospital / los_gt_7d: hospital stays longer than 24 h, predicted 24 h after
      admission (patients dead by then excluded); label death before discharge / stay > 7 days;
    - mortality_30d / readmission_30d: predicted at discharge of a stay the patient survived;
      label death / a new hospital stay within 30 days;
    - next_visit_dx: predicted at discharge when a later hospital stay exists; labels = which
      of `dx_groups` that next stay's diagnoses fall in.
    """
    out: list[TaskSample] = []
    stays = sorted((v for v in timeline.visits if is_hospital_stay(v)), key=lambda v: v.start)
    death = timeline.death_time
    for k, stay in enumerate(stays):
        early = stay.start + OBSERVATION_WINDOW
        alive_early = death is None or death > early
        long_enough = stay.end > early
        died_in_stay = death is not None and death <= stay.end + timedelta(hours=24)
        if long_enough and alive_early:
            if "mortality_inhospital" in tasks:
                out.append(TaskSample(timeline.patient_id, "mortality_inhospital", early, (float(died_in_stay),), stay.visit_id))
            if "los_gt_7d" in tasks:
                out.append(TaskSample(timeline.patient_id, "los_gt_7d", early,
                                      (float(stay.end - stay.start > timedelta(days=7)),), stay.visit_id))
        if died_in_stay:
            continue
        if "mortality_30d" in tasks:
            out.append(TaskSample(timeline.patient_id, "mortality_30d", stay.end,
                                  (float(death is not None and death <= stay.end + timedelta(days=30)),), stay.visit_id))
        later = [v for v in stays[k + 1:] if v.start > stay.end]
        if "readmission_30d" in tasks:
            readmit = any(v.start <= stay.end + timedelta(days=30) for v in later)
            out.append(TaskSample(timeline.patient_id, "readmission_30d", stay.end, (float(readmit),), stay.visit_id))
        if "next_visit_dx" in tasks and later and dx_groups:
            nxt = later[0]
            groups = {condition_group(ev) for ev in timeline.events
                      if ev.visit_id == nxt.visit_id or (ev.visit_id is None and nxt.start <= ev.time <= nxt.end)}
            out.append(TaskSample(timeline.patient_id, "next_visit_dx", stay.end,
                                  tuple(float(g in groups) for g in dx_groups), stay.visit_id))
    return out


def frequent_dx_groups(timelines: Iterable[PatientTimeline], top_k: int = 5) -> list[str]:
    """The `top_k` most frequent condition groups over hospital stays (fit on training patients only)."""
    counts: Counter[str] = Counter()
    for tl in timelines:
        stay_ids = {v.visit_id for v in tl.visits if is_hospital_stay(v)}
        seen = {(ev.visit_id, condition_group(ev)) for ev in tl.events if ev.visit_id in stay_ids}
        counts.update(g for _, g in seen if g)
    return [g for g, _ in counts.most_common(top_k)]


def pad_batch(items: list[dict], pad_id: int = 0, max_length: int | None = None) -> dict:
    """Right-pad encoded sequences (numpy arrays per key) into a batch of torch tensors with attention_mask."""
    import torch

    keys = ("input_ids", "type_ids", "time_stamps", "ages", "visit_orders", "visit_segments")
    length = max(len(it["input_ids"]) for it in items)
    if max_length is not None:
        length = min(length, max_length)
    out = {}
    for key in keys:
        dtype = torch.float32 if key in ("time_stamps", "ages") else torch.long
        t = torch.zeros(len(items), length, dtype=dtype)
        if key == "input_ids" and pad_id:
            t.fill_(pad_id)
        for i, it in enumerate(items):
            v = torch.as_tensor(it[key][:length])
            t[i, : len(v)] = v.to(dtype)
        out[key] = t
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for i, it in enumerate(items):
        mask[i, : min(len(it["input_ids"]), length)] = 1
    out["attention_mask"] = mask
    return out
