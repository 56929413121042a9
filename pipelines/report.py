"""Grounded report drafting: structured model findings -> LM draft -> sentence-level check.

1. `StudyFindings` gathers what medai's models said about a study (classifier probabilities,
   segmentation volumes in mL, slide-level MIL scores and top regions, EHR risk scores).
2. `findings_context` renders them as an explicit context block; the LM (or the deterministic
   template drafter) writes Findings and Impression sections from that block only.
3. `check_report` splits the draft into sentences, finds each finding a sentence asserts
   (lexicon + the findings' own names and synonyms), decides its polarity with NegEx-style
   negation triggers, compares numbers with measured values, and marks each sentence
   supported / unsupported / contradicted / overconfident / no_claim.
4. Flagged sentences stay in the output, marked, never silently shown: text, JSON and a
   DICOM Comprehensive SR (highdicom) whose verification flag says UNVERIFIED.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from medai.errors import MedaiError

Status = Literal["supported", "unsupported", "contradicted", "overconfident", "no_claim"]
FLAGGED: tuple[str, ...] = ("unsupported", "contradicted", "overconfident")


class FindingsError(MedaiError, ValueError):
    """A findings file or object is malformed; names the file and the item."""


@dataclass
class Finding:
    """One structured finding from a medai model, with its provenance."""

    name: str  # e.g. "malignancy", "left hippocampus volume"
    source: str  # which model / job produced it
    kind: Literal["probability", "measurement", "score"]
    value: float  # probability 0..1, measurement in `unit`, or a score
    unit: str = ""  # "mL" for volumes, "" for probabilities
    threshold: float | None = 0.5  # probability/score at or above which the finding is "present"
    synonyms: list[str] = field(default_factory=list)
    detail: str = ""  # e.g. top MIL regions as "x,y" at level 0

    @property
    def present(self) -> bool | None:
        """True/False for thresholded findings; None for measurements (they exist, no polarity)."""
        if self.kind == "measurement" or self.threshold is None:
            return None
        return self.value >= self.threshold

    def describe(self) -> str:
        """One context-block line for the LM."""
        if self.kind == "measurement":
            text = f"{self.name}: {self.value:.2f} {self.unit}".rstrip()
        else:
            state = "present" if self.present else "absent"
            what = "probability" if self.kind == "probability" else "score"
            text = f"{self.name}: {state} ({what} {self.value:.2f}, threshold {self.threshold:.2f})"
        return f"- {text} [source: {self.source}]" + (f"; {self.detail}" if self.detail else "")


@dataclass
class StudyFindings:
    """All structured findings for one study (no patient identifiers)."""

    study: str  # a study label or accession-free id
    modality: str
    findings: list[Finding]


def findings_from_classifier(probabilities: dict[str, float], source: str, threshold: float = 0.5,
                             synonyms: dict[str, list[str]] | None = None) -> list[Finding]:
    """Return one probability finding per class label (e.g. {'malignancy': 0.81})."""
    return [Finding(label, source, "probability", float(p), "", threshold, list((synonyms or {}).get(label, [])))
            for label, p in probabilities.items()]


def findings_from_segmentation(volumes_ml: dict[str, float], source: str) -> list[Finding]:
    """Return one measurement finding per labelled structure volume (mL)."""
    return [Finding(f"{label} volume", source, "measurement", float(v), "mL", None, [label]) for label, v in volumes_ml.items()]


def findings_from_mil(slide_scores: dict[str, float], source: str, top_regions: Sequence[tuple[int, int]] = (),
                      threshold: float = 0.5) -> list[Finding]:
    """Return slide-level MIL scores as findings, the top regions (level-0 px) noted as detail."""
    detail = ("top regions at " + "; ".join(f"({x}, {y})" for x, y in top_regions)) if top_regions else ""
    return [Finding(label, source, "score", float(s), "", threshold, [], detail) for label, s in slide_scores.items()]


def findings_from_ehr(risks: dict[str, float], source: str, threshold: float = 0.5) -> list[Finding]:
    """Return EHR risk scores (e.g. {'in-hospital mortality risk': 0.12}) as findings."""
    return [Finding(label, source, "score", float(r), "", threshold) for label, r in risks.items()]


def load_findings(path: str | Path) -> StudyFindings:
    """Read a findings JSON file ({study, modality, findings: [Finding fields]}); errors name the item."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FindingsError(f"{path}: cannot read findings JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("findings"), list):
        raise FindingsError(f"{path}: expected an object with a 'findings' list")
    findings = []
    for i, item in enumerate(data["findings"]):
        try:
            findings.append(Finding(**item))
        except TypeError as exc:
            raise FindingsError(f"{path}: findings[{i}]: {exc}") from exc
        if findings[-1].kind not in ("probability", "measurement", "score"):
            raise FindingsError(f"{path}: findings[{i}]: kind must be probability, measurement or score")
    return StudyFindings(str(data.get("study", path.stem)), str(data.get("modality", "")), findings)


