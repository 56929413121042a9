"""medai's Mamba block against transformers' implementation with copied weights."""

from __future__ import annotations

import pytest
import torch

from medai.models.layers.mamba import MambaBlock, MambaConfig, MambaMixer, MambaStack

transformers_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")
from transformers.models.mamba import MambaConfig as HFMambaConfig  # noqa: E402


def hf_block(d_model=24, d_state=8, d_conv=4, expand=2, dt_rank=3, conv_bias=True, bias=False, seed=0):
    """A transformers MambaBlock with random (not default-initialised) weights, in eval mode."""
    torch.manual_seed(seed)
    config = HFMambaConfig(
        hidden_size=d_model, state_size=d_state, conv_kernel=d_conv, expand=expand, time_step_rank=dt_rank,
        use_conv_bias=conv_bias, use_bias=bias, layer_norm_epsilon=1e-5, residual_in_fp32=True,
        num_hidden_layers=1,
    )
    block = transformers_mamba.MambaBlock(config, layer_idx=0).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
        block.mixer.A_log.copy_(torch.log(torch.rand_like(block.mixer.A_log) * 4 + 0.5))
    return block


@pytest.mark.parametrize(
    "options,length",
    [
        (dict(), 37),
        (dict(d_model=16, d_state=4, d_conv=2, expand=1, dt_rank=1, conv_bias=False, bias=True), 1),
        (dict(d_model=32, d_state=16, d_conv=4, expand=2, dt_rank=2), 300),
    ],
)
def test_block_equals_transformers_with_copied_weights(options, length):
    peer = hf_block(**options)
    ours = MambaBlock(
        MambaConfig(
            d_model=options.get("d_model", 24), d_state=options.get("d_state", 8), d_conv=options.get("d_conv", 4),
            expand=options.get("expand", 2), dt_rank=options.get("dt_rank", 3),
            conv_bias=options.get("conv_bias", True), bias=options.get("bias", False),
        )
    ).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)  # identical parameter names and shapes
    x = torch.randn(2, length, ours.config.d_model)
    with torch.no_grad():
        expected = peer(x)
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_padding_mask_matches_transformers():
    peer = hf_block()
    ours = MambaBlock(MambaConfig(d_model=24, d_state=8, dt_rank=3)).eval()
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(2, 20, 24)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 15:] = 0
    with torch.no_grad():
        expected = peer(x, attention_mask=mask)
        got = ours(x, mask=mask.bool())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_mixer_is_causal_and_trains():
    torch.manual_seed(0)
    mixer = MambaMixer(MambaConfig(d_model=8, d_state=4))
    x = torch.randn(1, 30, 8, requires_grad=True)
    out = mixer(x)
    out[0, 10].sum().backward()
    assert x.grad[0, 11:].abs().max() == 0  # no position sees the future
    assert x.grad[0, :11].abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())


def test_default_init_follows_the_paper():
    mixer = MambaMixer(MambaConfig(d_model=16, d_state=4, dt_min=0.001, dt_max=0.1))
    torch.testing.assert_close(-torch.exp(mixer.A_log[0]), -torch.arange(1.0, 5.0))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert mixer.config.resolved_dt_rank == 1


def test_stack_shapes_and_bad_input():
    stack = MambaStack(MambaConfig(d_model=8, d_state=4, n_layers=3))
    assert len(stack.layers) == 3
    assert stack(torch.randn(2, 11, 8)).shape == (2, 11, 8)
    with pytest.raises(ValueError, match="expects"):
        stack(torch.randn(2, 11, 9))
    with pytest.raises(ValueError, match="d_state"):
        MambaConfig(d_state=0)
