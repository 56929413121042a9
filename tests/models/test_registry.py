import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medai.errors import CheckpointError
from medai.models import create_model, list_models, save_weights
from medai.models.registry import model_entry


def test_list_models_matches_pattern():
    assert "efficientnet_lite0" in list_models("efficientnet*")
    assert list_models("no_such_model*") == []


def test_unknown_model_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown model 'efficientnet_lite9'"):
        create_model("efficientnet_lite9")


def test_save_then_load_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=3, in_chans=1)
    path = save_weights(model, tmp_path / "m.safetensors", {"task": "test"})
    loaded = create_model("efficientnet_lite0", pretrained=path, num_classes=3, in_chans=1)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    x = torch.randn(2, 1, 64, 64)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))


def test_wrong_keys_are_refused_and_named(tmp_path):
    model = create_model("efficientnet_lite0", num_classes=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.extra.weight"] = torch.zeros(1)
    del state["conv_stem.weight"]
    state["classifier.bias"] = torch.zeros(7)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        create_model("efficientnet_lite0", pretrained=path, num_classes=3)
    message = str(err.value)
    assert err.value.missing == ["conv_stem.weight"]
    assert err.value.unexpected == ["head.extra.weight"]
    assert "classifier.bias (file (7,) vs model (3,))" in message
    assert str(path) in message


def test_pickles_are_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="only .safetensors"):
        create_model("efficientnet_lite0", pretrained=path)


def test_unknown_pretrained_tag_lists_tags(tmp_path):
    with pytest.raises(CheckpointError, match="imagenet"):
        create_model("efficientnet_lite0", pretrained="radimagenet")


def test_every_model_declares_an_existing_card():
    for name in list_models():
        card = model_entry(name).card_path
        assert card is not None and card.is_file(), f"{name}: card {card}"


def test_unknown_model_in_a_config_is_one_line_naming_close_names(tmp_path, breastmnist_path):
    """A typo in model.name: a typed error listing the near names, exit 2, no KeyError traceback."""
    import subprocess
    import sys

    config = tmp_path / "cfg.yaml"
    config.write_text(f"task: classification\nmodel: {{name: resnett18}}\ndata: {{path: {breastmnist_path}}}\n")
    out = subprocess.run([sys.executable, "-m", "medai.cli", "finetune", str(config)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "unknown model 'resnett18'; did you mean resnet18" in out.stderr


def test_converter_never_relays_torch_advice_to_unpickle_code(tmp_path):
    import pickle

    from medai.errors import CheckpointError
    from medai.models.medvit import read_reference_checkpoint

    path = tmp_path / "code.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": pickle.loads}, path)  # a callable: not tensors-only
    with pytest.raises(CheckpointError) as err:
        read_reference_checkpoint(path)
    assert "weights_only" not in str(err.value) and "never unpickles code" in str(err.value)