# ---------------------------------------------------------------------------------------------
# Context and drafting

REPORT_INSTRUCTIONS = (
    "Write a draft radiology report with two sections titled 'Findings:' and 'Impression:'. "
    "Use only the structured findings listed below; do not mention any other abnormality. "
    "Say when a finding is uncertain (probability between 0.3 and 0.8). Keep it short."
)


def findings_context(study: StudyFindings) -> str:
    """Return the explicit context block handed to the LM."""
    lines = [f"STRUCTURED FINDINGS for study {study.study} ({study.modality or 'modality not given'}), "
             "produced by automated models, not verified by a radiologist:"]
    lines += [f.describe() for f in study.findings] or ["- none"]
    return "\n".join(lines)


def template_draft(study: StudyFindings) -> str:
    """Return a deterministic draft that restates the findings (the fallback and reference drafter)."""
    findings, impressions = [], []
    for f in study.findings:
        if f.kind == "measurement":
            findings.append(f"The {f.name} measures {f.value:.2f} {f.unit}.".replace(" .", "."))
            continue
        if f.present:
            hedge = "is likely present" if f.value >= 0.8 else "is possibly present"
            findings.append(f"{f.name.capitalize()} {hedge} (model {f.kind} {f.value:.2f}).")
            impressions.append(f"{'Likely' if f.value >= 0.8 else 'Possible'} {f.name}.")
        else:
            findings.append(f"No {f.name} is suggested (model {f.kind} {f.value:.2f}).")
    if not impressions:
        impressions.append("No abnormality is suggested by the automated findings.")
    return "Findings: " + " ".join(findings) + "\nImpression: " + " ".join(impressions)


def uncertainty_statement(study: StudyFindings) -> str:
    """Return the fixed uncertainty paragraph (what the numbers are and are not)."""
    near = [f.name for f in study.findings if f.kind != "measurement" and f.threshold is not None
            and abs(f.value - f.threshold) < 0.2]
    text = ("This draft was generated from automated model outputs and has not been reviewed by a radiologist. "
            "Probabilities are model scores, not calibrated clinical likelihoods.")
    if near:
        text += f" Findings close to their decision threshold: {', '.join(near)}."
    return text


# ---------------------------------------------------------------------------------------------
# Grounding check

