"""Access to the shared real data: root resolution, named datasets, checksum verification."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from medai.errors import DatasetNotFoundError
from medai.utils import repo_root, sha256_file

log = logging.getLogger(__name__)

# Dataset name -> path relative to the data root. Cards live in data_cards/datasets/<name>.md.
DATASETS: dict[str, str] = {
    "breastmnist": "medmnist/breastmnist.npz",
    "pneumoniamnist_balanced": "medmnist/variants/pneumoniamnist_balanced_3166.npz",
    "pneumoniamnist_kaggle": "medmnist/variants/pneumoniamnist_kaggle_train3882.npz",
    "msd_hippocampus": "seg3d/msd_task04_hippocampus",
    "dicom_brain_tumor_progression": "dicom/tcia_brain_tumor_progression",
    "dicom_dcm_qa_ts": "dicom/dcm_qa_ts",
    "dicom_pydicom_data": "dicom/pydicom_data",
    "dicom_dicom2nifti_generic": "dicom/dicom2nifti_generic",
    "dicom_dcmqi": "dicom/dcmqi",
    "wsi_cmu1_small_region": "wsi/CMU-1-Small-Region.svs",
    "wsi_tcga_cr_7395": "wsi/tcga-cr-7395-01a-01-ts1.svs",
    "wsi_dicom_google": "wsi/dicom_wsi_google",
    "wsi_small_he_levels": "wsi/small_HE_levels.tiff",
    "acmil_bracs_checkpoints": "checkpoints",
    "mil_classic": "mil",
    "mil_sicapv2_128d": "mil/sicapv2_128d",
    "mimic_iv_demo": "ehr/mimic-iv-demo-2.2",
    "mimic_iv_fhir_demo_partial": "ehr/fhir/mimic_iv_fhir_demo_v1_partial",
    "synthea_r4": "ehr/fhir/synthea_r4_smart_generated_sample",
    "hl7_fhir_r4_examples": "ehr/fhir/hl7_fhir_r4_examples",
    "vqa_rad": "vqa/vqa_rad",
}


def data_root() -> Path:
    """Return the shared data root: $MEDAI_DATA, else ../shared/data beside the checkout (or the cwd when installed)."""
    env = os.environ.get("MEDAI_DATA")
    if env:
        return Path(env).expanduser().resolve()
    checkout = repo_root()
    return ((checkout.parent if checkout is not None else Path.cwd()) / "shared" / "data").resolve()


def dataset_path(name: str) -> Path:
    """Return the path of a named dataset; raise DatasetNotFoundError when absent."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))})")
    path = data_root() / DATASETS[name]
    if not path.exists():
        raise DatasetNotFoundError(path, f"dataset '{name}'; set MEDAI_DATA to the data root")
    return path


@dataclass
class VerifyReport:
    """Outcome of a checksum run: files checked, and those that differ or are missing."""

    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every listed file is present and matches."""
        return not self.mismatched and not self.missing


def read_checksums(sums_file: Path) -> dict[str, str]:
    """Parse a `sha256sum` listing into {relative path: hex digest}."""
    entries = {}
    for lineno, line in enumerate(sums_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise ValueError(f"{sums_file}:{lineno}: not a sha256sum line: {line!r}")
        entries[name.lstrip("*")] = digest.lower()
    return entries


def verify_checksums(root: str | Path | None = None, only: str | None = None, progress: bool = False) -> VerifyReport:
    """Check every file listed in <root>/SHA256SUMS (optionally those under `only`)."""
    root = Path(root) if root else data_root()
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        raise DatasetNotFoundError(sums, "no SHA256SUMS in the data root")
    entries = read_checksums(sums)
    if only:
        entries = {k: v for k, v in entries.items() if k.startswith(only)}
    report = VerifyReport()
    items = sorted(entries.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="sha256", unit="file")
    for name, digest in items:
        path = root / name
        report.checked += 1
        if not path.is_file():
            report.missing.append(name)
        elif sha256_file(path) != digest:
            report.mismatched.append(name)
    return report
