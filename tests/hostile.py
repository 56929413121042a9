"""Seeded hostile copies of real files, and a tally of how the CLI met them (used by tests/test_hostile_inputs.py).

Each mutation takes a file's bytes and a seeded numpy generator and returns new bytes: truncation at
several points, bit flips in the header and in the body, a zeroed run, a gzip stream cut short,
invalid UTF-8 and an oversized line (inside the gzip payload when the file is gzipped, so the text
reader meets them), and the file unchanged under another kind's extension. The same seed gives the
same copies, so a failure reproduces from its file name alone.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

Mutation = Callable[[bytes, np.random.Generator], bytes]

# Suffixes of the kinds the harness feeds; "wrong extension" renames a file to one of the others.
KIND_SUFFIXES = (".dcm", ".svs", ".tiff", ".nii.gz", ".json.gz", ".ndjson", ".csv.gz", ".mat", ".jpg", ".yaml")
OVERSIZED_LINE_BYTES = 1 << 20  # one line of 1 MiB: beyond any line a reader buffers by default


# Mutated inputs per kind in the bounded `make test` sample (11 mutations: each kind meets each one).
# MIL .mat and configs cost a short training run each when a copy survives, so they get the fewest.
DEFAULT_COUNTS = {"dicom": 77, "dicom convert": 11, "slides": 22,
                  "fhir": 33, "mimic": 11, "nifti": 11, "mat": 11, "config": 11, "image": 22}


def fuzz_count(kind: str) -> int:
    """Mutated inputs of this kind: its share of MEDAI_FUZZ_COUNT (`make fuzz`), else its DEFAULT_COUNTS entry."""
    value = os.environ.get("MEDAI_FUZZ_COUNT", "").strip()
    if not value:
        return DEFAULT_COUNTS[kind]
    return max(1, round(DEFAULT_COUNTS[kind] * int(value) / sum(DEFAULT_COUNTS.values())))


def fuzz_seed() -> int:
    """The base seed of every mutation: MEDAI_FUZZ_SEED, else 0."""
    return int(os.environ.get("MEDAI_FUZZ_SEED", "0") or 0)


def suffix_of(path: Path) -> str:
    """The file's kind suffix, double suffixes kept (.nii.gz, .json.gz, .csv.gz)."""
    for double in (".nii.gz", ".json.gz", ".ndjson.gz", ".csv.gz"):
        if path.name.lower().endswith(double):
            return path.name[-len(double):]
    return path.suffix


def _is_gzip(data: bytes) -> bool:
    return data[:2] == b"\x1f\x8b"


def _payload(mutate_text: Callable[[bytes, np.random.Generator], bytes]) -> Mutation:
    """Apply a text mutation to the decompressed payload of a gzip file (recompressed), else to the bytes."""

    def apply(data: bytes, rng: np.random.Generator) -> bytes:
        if _is_gzip(data):
            try:
                return gzip.compress(mutate_text(gzip.decompress(data), rng), mtime=0)
            except (OSError, EOFError, zlib.error):
                pass
        return mutate_text(data, rng)

    return apply


def _line_start(data: bytes, rng: np.random.Generator) -> int:
    """A seeded offset at the start of a line (0 when the data has no newline)."""
    starts = [0] + [i + 1 for i in range(len(data)) if data[i:i + 1] == b"\n"][:10_000]
    return int(starts[rng.integers(len(starts))])


def _insert_invalid_utf8(data: bytes, rng: np.random.Generator) -> bytes:
    at = _line_start(data, rng)
    return data[:at] + b"\xff\xfe\xc3(" + data[at:]


def _insert_oversized_line(data: bytes, rng: np.random.Generator) -> bytes:
    at = _line_start(data, rng)
    return data[:at] + b"A" * OVERSIZED_LINE_BYTES + b"\n" + data[at:]


def _flip_bits(data: bytes, rng: np.random.Generator, low: int, high: int) -> bytes:
    if not data:
        return data
    buf = bytearray(data)
    low, high = min(low, len(buf) - 1), max(min(high, len(buf)), min(low, len(buf) - 1) + 1)
    for _ in range(int(rng.integers(1, 9))):
        buf[int(rng.integers(low, high))] ^= 1 << int(rng.integers(8))
    return bytes(buf)