# Common radiology and pathology findings a draft might assert; canonical name -> surface forms.
FINDING_LEXICON: dict[str, list[str]] = {
    "malignancy": ["malignancy", "malignant", "cancer", "carcinoma", "neoplasm", "tumor", "tumour"],
    "pneumonia": ["pneumonia", "consolidation", "airspace disease", "infiltrate"],
    "pleural effusion": ["pleural effusion", "effusion"],
    "pneumothorax": ["pneumothorax"],
    "cardiomegaly": ["cardiomegaly", "enlarged heart", "enlarged cardiac silhouette"],
    "pulmonary edema": ["pulmonary edema", "oedema", "edema"],
    "nodule": ["nodule", "nodules"],
    "mass": ["mass", "masses"],
    "fracture": ["fracture", "fractures"],
    "hemorrhage": ["hemorrhage", "haemorrhage", "bleed", "hematoma"],
    "infarct": ["infarct", "infarction", "stroke", "ischemia"],
    "atelectasis": ["atelectasis"],
    "metastasis": ["metastasis", "metastases", "metastatic"],
    "lesion": ["lesion", "lesions"],
    "calcification": ["calcification", "calcifications"],
    "atrophy": ["atrophy", "atrophic"],
    "hydrocephalus": ["hydrocephalus"],
    "lymphadenopathy": ["lymphadenopathy", "enlarged lymph nodes"],
}
# Words that assert the absence of a finding by themselves (benign => no malignancy).
POLARITY_WORDS: dict[str, tuple[str, bool]] = {"benign": ("malignancy", False), "normal": ("", False)}

PRE_NEGATION = ["no evidence of", "negative for", "absence of", "free of", "without", "no", "not", "rules out",
                "ruled out", "unlikely", "never"]
POST_NEGATION = ["is absent", "are absent", "not seen", "not identified", "not present", "is excluded",
                 "ruled out", "is not suggested", "not suggested", "unlikely"]
HEDGES = ["possible", "possibly", "likely", "probable", "probably", "may", "might", "suspicious", "suggest",
          "cannot be excluded", "uncertain", "questionable", "could"]
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)\s*(ml|mL|cm3|cc|%|mm|cm)?")


@dataclass
class SentenceCheck:
    """The grounding verdict for one sentence of a draft."""

    section: str
    text: str
    status: Status
    mentions: list[str]
    reason: str = ""


def split_sentences(text: str) -> list[str]:
    """Split text into sentences (on . ! ? followed by space/end, keeping decimals intact)."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])", text.strip())
    return [p.strip() for p in parts if p.strip()]


def _vocabulary(findings: Sequence[Finding]) -> list[tuple[str, str, Finding | None]]:
    """Return (surface form, canonical, finding) pairs, longest surface forms first."""
    vocab: list[tuple[str, str, Finding | None]] = []
    for f in findings:
        for form in [f.name, *f.synonyms]:
            vocab.append((form.lower(), f.name.lower(), f))
    known = {c for _, c, _ in vocab}
    for canonical, forms in FINDING_LEXICON.items():
        owner = next((f for f in findings if canonical == f.name.lower() or canonical in [s.lower() for s in f.synonyms]), None)
        for form in forms:
            if owner is not None:
                vocab.append((form, owner.name.lower(), owner))
            elif canonical not in known:
                vocab.append((form, canonical, None))
    return sorted(vocab, key=lambda v: -len(v[0]))


def _negated(clause: str, start: int, end: int) -> bool:
    before = clause[:start].split()[-6:]
    window = " " + " ".join(before) + " "
    if any(f" {t} " in window for t in PRE_NEGATION):
        return True
    after = " " + clause[end:end + 40].strip() + " "
    return any(after.startswith(f" {t}") or f" {t} " in after[:25] for t in POST_NEGATION)


def check_sentence(sentence: str, findings: Sequence[Finding], section: str = "") -> SentenceCheck:
    """Return whether a sentence's asserted findings are supported by the structured findings."""
    lowered = sentence.lower()
    clauses = re.split(r"[;,]|\bbut\b|\bhowever\b|\bwhereas\b", lowered)
    mentions: list[str] = []
    problems: list[tuple[Status, str]] = []
    hedged = any(re.search(rf"\b{re.escape(h)}\b", lowered) for h in HEDGES)
    numbers = [float(m.group(1)) for m in _NUMBER.finditer(lowered)]
    vocab = _vocabulary(findings)
    for clause in clauses:
        taken = [False] * len(clause)
        for form, canonical, finding in vocab:
            for match in re.finditer(rf"\b{re.escape(form)}\b", clause):
                if any(taken[match.start():match.end()]):
                    continue  # a longer form already covers this span
                for i in range(match.start(), match.end()):
                    taken[i] = True
                negated = _negated(clause, match.start(), match.end())
                mentions.append(("no " if negated else "") + canonical)
                if finding is None:
                    # Asserting an abnormality no model reported, or its absence when no model looked.
                    verb = "absence of" if negated else ""
                    problems.append(("unsupported", f"{verb} '{form}' is not among the structured findings".strip()))
                    continue
                if finding.kind == "measurement":
                    if negated:
                        problems.append(("contradicted", f"{finding.name} was measured ({finding.value:.2f} {finding.unit})"))
                    elif numbers and not any(abs(n - finding.value) <= max(0.1 * abs(finding.value), 0.05) for n in numbers):
                        problems.append(("contradicted", f"{finding.name} is {finding.value:.2f} {finding.unit}, not {numbers}"))
                    continue
                if (not negated) != bool(finding.present):
                    state = "present" if finding.present else "absent"
                    problems.append(("contradicted", f"{finding.name} is {state} ({finding.kind} {finding.value:.2f})"))
                elif not negated and finding.value < 0.8 and not hedged:
                    problems.append(("overconfident", f"{finding.name} asserted without hedging at {finding.kind} {finding.value:.2f}"))
        for word, (canonical, _polarity) in POLARITY_WORDS.items():
            if canonical and re.search(rf"\b{word}\b", clause) and not _negated(clause, clause.find(word), clause.find(word) + len(word)):
                target = next((f for f in findings if f.name.lower() == canonical or canonical in [s.lower() for s in f.synonyms]), None)
                mentions.append(f"no {canonical}")
                if target is None:
                    problems.append(("unsupported", f"'{word}' asserts no {canonical}, which no model assessed"))
                elif target.present:
                    problems.append(("contradicted", f"'{word}' but {target.name} {target.kind} is {target.value:.2f}"))
    if not mentions:
        return SentenceCheck(section, sentence, "no_claim", [], "")
    for status in ("contradicted", "unsupported", "overconfident"):
        reasons = [r for s, r in problems if s == status]
        if reasons:
            return SentenceCheck(section, sentence, status, mentions, "; ".join(reasons))  # type: ignore[arg-type]
    return SentenceCheck(section, sentence, "supported", mentions, "")


