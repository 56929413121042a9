"""ACMIL authors' checkpoints: restricted unpickling, conversion with no leftover, same outputs as the raw tensors."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medai.models import registry as models
from medai.errors import CheckpointError
from medai.io.torch_pickle import UnsafePickleError, read_torch_checkpoint
from medai.models.mil import ACMIL_RECORD_CLASSES, convert_acmil_checkpoint, read_acmil_checkpoint

TAGS = {"512d": (512, 1), "384d": (384, 5)}


def authors_forward(raw: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' ACMIL_GA eval forward written directly on their tensors: (branch logits, slide logits, A)."""
    h = F.relu(x @ raw["dimreduction.fc1.weight"].T)
    a_v = torch.tanh(h @ raw["attention.attention_V.0.weight"].T + raw["attention.attention_V.0.bias"])
    a_u = torch.sigmoid(h @ raw["attention.attention_U.0.weight"].T + raw["attention.attention_U.0.bias"])
    a = ((a_v * a_u) @ raw["attention.attention_weights.weight"].T + raw["attention.attention_weights.bias"]).T
    afeat = torch.softmax(a, dim=1) @ h
    k = a.shape[0]
    branch = torch.stack([afeat[i] @ raw[f"classifier.{i}.fc.weight"].T + raw[f"classifier.{i}.fc.bias"] for i in range(k)])
    bag_feat = torch.softmax(a, dim=1).mean(0, keepdim=True) @ h
    slide = bag_feat @ raw["Slide_classifier.fc.weight"].T + raw["Slide_classifier.fc.bias"]
    return branch, slide, a


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_authors_checkpoint_converts_and_matches_the_raw_computation(tag, acmil_bracs_checkpoints_path, tmp_path):
    src = acmil_bracs_checkpoints_path / f"acmil_bracs_{tag}" / "checkpoint-best.pth"
    raw, info = read_acmil_checkpoint(src)
    dim, k = TAGS[tag]
    assert info["D_feat"] == dim and info["n_token"] == k
    dest = convert_acmil_checkpoint(src, tmp_path / f"{tag}.safetensors").path
    from safetensors.torch import load_file

    converted = load_file(str(dest))
    assert len(converted) == len(raw), "every tensor of the authors' model is carried over, none left"
    model = models.create_model(f"acmil_bracs_{tag}", pretrained=dest).eval()
    assert model.config.num_branches == k
    x = torch.rand(157, dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    branch, slide, a = authors_forward(raw, x)
    torch.testing.assert_close(out["logits"], slide, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["branch_logits"], branch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["attention"], a, rtol=1e-5, atol=1e-5)


def test_registry_tag_converts_into_the_cache(acmil_bracs_checkpoints_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDAI_CACHE", str(tmp_path))
    model = models.create_model("acmil_bracs_384d", pretrained="bracs")
    assert (tmp_path / "weights" / "acmil_bracs_384d.safetensors").is_file()
    assert model(torch.rand(20, 384))["logits"].shape == (1, 3)


def test_foreign_class_is_refused_without_the_record_allowance(acmil_bracs_checkpoints_path):
    src = acmil_bracs_checkpoints_path / "acmil_bracs_512d" / "checkpoint-best.pth"
    with pytest.raises(UnsafePickleError, match="utils.utils.Struct"):
        read_torch_checkpoint(src)
    obj = read_torch_checkpoint(src, records=ACMIL_RECORD_CLASSES)
    assert obj["config"].as_dict()["D_inner"] == 256


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_torch_zip(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
    return path


def test_planted_pickle_naming_another_callable_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model": {"w": _Planted(marker)}}, protocol=2)
    path = _write_torch_zip(tmp_path / "evil.pth", payload)
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system") as info:
        read_acmil_checkpoint(path)
    assert not marker.exists(), "the planted callable ran"
    assert "refused" in str(info.value)


def test_a_torch_saved_state_dict_reads_back_identically(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(4, 3).T, "h": torch.randn(2).half()}
    path = tmp_path / "plain.pth"
    torch.save(state, path)
    back = read_torch_checkpoint(path)
    assert set(back) == set(state)
    for key in state:
        torch.testing.assert_close(back[key], state[key])


def test_unmatched_author_tensor_is_named(tmp_path):
    state = {"dimreduction.fc1.weight": torch.zeros(4, 8), "attention.extra.weight": torch.zeros(2)}
    path = tmp_path / "odd.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="attention.extra.weight"):
        convert_acmil_checkpoint(path, tmp_path / "odd.safetensors")


def test_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="zip"):
        read_torch_checkpoint(path)


def test_no_code_path_calls_torch_load_with_weights_only_false():
    import re

    root = Path(__file__).resolve().parents[2]
    unsafe = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|torch\.load\((?![^)]*weights_only\s*=\s*True)")
    offenders = []
    for folder in ("medai", "models", "kernels", "pipelines"):
        for file in (root / folder).rglob("*.py"):
            if unsafe.search(file.read_text()):
                offenders.append(str(file.relative_to(root)))
    assert not offenders, offenders
