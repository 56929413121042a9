"""Every registered model keeps the one model contract (timm's tests/test_models.py): its tiny config
builds, runs forward and backward on an input of its declared kind, saves and reloads bit-identically,
refuses unknown options by name, and, when it declares itself a feature extractor, extracts."""

from __future__ import annotations

from typing import Any, get_args

import pytest
import torch

from medai.errors import ConfigError, ModelContractError
from medai.models import create_model, list_models, load_weights, model_entry, save_weights
from medai.models.registry import (
    FEATURE_CONTRACT,
    InputKind,
    check_feature_extractor,
    create_feature_extractor,
)
from medai.transforms.ehr import pad_batch
from tests.models.test_ehrmamba import event_item
from tests.models.tiny_vlms import tiny_lm_path  # noqa: F401

NAMES = list_models()


def example_input(kind: str, config: Any) -> tuple:
    """Positional forward arguments for a tiny model of `kind` built from `config`."""
    gen = torch.Generator().manual_seed(0)
    channels = getattr(config, "in_chans", None) or getattr(config, "in_channels", None)
    if kind == "image_2d":
        return (torch.randn(2, channels, 32, 32, generator=gen),)
    if kind == "volume_3d":
        return (torch.randn(1, channels, 8, 12, 8, generator=gen),)
    if kind == "feature_bag":
        return (torch.randn(12, config.in_features, generator=gen),)
    if kind == "token_sequence":
        return (pad_batch([event_item(20, 1, config.vocab_size), event_item(13, 2, config.vocab_size)]),)
    if kind == "image_text":
        pixels = torch.randn(2, 3, config.image_size, config.image_size, generator=gen)
        return pixels, ["is there a mass ?", "what organ is this ?"], ["yes", "liver"]
    raise AssertionError(f"no example input for kind '{kind}'")


def _tensor(out: Any) -> torch.Tensor:
    """The output a test compares and trains on: logits, or the LM's loss."""
    if hasattr(out, "loss"):
        return out.loss
    return out["logits"] if isinstance(out, dict) else out


def _tiny(name: str, request: pytest.FixtureRequest, seed: int = 0) -> tuple[torch.nn.Module, tuple]:
    entry = model_entry(name)
    overrides = dict(entry.tiny)
    if entry.input_kind == "image_text":
        overrides["language_model"] = str(request.getfixturevalue("tiny_lm_path"))
    torch.manual_seed(seed)
    model = create_model(name, **overrides)
    return model, example_input(entry.input_kind, entry.build_config(**overrides))


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_trains_saves_and_reloads(name, request, tmp_path):
    entry = model_entry(name)
    assert entry.input_kind in get_args(InputKind)
    model, inputs = _tiny(name, request)
    model.train()
    loss = _tensor(model(*inputs)).float().square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        expected = _tensor(model(*inputs))
    path = save_weights(model, tmp_path / f"{name}.safetensors")
    fresh, _ = _tiny(name, request, seed=1)
    load_weights(fresh, path).eval()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(_tensor(fresh(*inputs)), expected)


@pytest.mark.parametrize("name", NAMES)
def test_feature_extractors_extract_and_others_do_not_claim_to(name, request):
    entry = model_entry(name)
    model, inputs = _tiny(name, request)
    assert entry.feature_extractor == all(hasattr(model, attr) for attr in FEATURE_CONTRACT)
    if not entry.feature_extractor:
        with pytest.raises(ModelContractError, match="not a feature extractor"):
            check_feature_extractor(model, name)
        return
    model.eval()
    (images,) = inputs
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape[:2] == (len(images), model.num_features)
        model.reset_classifier(0)
        assert model(images).shape == (len(images), model.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_names_the_key_and_the_valid_ones(name):
    with pytest.raises(ConfigError, match=r"key 'no_such_option': unknown key \(known: .+\)") as err:
        create_model(name, no_such_option=1)
    assert f"create_model('{name}')" in str(err.value)


def test_only_feature_extractors_build_as_one():
    with pytest.raises(ModelContractError, match="registered feature extractors: .*medvit_tiny"):
        create_feature_extractor("abmil")
    assert create_feature_extractor("resnet10t").num_features == 512
