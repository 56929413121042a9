"""EHR patient timelines from MIMIC-IV tables, FHIR files, MEDS or timeline folders, split by patient."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medai.io.datasets.base import DatasetSplits, file_named, register_format, resolve_source

_FHIR_FILE = file_named("*.json", "*.json.gz", "*.ndjson", "*.ndjson.gz")


def _is_ehr_source(path: Path) -> bool:
    """A FHIR file, or a folder (MIMIC tables, MEDS, a timeline store or FHIR files: medai.io.ehr.ingest tells which)."""
    return path.is_dir() or _FHIR_FILE(path)


def split_patients(patient_ids: Iterable[str], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                   seed: int = 0, strata: dict[str, str] | None = None) -> dict[str, str]:
    """Deterministic patient-level split {patient_id: 'train'|'val'|'test'} (no patient in two splits).

    With `strata` (patient -> group, e.g. died or not) each group is split by the same fractions,
    so rare outcomes reach every split.
    """
    ids = sorted(set(patient_ids))
    groups: dict[str, list[str]] = {}
    for pid in ids:
        groups.setdefault((strata or {}).get(pid, ""), []).append(pid)
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(groups):
        members = groups[key]
        order = rng.permutation(len(members))
        n_train = int(round(fractions[0] * len(members)))
        n_val = int(round(fractions[1] * len(members)))
        for rank, i in enumerate(order):
            out[members[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


@register_format("ehr_timelines", kind="ehr", matches=_is_ehr_source)
def ehr_timelines(path: Path, extra_sources: Sequence[str | Path] = (),
                  split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), split_seed: int = 0) -> DatasetSplits:
    """One `PatientTimeline` per patient of every source, split by patient and stratified by death."""
    from medai.io.ehr import ingest

    sources = [path, *(resolve_source(s, "EHR source") for s in extra_sources)]
    timelines = list({tl.patient_id: tl for tl in ingest(sources).timelines()}.values())
    # Stratified by death so the few deaths (15 in hospital among 100 MIMIC demo patients) reach every split.
    strata = {tl.patient_id: str(tl.death_time is not None) for tl in timelines}
    assigned = split_patients([tl.patient_id for tl in timelines], split_fractions, split_seed, strata)
    splits = {name: np.array([i for i, tl in enumerate(timelines) if assigned[tl.patient_id] == name], dtype=int)
              for name in ("train", "val", "test")}
    return DatasetSplits("ehr_timelines", path, timelines, splits)