def _zero_run(data: bytes, rng: np.random.Generator) -> bytes:
    if not data:
        return data
    length = int(rng.integers(16, 4097))
    start = int(rng.integers(0, max(1, len(data) - length)))
    return data[:start] + b"\x00" * min(length, len(data) - start) + data[start + length:]


def _gzip_cut(data: bytes, rng: np.random.Generator) -> bytes:
    stream = data if _is_gzip(data) else gzip.compress(data, mtime=0)
    return stream[: int(rng.integers(10, max(11, len(stream) - 8)))]


MUTATIONS: dict[str, Mutation] = {
    "empty": lambda data, rng: b"",
    "cut_header": lambda data, rng: data[: int(rng.integers(1, max(2, min(len(data), 512))))],
    "cut_middle": lambda data, rng: data[: int(len(data) * rng.uniform(0.2, 0.8))],
    "cut_tail": lambda data, rng: data[: max(0, len(data) - int(rng.integers(1, 65)))],
    "flip_header": lambda data, rng: _flip_bits(data, rng, 0, 1024),
    "flip_body": lambda data, rng: _flip_bits(data, rng, len(data) // 4, len(data)),
    "zero_run": _zero_run,
    "gzip_cut": _gzip_cut,
    "invalid_utf8": _payload(_insert_invalid_utf8),
    "oversized_line": _payload(_insert_oversized_line),
    "wrong_extension": lambda data, rng: data,
}


@dataclass(frozen=True)
class Mutant:
    """A mutated copy: where it is, which real file it came from, and how it was changed."""

    path: Path
    source: Path
    mutation: str


def make_mutants(sources: list[Path], out_dir: Path, count: int, seed: int, *,
                 mutations: tuple[str, ...] = tuple(MUTATIONS), keep_name: bool = False) -> list[Mutant]:
    """Write `count` mutated copies of `sources` into out_dir, cycling mutations and sources; seeded.

    Copies are named `<i>_<mutation>_<source name>` (the source's name itself with keep_name, for
    inputs whose name carries meaning, e.g. a MIMIC table); a wrong extension swaps the suffix for
    another kind's.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    mutants = []
    for i in range(count):
        # round r gives mutation m to source (m + r): within a round the sources vary, and over
        # len(sources) rounds every mutation meets every source once
        name = mutations[i % len(mutations)]
        source = sources[(i % len(mutations) + i // len(mutations)) % len(sources)]
        rng = np.random.default_rng([seed, i])
        data = MUTATIONS[name](source.read_bytes(), rng)
        file_name = source.name if keep_name else f"{i:03d}_{name}_{source.name}"
        if name == "wrong_extension":
            own = suffix_of(source)
            others = [s for s in KIND_SUFFIXES if s.lower() != own.lower()]
            file_name = file_name[: len(file_name) - len(own)] + others[int(rng.integers(len(others)))]
        path = out_dir / file_name
        path.write_bytes(data)
        mutants.append(Mutant(path, source, name))
    return mutants


TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Tally:
    """Counts over the whole run, per kind: mutated inputs tried, refused with a reason, accepted; good items checked."""

    tried: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    good_checked: Counter = field(default_factory=Counter)
    commands: Counter = field(default_factory=Counter)
    files: set = field(default_factory=set)
    tracebacks: int = 0
    lost_good: int = 0

    def mutant(self, kind: str, path: Path, refused: bool) -> None:
        """Count one run of a mutated input: refused with a reason naming it, or accepted with its result present."""
        self.files.add(path)
        self.tried[kind] += 1
        (self.refused if refused else self.accepted)[kind] += 1

    def summary(self) -> dict:
        """JSON-ready totals and the per-kind breakdown."""
        kinds = sorted(set(self.tried) | set(self.good_checked))
        return {
            "mutated_files": len(self.files),
            "inputs_tried": sum(self.tried.values()),
            "refused_with_reason": sum(self.refused.values()),
            "accepted": sum(self.accepted.values()),
            "good_items_checked": sum(self.good_checked.values()),
            "command_runs": sum(self.commands.values()),
            "tracebacks": self.tracebacks,
            "lost_good_items": self.lost_good,
            "per_kind": {k: {"tried": self.tried[k], "refused": self.refused[k], "accepted": self.accepted[k],
                             "good_checked": self.good_checked[k]} for k in kinds},
            "per_command": dict(sorted(self.commands.items())),
        }

    def write(self, path: Path) -> None:
        """Write the summary as JSON."""
        path.write_text(json.dumps(self.summary(), indent=1))
