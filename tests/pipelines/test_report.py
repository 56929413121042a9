"""Grounded report drafting: the sentence check flags planted unsupported findings, passes supported ones."""

from __future__ import annotations

import json

import pydicom
import pytest

from tests.models.tiny_vlms import tiny_lm_path, tiny_vlm  # noqa: F401
from medai.pipelines.report import (
    FindingsError,
    StudyFindings,
    check_report,
    check_sentence,
    draft_report,
    findings_from_classifier,
    findings_from_ehr,
    findings_from_mil,
    findings_from_segmentation,
    load_findings,
    template_draft,
    write_report,
    write_report_sr,
)


@pytest.fixture()
def study() -> StudyFindings:
    findings = (
        findings_from_classifier({"malignancy": 0.86}, "efficientnet_lite0 BreastMNIST classifier")
        + findings_from_segmentation({"left hippocampus": 3.41}, "unet hippocampus")
        + findings_from_mil({"tumour region": 0.35}, "ACMIL", top_regions=[(1024, 2048)])
        + findings_from_ehr({"in-hospital mortality risk": 0.12}, "EHRMamba")
    )
    return StudyFindings("study-1", "US", findings)


def test_planted_unsupported_finding_is_flagged_and_supported_one_passes(study):
    draft = "Findings: Malignancy is likely present. There is a large right pleural effusion.\nImpression: Likely malignancy."
    report = check_report(draft, study)
    verdicts = {c.text: c.status for c in report.checks}
    assert verdicts["Malignancy is likely present."] == "supported"
    assert verdicts["There is a large right pleural effusion."] == "unsupported"
    assert verdicts["Likely malignancy."] == "supported"
    assert [c.text for c in report.flagged] == ["There is a large right pleural effusion."]
    text = report.to_text()
    assert "[UNSUPPORTED: 'pleural effusion' is not among the structured findings] There is a large right" in text


@pytest.mark.parametrize(
    "sentence,status",
    [
        ("There is no evidence of malignancy.", "contradicted"),  # negated, but the model says present
        ("The lesion is benign.", "contradicted"),
        ("No pleural effusion is seen.", "unsupported"),  # absence claimed where no model looked
        ("The left hippocampus volume measures 3.4 mL.", "supported"),
        ("The left hippocampus volume measures 5.2 mL.", "contradicted"),
        ("Tumour region is present.", "contradicted"),  # MIL score 0.35 < 0.5
        ("Tumour region is not suggested.", "supported"),
        ("Clinical correlation is recommended.", "no_claim"),
    ],
)
def test_negation_and_numbers(study, sentence, status):
    assert check_sentence(sentence, study.findings).status == status


def test_unhedged_claim_of_an_uncertain_finding_is_overconfident():
    study = StudyFindings("s", "CT", findings_from_classifier({"pneumonia": 0.62}, "cls"))
    assert check_sentence("There is pneumonia.", study.findings).status == "overconfident"
    assert check_sentence("Possible pneumonia.", study.findings).status == "supported"


def test_template_draft_is_fully_grounded_and_has_both_sections(study):
    report = draft_report(study, drafter="template")
    assert report.sections["findings"] and report.sections["impression"]
    assert not report.flagged and not report.problems
    assert "not calibrated" in report.uncertainty
    data = json.loads(report.to_json())
    assert data["flagged"] == 0 and data["checks"]


def test_missing_section_is_reported(study):
    report = check_report("Malignancy is likely present.", study)
    assert "the draft has no Findings section" in report.problems


def test_lm_draft_is_checked(study, tiny_vlm):
    report = draft_report(study, tiny_vlm, max_new_tokens=20)
    assert report.drafter.endswith("lm")
    assert "STRUCTURED FINDINGS" in report.findings_context and "malignancy" in report.findings_context
    assert all(c.status in ("supported", "unsupported", "contradicted", "overconfident", "no_claim") for c in report.checks)


def test_dicom_sr_holds_flagged_sentences_and_is_unverified(study, tmp_path, dicom_brain_tumor_progression_path):
    source = pydicom.dcmread(sorted(dicom_brain_tumor_progression_path.rglob("*.dcm"))[0])
    report = check_report("Findings: Malignancy is likely present. There is a pneumothorax.\nImpression: Likely malignancy.", study)
    path = write_report_sr(report, [source], tmp_path / "report.dcm")
    sr = pydicom.dcmread(path)
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "PARTIAL"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    texts = [item.TextValue for container in sr.ContentSequence if "ContentSequence" in container
             for item in container.ContentSequence]
    assert any(t.startswith("[UNSUPPORTED") and "pneumothorax" in t for t in texts)
    with pytest.raises(FindingsError):
        write_report_sr(report, [], tmp_path / "none.dcm")


def test_write_report_writes_text_json_and_the_sr_of_a_given_instance(study, tmp_path, dicom_brain_tumor_progression_path):
    source = min(dicom_brain_tumor_progression_path.rglob("*.dcm"))
    report = check_report(template_draft(study), study, "template")
    assert [p.name for p in write_report(report, tmp_path / "text")] == ["report.txt", "report.json"]
    assert (tmp_path / "text" / "report.txt").read_text() == report.to_text()
    written = write_report(report, tmp_path / "sr", source)
    assert json.loads(written[1].read_text()) == json.loads(report.to_json())
    assert pydicom.dcmread(written[2]).StudyInstanceUID == pydicom.dcmread(source).StudyInstanceUID


def test_findings_file_errors_name_the_item(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"study": "s", "findings": [{"name": "x", "source": "m", "kind": "guess", "value": 1}]}))
    with pytest.raises(FindingsError, match=r"findings\[0\]: kind"):
        load_findings(path)
    path.write_text(json.dumps({"study": "s", "findings": [{"name": "x", "colour": "red"}]}))
    with pytest.raises(FindingsError, match=r"findings\[0\]"):
        load_findings(path)