def parse_sections(text: str) -> dict[str, str]:
    """Return {'findings': ..., 'impression': ...} from a draft (missing sections are empty)."""
    sections = {"findings": "", "impression": ""}
    pattern = re.compile(r"(?im)^\s*\**\s*(findings|impressions?)\s*\**\s*:\s*")
    marks = list(pattern.finditer(text))
    for i, m in enumerate(marks):
        name = "impression" if m.group(1).lower().startswith("impression") else "findings"
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        sections[name] = (sections[name] + " " + text[m.end():end].strip()).strip()
    return sections


@dataclass
class ReportDraft:
    """A checked draft: sections, per-sentence verdicts, the uncertainty paragraph and provenance."""

    study: str
    drafter: str
    findings_context: str
    raw_text: str
    sections: dict[str, str]
    checks: list[SentenceCheck]
    uncertainty: str
    problems: list[str] = field(default_factory=list)  # e.g. a missing section

    @property
    def flagged(self) -> list[SentenceCheck]:
        """Sentences that assert something the structured findings do not support."""
        return [c for c in self.checks if c.status in FLAGGED]

    def to_text(self) -> str:
        """Return the report as text, every flagged sentence marked in place."""
        out = []
        for section in ("findings", "impression"):
            sentences = [c for c in self.checks if c.section == section]
            body = " ".join(c.text if c.status not in FLAGGED else f"[{c.status.upper()}: {c.reason}] {c.text}"
                            for c in sentences) or "(section missing from the draft)"
            out.append(f"{section.upper()}:\n{body}")
        out.append(f"UNCERTAINTY:\n{self.uncertainty}")
        if self.problems:
            out.append("PROBLEMS:\n" + "\n".join(f"- {p}" for p in self.problems))
        return "\n\n".join(out) + "\n"

    def to_json(self) -> str:
        """Return the report, checks and provenance as JSON."""
        data = asdict(self)
        data["flagged"] = len(self.flagged)
        return json.dumps(data, indent=2)


