"""slide_attention: reference vs the plain definition; Triton kernel vs the reference (forward, gradients).

Tolerances per dtype: fp32 1e-4 (forward and gradients, IEEE dots in the kernel); fp16 2e-2 and
bf16 5e-2 against the fp32 reference on the same rounded inputs.
"""

from __future__ import annotations

import pytest
import torch

import medai.kernels.slide_attention_ref as ref
from medai.kernels.ops import slide_attention as slide_attention_op
from medai.kernels.slide_attention import slide_attention, visited_block_fraction
from medai.kernels.slide_attention_ref import dense_attention_naive, slide_attention_ref, token_groups

TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def make_qkv(batch, heads, n, dim, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g).to(device, dtype) for _ in range(3)]


def tissue_coords(batch, n, seed=0, device="cpu"):
    """Irregular tissue-only grid: n distinct cells of a 12 x 12 patch grid, in scan order (as a tiler writes them)."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.stack([torch.randperm(144, generator=g)[:n].sort().values for _ in range(batch)])
    return torch.stack([cells % 12, cells // 12], dim=-1).to(device)


def full_mask(n, coords, segment_length, dilation, window_radius, key_padding_mask, batch):
    groups = token_groups(n, segment_length, dilation, "cpu")
    allowed = ref.allowed_pairs(torch.arange(n), groups, coords, window_radius, key_padding_mask)
    return allowed.expand(batch, -1, -1)[:, None]


PATTERNS = {
    "dense": dict(),
    "dilated_segments": dict(segment_length=20, dilation=3),  # 3 does not divide 20, last segment short
    "window_padded": dict(window_radius=1, pad=True),
    "window_and_segments": dict(window_radius=2, segment_length=32, dilation=2),
}


def pattern_args(name, batch, n, device="cpu"):
    spec = dict(PATTERNS[name])
    pad = spec.pop("pad", False)
    if "window_radius" in spec:
        spec["coords"] = tissue_coords(batch, n, device=device)
    if pad:
        mask = torch.ones(batch, n, dtype=torch.bool)
        mask[0, n // 2 :] = False  # a ragged batch: slide 0 is shorter
        mask[1, :3] = False
        spec["key_padding_mask"] = mask.to(device)
    return spec


@pytest.mark.parametrize("name", list(PATTERNS))
def test_reference_matches_plain_definition(name, monkeypatch):
    monkeypatch.setattr(ref, "SCORE_BUDGET", 4 * 2 * 70 * 9)  # force several query chunks of 9
    batch, heads, n = 2, 2, 70
    q, k, v = make_qkv(batch, heads, n, 8, seed=1)
    spec = pattern_args(name, batch, n)
    out, lse = slide_attention_ref(q, k, v, **spec)
    allowed = full_mask(n, spec.get("coords"), spec.get("segment_length"), spec.get("dilation", 1),
                        spec.get("window_radius"), spec.get("key_padding_mask"), batch)
    torch.testing.assert_close(out, dense_attention_naive(q, k, v, allowed), rtol=1e-5, atol=1e-5)
    empty = ~allowed.any(-1).expand(-1, heads, -1)
    assert bool(torch.isinf(lse[empty]).all()) and bool(torch.isfinite(lse[~empty]).all())
    if name == "window_padded":
        assert bool(empty.any())  # the padded queries past slide 0's end see no keys: zeros out
        assert bool((out[empty] == 0).all())


@pytest.mark.parametrize("name", list(PATTERNS))
def test_kernel_forward_and_gradients_match_reference(kernel_device, name):
    batch, heads, n, dim = 2, 1, 45, 12  # N not a multiple of the 32-token block, head_dim not a power of 2
    q, k, v = make_qkv(batch, heads, n, dim, seed=2, device=kernel_device)
    spec = pattern_args(name, batch, n, device=kernel_device)
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(batch, heads, n, dim, generator=g).to(kernel_device)
    weight_lse = torch.randn(batch, heads, n, generator=g).to(kernel_device)
    results = []
    for fn in (slide_attention, slide_attention_ref):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves, **spec)
        finite = torch.isfinite(lse)
        ((out * weight).sum() + (lse.masked_fill(~finite, 0.0) * weight_lse).sum()).backward()
        results.append((out, lse, [t.grad for t in leaves]))
    (out, lse, grads), (out_ref, lse_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, lse_ref, **TOL[torch.float32])  # -inf where no key is allowed, in both
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_inputs(kernel_device, dtype):
    q, k, v = make_qkv(1, 2, 40, 16, seed=4, device=kernel_device, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = slide_attention(*leaves, segment_length=16, dilation=2)
    out.float().sum().backward()
    leaves_ref = [t.float().clone().requires_grad_() for t in (q, k, v)]
    out_ref, _ = slide_attention_ref(*leaves_ref, segment_length=16, dilation=2)
    out_ref.sum().backward()
    assert out.dtype == dtype and leaves[0].grad.dtype == dtype
    torch.testing.assert_close(out.float(), out_ref, **TOL[dtype])
    for a, b in zip(leaves, leaves_ref):
        torch.testing.assert_close(a.grad.float(), b.grad, **TOL[dtype])


def test_single_token_and_dispatch(kernel_device, monkeypatch):
    monkeypatch.setenv("MEDAI_KERNELS", "triton")
    q, k, v = make_qkv(1, 1, 1, 5, seed=5, device=kernel_device)
    out, lse = slide_attention_op(q, k, v)
    torch.testing.assert_close(out, v)  # one token attends to itself
    torch.testing.assert_close(lse, (q * k).sum(-1) * 5**-0.5)


def test_sparse_patterns_skip_blocks():
    n = 1024
    coords = tissue_coords(1, 144)[:, :144]
    assert visited_block_fraction(n) == 1.0
    # 8 segments of 128 tokens: a query block meets only its own segment's 4 key blocks.
    assert visited_block_fraction(n, segment_length=128) == pytest.approx(1 / 8)
    # dilation 2 halves the work per segment again (groups are laid out contiguously).
    assert visited_block_fraction(n, segment_length=128, dilation=2) == pytest.approx(1 / 16)
    assert visited_block_fraction(144, coords=coords, window_radius=1) < 1.0


def test_bad_inputs_are_refused():
    q, k, v = make_qkv(1, 1, 10, 4)
    with pytest.raises(ValueError, match="coords"):
        slide_attention_ref(q, k, v, window_radius=2)
    with pytest.raises(ValueError, match="integer"):
        slide_attention_ref(q, k, v, coords=torch.rand(1, 10, 2), window_radius=2)
    with pytest.raises(ValueError, match="dilation"):
        slide_attention(q, k, v, dilation=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        slide_attention(q, k, v, key_padding_mask=torch.ones(1, 10))
