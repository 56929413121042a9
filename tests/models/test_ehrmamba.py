"""EHRMamba and its Transformer baseline: build, padding invariance, causality, weights round trip, 16k tokens on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medai.transforms.ehr import pad_batch
from medai.models import create_model, load_weights, save_weights

TINY = {"d_model": 32, "n_layers": 1, "time_embeddings_size": 8, "vocab_size": 200, "num_labels": 3, "dropout": 0.0}
NAMES = ["ehrmamba_small", "ehr_transformer_small"]


def event_item(length: int, seed: int = 0, vocab: int = 200) -> dict[str, np.ndarray]:
    """One random encoded patient timeline of `length` events (the arrays `pad_batch` takes)."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1, vocab, length),
        "type_ids": rng.integers(0, 14, length),
        "time_stamps": (70000 + np.cumsum(rng.random(length))).astype(np.float32),
        "ages": np.full(length, 63.5, np.float32),
        "visit_orders": np.arange(length) // 20,
        "visit_segments": (np.arange(length) // 20) % 2 + 1,
    }


def _build(name: str, **extra):
    kwargs = dict(TINY, **extra)
    if name == "ehr_transformer_small":
        kwargs["n_heads"] = 4
    torch.manual_seed(0)
    return create_model(name, **kwargs).eval()


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_and_pretraining_loss(name):
    model = _build(name)
    batch = pad_batch([event_item(40, 1), event_item(25, 2)])
    logits = model(batch)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    loss = model.pretraining_loss(batch)
    # near-uniform start: cross-entropy close to log(vocab) thanks to the 0.02 embedding init
    assert abs(float(loss.detach()) - np.log(200)) < 1.0
    loss.backward()
    assert model.embeddings.concept_embeddings.weight.grad is not None


@pytest.mark.parametrize("name", NAMES)
def test_padding_does_not_change_a_sequence_result(name):
    model = _build(name)
    short = event_item(25, 2)
    alone = model(pad_batch([short]))
    padded = model(pad_batch([event_item(60, 1), short]))[1:]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_causal_future_tokens_do_not_change_the_past(name):
    model = _build(name)
    a, b = event_item(50, 3), event_item(50, 3)
    b["input_ids"] = b["input_ids"].copy()
    b["input_ids"][30:] = 7
    ha = model.encode(pad_batch([a]))
    hb = model.encode(pad_batch([b]))
    torch.testing.assert_close(ha[:, :30], hb[:, :30], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ha[:, 30:], hb[:, 30:])


@pytest.mark.parametrize("name", NAMES)
def test_weights_round_trip_and_pretraining_weights_fit_the_classifier(name, tmp_path):
    model = _build(name)
    path = save_weights(model, tmp_path / "m.safetensors")
    other = _build(name)
    torch.nn.init.normal_(other.classifier[1].weight)
    load_weights(other, path)
    batch = pad_batch([event_item(30, 4)])
    torch.testing.assert_close(model(batch), other(batch))
    loaded = create_model(name, pretrained=path, **dict(TINY, **({"n_heads": 4} if "transformer" in name else {})))
    torch.testing.assert_close(model(batch), loaded.eval()(batch))


def test_mamba_runs_a_16k_token_sequence_on_cpu():
    model = _build("ehrmamba_small", d_state=8)
    batch = pad_batch([event_item(16_384, 5)])
    with torch.no_grad():
        logits = model(batch)
        hidden = model.encode(batch)
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    assert hidden.shape == (1, 16_384, 32) and torch.isfinite(hidden).all()


def test_paper_configuration_is_the_published_size():
    with torch.device("meta"):  # shapes only: no 125M-parameter allocation in the fast tests
        model = create_model("ehrmamba", vocab_size=4600, num_labels=1)
    cfg = model.config
    assert (cfg.d_model, cfg.n_layers, cfg.d_state, cfg.max_seq_length) == (768, 32, 16, 2048)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
