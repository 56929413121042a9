"""The VQA task through the shared engine: align, LoRA instruct from the align checkpoint, blind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medai.pipelines.finetune import finetune
from medai.pipelines.train_config import load_train_config
from tests.models.tiny_vlms import tiny_lm_path  # noqa: F401


@pytest.fixture()
def mini_vqa_rad(vqa_rad_path: Path, tmp_path: Path) -> Path:
    """A small slice of the real VQA-RAD (24 train, 6 test questions) beside the real images."""
    records = json.loads((vqa_rad_path / "VQA_RAD Dataset Public.json").read_text())
    train = [r for r in records if not r["phrase_type"].startswith("test")][:24]
    test = [r for r in records if r["phrase_type"].startswith("test")][:6]
    root = tmp_path / "vqa_rad"
    root.mkdir()
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(train + test))
    (root / "images").symlink_to(vqa_rad_path / "images")
    return root


def _overrides(data: Path, lm: Path, out: Path) -> list[str]:
    return [f"data.path={data}", f"model.kwargs.language_model={lm}", "model.kwargs.backbone_pretrained=null",
            "model.kwargs.num_image_tokens=4", "data.options.image_size=64", "data.options.val_fraction=0.2",
            "data.options.max_new_tokens=2", "trainer.epochs=1", "trainer.n_boot=20", f"output_dir={out}"]


def test_align_stage_trains_the_projector_through_the_engine(mini_vqa_rad, tiny_lm_path, tmp_path):
    from safetensors.torch import load_file

    from medai.utils import seed_everything
    from medai.models import create_model

    out = tmp_path / "runs"
    align = finetune(load_train_config("configs/vqa_rad_align.yaml", _overrides(mini_vqa_rad, tiny_lm_path, out)), "never")
    report = align.test_report
    assert report is not None and set(report["metrics"]) == {"closed_acc", "open_exact", "open_recall", "open_f1"}
    assert (align.run_dir / "predictions_test.npz").is_file()
    trained = load_file(str(align.run_dir / "checkpoints" / "best" / "model.safetensors"))
    seed_everything(0)  # the config's seed: the engine builds its model right after seeding
    fresh = create_model("vlm_lite0_smollm2", language_model=str(tiny_lm_path), backbone_pretrained=None,
                         num_image_tokens=4, image_size=64).state_dict()
    changed = {k for k in trained if k in fresh and not (trained[k] == fresh[k]).all()}
    assert changed and all(k.startswith("projector.") for k in changed)  # vision and LM stayed frozen


@pytest.mark.slow  # three engine runs with test-set generation
def test_align_then_lora_instruct_then_blind(mini_vqa_rad, tiny_lm_path, tmp_path):
    out = tmp_path / "runs"
    align = finetune(load_train_config("configs/vqa_rad_align.yaml", _overrides(mini_vqa_rad, tiny_lm_path, out)), "never")
    ckpt = align.run_dir / "checkpoints" / "best" / "model.safetensors"
    instruct_cfg = load_train_config("configs/vqa_rad_instruct.yaml",
                                     _overrides(mini_vqa_rad, tiny_lm_path, out) + [f"model.pretrained={ckpt}"])
    instruct = finetune(instruct_cfg, "never")
    assert instruct.test_report is not None
    blind = finetune(load_train_config("configs/vqa_rad_blind.yaml", _overrides(mini_vqa_rad, tiny_lm_path, out)), "never")
    assert set(blind.test_report["metrics"]) == set(instruct.test_report["metrics"])


def test_augmentation_is_train_only_seeded_and_bounded(mini_vqa_rad):
    from medai.pipelines.tasks import get_task
    from medai.pipelines.train_config import DataConfig

    task = get_task("vqa", {"stage": "instruct", "image_size": 64, "val_fraction": 0.2, "augment": True})
    data = task.setup(DataConfig(path=mini_vqa_rad), seed=0)
    train, val, test = (data.datasets[s] for s in ("train", "val", "test"))
    assert train.augment and not val.augment and not test.augment
    plain = task.setup(DataConfig(path=mini_vqa_rad), seed=0).datasets["train"]
    plain.augment = False
    x0 = train[0]["pixels"]
    assert x0.shape == (3, 64, 64) and 0.0 <= float(x0.min()) and float(x0.max()) <= 1.0
    assert torch.equal(x0, train[0]["pixels"])  # the same draw for the same (seed, epoch, item)
    assert not torch.equal(x0, plain[0]["pixels"])
    train.set_epoch(1)
    assert not torch.equal(x0, train[0]["pixels"])  # a new draw each epoch


def test_unfrozen_variant_fine_tunes_the_encoder_but_not_its_statistics(mini_vqa_rad, tiny_lm_path, tmp_path):
    from safetensors.torch import load_file

    from medai.utils import seed_everything
    from medai.models import create_model

    overrides = _overrides(mini_vqa_rad, tiny_lm_path, tmp_path / "runs") + [
        "model.pretrained=null", "trainer.evaluate_test=false"]
    run = finetune(load_train_config("configs/vqa_rad_instruct_unfrozen.yaml", overrides), "never")
    trained = {k.removeprefix("base_model.model."): v
               for k, v in load_file(str(run.run_dir / "checkpoints" / "last" / "model.safetensors")).items()}
    seed_everything(0)
    fresh = create_model("vlm_lite0_smollm2", language_model=str(tiny_lm_path), backbone_pretrained=None,
                         num_image_tokens=4, image_size=64).state_dict()
    backbone = [k for k in fresh if k.startswith("backbone.") and k in trained]
    moved = {k for k in backbone if not torch.equal(trained[k], fresh[k])}
    assert any(k.endswith("conv_stem.weight") for k in moved)  # the encoder trained, in place
    assert not any("running_" in k for k in moved)  # with its BatchNorm statistics fixed
