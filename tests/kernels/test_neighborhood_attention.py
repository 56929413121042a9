"""2D (dilated) neighborhood attention: the reference against independent peers.

Peers: a brute-force per-query loop written from NATTEN's C++ window rules, dense attention
(when the window covers the image), and PyTorch FlexAttention with a neighborhood mask_mod.
FlexAttention has no backward on CPU, so gradients are checked against the loop, against
dense attention built from the same mask_mod, and with torch.autograd.gradcheck in float64.
"""

from __future__ import annotations

import pytest
import torch

from medai.kernels import ops
from medai.kernels.neighborhood_attention_ref import neighborhood_attention_2d as na2d_reference

FP32 = dict(rtol=1e-5, atol=1e-5)
# Eager FlexAttention warns that it materialises the scores: that is the point of a peer here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# ---- brute force, written from NATTEN's get_window_start / get_pb_start ------------------------
def natten_window_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    half = kernel_size // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        residue = index % dilation
        full = (length // dilation) * dilation
        extra = length - full
        if residue < extra:
            return length - extra + residue - 2 * half * dilation
        return full + residue - kernel_size * dilation
    return index - half * dilation


def natten_bias_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    half = kernel_size // 2
    if dilation <= 1:
        return half + (index < half) * (half - index) + (index + half >= length) * (length - index - 1 - half)
    if index - half * dilation < 0:
        return kernel_size - 1 - (index // dilation)
    if index + half * dilation >= length:
        return (length - index - 1) // dilation
    return half


def na2d_brute_force(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    """One query at a time: gather its window, softmax, weighted sum (autograd gives gradients)."""
    batch, heads, height, width, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    rows_out = []
    for i in range(height):
        cols_out = []
        si = natten_window_start(i, height, kernel_size, dilation)
        pi = natten_bias_start(i, height, kernel_size, dilation)
        key_rows = [si + a * dilation for a in range(kernel_size)]
        for j in range(width):
            sj = natten_window_start(j, width, kernel_size, dilation)
            pj = natten_bias_start(j, width, kernel_size, dilation)
            key_cols = [sj + b * dilation for b in range(kernel_size)]
            keys = k[:, :, key_rows][:, :, :, key_cols].reshape(batch, heads, -1, dim)
            values = v[:, :, key_rows][:, :, :, key_cols].reshape(batch, heads, -1, v.shape[-1])
            logits = (keys @ q[:, :, i, j, :, None]).squeeze(-1) * scale
            if rpb is not None:
                bias = rpb[:, pi : pi + kernel_size, pj : pj + kernel_size].reshape(heads, -1)
                logits = logits + bias
            cols_out.append((logits.softmax(-1).unsqueeze(-2) @ values).squeeze(-2))
        rows_out.append(torch.stack(cols_out, dim=2))
    return torch.stack(rows_out, dim=2)


# ---- FlexAttention peer: the neighborhood as a mask_mod, the bias as a score_mod -----------------
def _window_start_tensor(index, length, kernel_size, dilation):
    """NATTEN's window start with tensor ops (usable inside mask_mod / score_mod)."""
    half = kernel_size // 2
    residue = index % dilation
    full = (length // dilation) * dilation
    extra = length - full
    near_end = torch.where(
        residue < extra,
        length - extra + residue - 2 * half * dilation,
        full + residue - kernel_size * dilation,
    )
    start = torch.where(index + half * dilation >= length, near_end, index - half * dilation)
    return torch.where(index - half * dilation < 0, residue, start)


def _neighborhood_mods(height, width, kernel_size, dilation, rpb):
    def in_window(q_idx, kv_idx):
        qh, qw, kh, kw = q_idx // width, q_idx % width, kv_idx // width, kv_idx % width
        sh = _window_start_tensor(qh, height, kernel_size, dilation)
        sw = _window_start_tensor(qw, width, kernel_size, dilation)
        ok_h = (kh >= sh) & (kh < sh + kernel_size * dilation) & ((kh - sh) % dilation == 0)
        ok_w = (kw >= sw) & (kw < sw + kernel_size * dilation) & ((kw - sw) % dilation == 0)
        return ok_h & ok_w

    def mask_mod(b, h, q_idx, kv_idx):
        return in_window(q_idx, kv_idx)

    def score_mod(score, b, h, q_idx, kv_idx):
        if rpb is None:
            return score
        dh = (kv_idx // width - q_idx // width) // dilation + kernel_size - 1
        dw = (kv_idx % width - q_idx % width) // dilation + kernel_size - 1
        span = 2 * kernel_size - 1
        return score + rpb[h, dh.clamp(0, span - 1), dw.clamp(0, span - 1)]

    return mask_mod, score_mod


def na2d_flex(q, k, v, kernel_size, dilation=1, rpb=None, scale=None, compiled=False):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    batch, heads, height, width, dim = q.shape
    mask_mod, score_mod = _neighborhood_mods(height, width, kernel_size, dilation, rpb)
    n = height * width
    block_mask = flex.create_block_mask(mask_mod, None, None, n, n, device=str(q.device))
    attend = torch.compile(flex.flex_attention, dynamic=False) if compiled else flex.flex_attention
    out = attend(
        q.reshape(batch, heads, n, dim),
        k.reshape(batch, heads, n, dim),
        v.reshape(batch, heads, n, v.shape[-1]),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
    )
    return out.reshape(batch, heads, height, width, v.shape[-1])


def na2d_dense_from_mask_mod(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    """Dense attention with FlexAttention's materialised mask (differentiable on CPU)."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    batch, heads, height, width, dim = q.shape
    n = height * width
    mask_mod, _ = _neighborhood_mods(height, width, kernel_size, dilation, None)
    allowed = flex.create_mask(mask_mod, None, None, n, n, device=str(q.device))[0, 0]
    scale = dim**-0.5 if scale is None else scale
    logits = q.reshape(batch, heads, n, dim) @ k.reshape(batch, heads, n, dim).transpose(-1, -2) * scale
    if rpb is not None:
        coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"), -1).reshape(n, 2)
        rel = (coords[None, :, :] - coords[:, None, :]).div(dilation, rounding_mode="floor") + kernel_size - 1
        rel = rel.clamp(0, 2 * kernel_size - 2)
        logits = logits + rpb[:, rel[..., 0], rel[..., 1]]
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = logits.softmax(-1) @ v.reshape(batch, heads, n, v.shape[-1])
    return out.reshape(batch, heads, height, width, v.shape[-1])


def _inputs(batch, heads, height, width, dim, kernel_size, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, height, width, dim, generator=gen, dtype=dtype) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen, dtype=dtype)
    tensors = [q, k, v, rpb]
    for t in tensors:
        t.requires_grad_(grad)
    return tensors


# (height, width, kernel_size, dilation): odd, non-square, non-divisible by dilation, borders dominant
SHAPES = [
    (7, 7, 7, 1),  # window = whole map: the reference's dense fast path
    (7, 7, 3, 1),
    (9, 13, 3, 2),
    (11, 8, 5, 1),
    (13, 10, 3, 3),
    (15, 17, 5, 2),
    (14, 16, 7, 2),
    (8, 21, 7, 1),
]


@pytest.mark.parametrize("height,width,kernel_size,dilation", SHAPES)
def test_forward_matches_brute_force_loop(height, width, kernel_size, dilation):
    q, k, v, rpb = _inputs(2, 3, height, width, 8, kernel_size)
    expected = na2d_brute_force(q, k, v, kernel_size, dilation, rpb)
    torch.testing.assert_close(na2d_reference(q, k, v, kernel_size, dilation, rpb), expected, **FP32)
    expected_no_bias = na2d_brute_force(q, k, v, kernel_size, dilation, None, scale=0.3)
    torch.testing.assert_close(na2d_reference(q, k, v, kernel_size, dilation, None, scale=0.3), expected_no_bias, **FP32)


@pytest.mark.parametrize("height,width,kernel_size,dilation", SHAPES)
def test_forward_matches_flex_attention(height, width, kernel_size, dilation):
    q, k, v, rpb = _inputs(1, 2, height, width, 16, kernel_size, seed=1)
    expected = na2d_flex(q, k, v, kernel_size, dilation, rpb)
    torch.testing.assert_close(na2d_reference(q, k, v, kernel_size, dilation, rpb), expected, **FP32)


@pytest.mark.parametrize("height,width,kernel_size,dilation", [(9, 13, 3, 2), (11, 8, 5, 1), (14, 16, 7, 2), (5, 5, 5, 1)])
def test_gradients_match_brute_force_and_masked_dense(height, width, kernel_size, dilation):
    q, k, v, rpb = _inputs(2, 2, height, width, 8, kernel_size, seed=2, grad=True)
    grad_out = torch.randn(2, 2, height, width, 8, generator=torch.Generator().manual_seed(3))
    grads = {}
    for name, fn in (("reference", na2d_reference), ("loop", na2d_brute_force), ("dense", na2d_dense_from_mask_mod)):
        out = fn(q, k, v, kernel_size, dilation, rpb)
        grads[name] = torch.autograd.grad(out, (q, k, v, rpb), grad_out)
    for peer in ("loop", "dense"):
        for name, got, want in zip("qkv", grads["reference"], grads[peer]):
            torch.testing.assert_close(got, want, **FP32, msg=lambda m: f"d{name} vs {peer}: {m}")
        torch.testing.assert_close(grads["reference"][3], grads[peer][3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("height,width,kernel_size,dilation", [(5, 6, 3, 1), (7, 6, 3, 2), (6, 7, 5, 1), (5, 5, 5, 1)])
def test_gradcheck_float64(height, width, kernel_size, dilation):
    q, k, v, rpb = _inputs(1, 2, height, width, 3, kernel_size, dtype=torch.float64, seed=4, grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: na2d_reference(*t[:3], kernel_size, dilation, t[3]), (q, k, v, rpb), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("size,kernel_size", [(7, 7), (5, 5)])
def test_window_covering_the_image_is_full_attention(size, kernel_size):
    q, k, v, rpb = _inputs(2, 2, size, size, 8, kernel_size, seed=5)
    n = size * size
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).reshape(n, 2)
    rel = coords[None] - coords[:, None] + kernel_size - 1
    bias = rpb[:, rel[..., 0], rel[..., 1]]  # (heads, n, n): key offset from query
    full = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(2, 2, n, 8), k.reshape(2, 2, n, 8), v.reshape(2, 2, n, 8), attn_mask=bias
    ).reshape(2, 2, size, size, 8)
    torch.testing.assert_close(na2d_reference(q, k, v, kernel_size, 1, rpb), full, **FP32)


@pytest.mark.parametrize("dilation", [2, 3])
def test_dilated_window_covering_the_image_is_full_attention_per_residue_group(dilation):
    kernel_size = 3
    size = kernel_size * dilation
    q, k, v, _ = _inputs(1, 2, size, size, 8, kernel_size, seed=6)
    out = na2d_reference(q, k, v, kernel_size, dilation)
    for r in range(dilation):
        for c in range(dilation):
            sub = [t[:, :, r::dilation, c::dilation].reshape(1, 2, kernel_size**2, 8) for t in (q, k, v)]
            expected = torch.nn.functional.scaled_dot_product_attention(*sub)
            torch.testing.assert_close(
                out[:, :, r::dilation, c::dilation].reshape(1, 2, -1, 8), expected, **FP32
            )


def test_value_dim_may_differ_and_half_precision_is_close():
    q, k, v, rpb = _inputs(1, 2, 9, 10, 8, 3, seed=7)
    v = torch.randn(1, 2, 9, 10, 5)
    torch.testing.assert_close(na2d_reference(q, k, v, 3, 2, rpb), na2d_brute_force(q, k, v, 3, 2, rpb), **FP32)
    half = na2d_reference(*(t.to(torch.bfloat16) for t in (q, k, v)), 3, 2, rpb.to(torch.bfloat16))
    torch.testing.assert_close(half.float(), na2d_brute_force(q, k, v, 3, 2, rpb), rtol=3e-2, atol=3e-2)


def test_public_op_dispatches_to_the_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("MEDAI_KERNELS", "auto")
    q, k, v, rpb = _inputs(1, 2, 8, 9, 4, 3, seed=8)
    torch.testing.assert_close(ops.neighborhood_attention_2d(q, k, v, 3, 2, rpb), na2d_reference(q, k, v, 3, 2, rpb))


@pytest.mark.parametrize(
    "shape,kernel_size,dilation,rpb_shape,match",
    [
        ((1, 2, 6, 9, 4), 3, 3, None, "smaller than kernel_size\\*dilation"),
        ((1, 2, 9, 9, 4), 4, 1, None, "odd"),
        ((1, 2, 9, 9, 4), 3, 1, (2, 3, 3), "rpb must have shape"),
        ((2, 9, 9, 4), 3, 1, None, "expects q, k of shape"),
    ],
)
def test_bad_arguments_are_refused(shape, kernel_size, dilation, rpb_shape, match):
    q = torch.randn(shape)
    rpb = torch.randn(rpb_shape) if rpb_shape else None
    with pytest.raises(ValueError, match=match):
        na2d_reference(q, q, q, kernel_size, dilation, rpb)


@pytest.mark.slow
@pytest.mark.parametrize("height,width,kernel_size,dilation", [(15, 17, 5, 2), (14, 16, 7, 2)])
def test_forward_matches_compiled_flex_attention(height, width, kernel_size, dilation):
    q, k, v, rpb = _inputs(1, 2, height, width, 16, kernel_size, seed=9)
    expected = na2d_flex(q, k, v, kernel_size, dilation, rpb, compiled=True)
    torch.testing.assert_close(na2d_reference(q, k, v, kernel_size, dilation, rpb), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_matches_natten_na2d_on_cuda():
    """NATTEN 0.17's fused na2d takes (B, H, W, heads, D) and an rpb (later versions dropped rpb)."""
    natten = pytest.importorskip("natten")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v, rpb = (t.cuda() for t in _inputs(2, 4, 15, 17, 32, 7, seed=10))
    heads_last = [t.permute(0, 2, 3, 1, 4).contiguous() for t in (q, k, v)]
    expected = natten.functional.na2d(*heads_last, kernel_size=7, dilation=2, rpb=rpb, scale=32**-0.5)
    got = na2d_reference(q, k, v, 7, 2, rpb).permute(0, 2, 3, 1, 4)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
