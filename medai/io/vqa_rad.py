"""VQA-RAD (Lau et al. 2018): question-answer pairs over radiology images, official split.

Reads `VQA_RAD Dataset Public.json` and fixes its known defects at the boundary, so later
stages see one clean form: `answer_type` stripped and upper-cased (two rows say "CLOSED "),
answers kept verbatim but also normalised (lower case, punctuation folded; five answers are
JSON integers), the official split taken from `phrase_type` (test = `test_freeform` and
`test_para`), exact duplicate (image, question, answer) triplets within a split dropped, and
any training triplet that also appears in the test split removed from training, so no test
pair is ever trained on. Images are returned as paths; decoding is the caller's choice.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medai.errors import DatasetNotFoundError, MedaiError

log = logging.getLogger(__name__)

QA_FILE = "VQA_RAD Dataset Public.json"
Split = Literal["train", "test"]
REQUIRED_KEYS = ("qid", "phrase_type", "image_name", "question", "answer", "answer_type")


class VQADatasetError(MedaiError, ValueError):
    """A VQA annotation file is malformed; names the file, the record and what is wrong."""

    def __init__(self, path: str | Path, reason: str, record: str | int | None = None):
        self.path, self.reason, self.record = Path(path), reason, record
        at = f" (record {record})" if record is not None else ""
        super().__init__(f"{path}{at}: {reason}")


@dataclass(frozen=True)
class VQAItem:
    """One question about one image, with the answer as published and normalised."""

    qid: str
    image_path: Path
    question: str
    answer: str  # verbatim (as a string)
    answer_norm: str  # see normalize_answer
    answer_type: Literal["CLOSED", "OPEN"]
    question_type: str  # e.g. PRES, POS, ABN, MODALITY, PLANE, ORGAN, SIZE, ...
    organ: str  # HEAD, CHEST, ABD
    split: Split

    @property
    def is_closed(self) -> bool:
        """True for closed-ended (yes/no or fixed-choice) questions."""
        return self.answer_type == "CLOSED"


_PUNCT = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str | int | float) -> str:
    """Return the answer in VQA-eval form: lower case, punctuation removed, articles dropped."""
    text = unicodedata.normalize("NFKC", str(text)).lower().strip()
    text = _PUNCT.sub(" ", text)
    words = [w for w in _SPACES.split(text) if w and w not in _ARTICLES]
    return " ".join(words)


def _split_of(phrase_type: str) -> Split:
    return "test" if phrase_type.strip().lower().startswith("test") else "train"


def load_vqa_rad(root: str | Path, split: Split | None = None) -> list[VQAItem]:
    """Return VQA-RAD items (official split; cleaned as the module docstring says), in file order."""
    root = Path(root)
    path = root / QA_FILE
    if not path.is_file():
        raise DatasetNotFoundError(path, "VQA-RAD annotation file")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VQADatasetError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(records, list):
        raise VQADatasetError(path, f"top level must be a list of records, got {type(records).__name__}")
    items: list[VQAItem] = []
    for index, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise VQADatasetError(path, "record is not an object", index)
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            raise VQADatasetError(path, f"missing keys {missing}", rec.get("qid", index))
        answer_type = str(rec["answer_type"]).strip().upper()
        if answer_type not in ("CLOSED", "OPEN"):
            raise VQADatasetError(path, f"answer_type {rec['answer_type']!r} is neither CLOSED nor OPEN", rec["qid"])
        image_path = root / "images" / str(rec["image_name"])
        if not image_path.is_file():
            raise VQADatasetError(path, f"image {image_path.name} not found in {root / 'images'}", rec["qid"])
        items.append(
            VQAItem(
                qid=str(rec["qid"]),
                image_path=image_path,
                question=str(rec["question"]).strip(),
                answer=str(rec["answer"]).strip(),
                answer_norm=normalize_answer(rec["answer"]),
                answer_type=answer_type,  # type: ignore[arg-type]
                question_type=str(rec.get("question_type", "")).strip().upper(),
                organ=str(rec.get("image_organ", "")).strip().upper(),
                split=_split_of(str(rec["phrase_type"])),
            )
        )
    items = _deduplicate(items, path)
    return [it for it in items if split is None or it.split == split]


def _triplet(item: VQAItem) -> tuple[str, str, str]:
    return (item.image_path.name, item.question.lower(), item.answer_norm)


def _deduplicate(items: list[VQAItem], path: Path) -> list[VQAItem]:
    """Drop repeated triplets within a split and training copies of test triplets (logged)."""
    test_triplets = {_triplet(it) for it in items if it.split == "test"}
    seen: set[tuple[str, str, str, str]] = set()
    kept, dropped_dupes, dropped_leaks = [], 0, 0
    for it in items:
        key = (it.split, *_triplet(it))
        if key in seen:
            dropped_dupes += 1
            continue
        seen.add(key)
        if it.split == "train" and _triplet(it) in test_triplets:
            dropped_leaks += 1
            continue
        kept.append(it)
    if dropped_dupes or dropped_leaks:
        log.info("%s: dropped %d duplicate triplets and %d train copies of test triplets", path, dropped_dupes, dropped_leaks)
    return kept


def majority_answers(items: list[VQAItem]) -> dict[str, str]:
    """Return the most frequent normalised answer per answer type (the majority baseline)."""
    out = {}
    for kind in ("CLOSED", "OPEN"):
        counts = Counter(it.answer_norm for it in items if it.answer_type == kind)
        if counts:
            out[kind] = counts.most_common(1)[0][0]
    return out