def check_report(text: str, study: StudyFindings, drafter: str = "lm") -> ReportDraft:
    """Split a draft into sections and sentences and check every sentence against the findings."""
    sections = parse_sections(text)
    problems = [f"the draft has no {name.capitalize()} section" for name, body in sections.items() if not body]
    checks = [check_sentence(s, study.findings, name) for name, body in sections.items() for s in split_sentences(body)]
    return ReportDraft(study.study, drafter, findings_context(study), text, sections, checks,
                       uncertainty_statement(study), problems)


def draft_report(study: StudyFindings, model: Any = None, drafter: Literal["lm", "template"] = "lm",
                 max_new_tokens: int = 200, max_time_s: float = 60.0, streamer: Any = None) -> ReportDraft:
    """Draft a report for a study with the LM (or the template drafter) and check it sentence by sentence."""
    if drafter == "template":
        return check_report(template_draft(study), study, "template")
    if model is None:
        raise ValueError("drafter='lm' needs a model with draft_text() (e.g. create_model('vlm_lite0_smollm2'))")
    prompt = f"{REPORT_INSTRUCTIONS}\n\n{findings_context(study)}"
    generation = model.draft_text(prompt, max_new_tokens=max_new_tokens, max_time_s=max_time_s, streamer=streamer)
    report = check_report(generation.text, study, getattr(model.config, "language_model", "lm"))
    if generation.stopped_by != "eos":
        report.problems.append(f"generation stopped by {generation.stopped_by}; the draft may be cut short")
    return report


# ---------------------------------------------------------------------------------------------
# DICOM SR


def write_report_sr(report: ReportDraft, evidence: Sequence[Any], path: str | Path) -> Path:
    """Write the checked draft as a DICOM Comprehensive SR referencing `evidence` datasets.

    Flagged sentences are written with their flag; the document is marked UNVERIFIED and PARTIAL.
    """
    if not evidence:
        raise FindingsError("a DICOM SR needs at least one source image dataset to reference (its study)")
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    finding_code = hd.sr.CodedConcept("121071", "DCM", "Finding")
    impression_code = hd.sr.CodedConcept("121073", "DCM", "Impression")
    items = []
    for section, container_code, item_code in (("findings", hd.sr.CodedConcept("121070", "DCM", "Findings"), finding_code),
                                              ("impression", hd.sr.CodedConcept("121072", "DCM", "Impressions"), impression_code)):
        texts = [hd.sr.TextContentItem(name=item_code,
                                       value=(c.text if c.status not in FLAGGED else f"[{c.status.upper()}: {c.reason}] {c.text}")[:1024],
                                       relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
                 for c in report.checks if c.section == section]
        container = hd.sr.ContainerContentItem(name=container_code, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence(texts) if texts else None
        if texts:
            items.append(container)
    items.append(hd.sr.TextContentItem(name=hd.sr.CodedConcept("121074", "DCM", "Comment"),
                                       value=report.uncertainty[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id=None)
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=list(evidence), content=root, series_instance_uid=generate_uid(), series_number=999,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medai",
        is_complete=False, is_verified=False, series_description="medai draft report (unverified)",
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path)
    return path


def write_report(report: ReportDraft, out_dir: str | Path, dicom: str | Path | None = None) -> list[Path]:
    """Write report.txt and report.json into `out_dir`, and report_sr.dcm referencing the `dicom` instance if given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.txt", out_dir / "report.json"]
    written[0].write_text(report.to_text())
    written[1].write_text(report.to_json())
    if dicom is not None:
        from medai.io.dicom import read_dataset

        written.append(write_report_sr(report, [read_dataset(dicom, defer_pixels=False)], out_dir / "report_sr.dcm"))
    return written
