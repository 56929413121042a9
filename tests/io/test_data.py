import shutil
import subprocess
import sys

import pytest

from medai.io.data import DATASETS, dataset_path, verify_checksums
from medai.errors import DatasetNotFoundError


def test_every_named_dataset_exists(shared_data):
    for name, rel in DATASETS.items():
        assert (shared_data / rel).exists(), f"{name}: {rel}"


def test_verify_subset_passes_on_shared_data(shared_data):
    report = verify_checksums(shared_data, only="medmnist/")
    assert report.ok and report.checked == 3


def test_verify_names_a_changed_byte(shared_data, tmp_path):
    copy = tmp_path / "data"
    (copy / "medmnist").mkdir(parents=True)
    shutil.copy(shared_data / "medmnist" / "breastmnist.npz", copy / "medmnist" / "breastmnist.npz")
    lines = [l for l in (shared_data / "SHA256SUMS").read_text().splitlines() if l.endswith("breastmnist.npz")]
    (copy / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    assert verify_checksums(copy).ok

    target = copy / "medmnist" / "breastmnist.npz"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    target.write_bytes(bytes(blob))
    report = verify_checksums(copy)
    assert report.mismatched == ["medmnist/breastmnist.npz"]

    # The CLI exits non-zero and names the file.
    out = subprocess.run(
        [sys.executable, "-m", "medai.cli", "data", "verify", "--root", str(copy)],
        capture_output=True, text=True,
    )
    assert out.returncode == 1
    assert "medmnist/breastmnist.npz" in out.stdout


def test_missing_dataset_names_path(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDAI_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as err:
        dataset_path("breastmnist")
    assert str(tmp_path / "medmnist" / "breastmnist.npz") in str(err.value)


@pytest.mark.slow
def test_full_verify_passes(shared_data):
    assert verify_checksums(shared_data).ok
