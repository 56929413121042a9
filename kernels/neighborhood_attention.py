"""Triton kernel for 2D (dilated) neighborhood attention with relative position bias (op `neighborhood_attention_2d`).

Same contract and NATTEN semantics as kernels/neighborhood_attention_ref.py. Algorithm:
- forward: a program takes one (batch, head), one query row and BLOCK_W consecutive queries of
  it. It walks the kernel_size^2 window offsets; for each it computes every query's key pixel
  (NATTEN's inward-shifted window start, per dilation group), gathers those keys, forms the
  logits (q . k * scale + rpb) and folds them into an online softmax with the gathered values.
  Only the (B, heads, H, W) logsumexp is saved: the (.., k^2) attention weights of the unfused
  reference never reach memory.
- backward: the same walk recomputes p = exp(logit - lse); dQ is accumulated in registers, dK,
  dV and the bias gradient are scattered with atomic adds into fp32 buffers (a key belongs to
  up to k^2 windows, more at the borders where windows shift inward).
Tiles: BLOCK_W queries (masked past the row end) x head_dim padded to a power of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medai.kernels.neighborhood_attention_ref import _check_inputs

BLOCK_W = 16


@triton.jit
def _window_start(index, length, kernel_size: tl.constexpr, dilation):
    """First key position of each query's window along one axis (NATTEN's rule, see the reference)."""
    group = index % dilation
    pos = index // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = tl.maximum(pos - kernel_size // 2, 0)
    start = tl.minimum(start, group_len - kernel_size)
    return start * dilation + group


@triton.jit
def _na_fwd_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, o_ptr, lse_ptr, heads, H, W, Dh, Dv, dilation, scale,
                   KS: tl.constexpr, HAS_RPB: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    bh = tl.program_id(0)
    row = tl.program_id(1)
    wb = tl.program_id(2)
    table = (bh % heads) * (2 * KS - 1) * (2 * KS - 1)  # this head's bias table
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    w_in = offs_w < W
    d_in = offs_d < Dh
    tile_mask = w_in[:, None] & d_in[None, :]
    base = bh.to(tl.int64) * H * W * Dh
    base_v = bh.to(tl.int64) * H * W * Dv
    offs_dv = tl.arange(0, BLOCK_DV)
    v_mask = w_in[:, None] & (offs_dv[None, :] < Dv)
    q = tl.load(q_ptr + base + (row * W + offs_w[:, None]) * Dh + offs_d[None, :], mask=tile_mask,
                other=0.0).to(tl.float32)
    row_start = _window_start(row, H, KS, dilation)
    col_start = _window_start(offs_w, W, KS, dilation)
    m_i = tl.full((BLOCK_W,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_W,), tl.float32)
    acc = tl.zeros((BLOCK_W, BLOCK_DV), tl.float32)
    for ki in range(KS):
        key_row = row_start + ki * dilation
        for kj in range(KS):
            key_col = col_start + kj * dilation
            key = base + (key_row * W + key_col[:, None]) * Dh + offs_d[None, :]
            k = tl.load(k_ptr + key, mask=tile_mask, other=0.0).to(tl.float32)
            s = tl.sum(q * k, axis=1) * scale
            if HAS_RPB:
                bias_i = (key_row - row) // dilation + KS - 1
                bias_j = (key_col - offs_w) // dilation + KS - 1
                s += tl.load(rpb_ptr + table + bias_i * (2 * KS - 1) + bias_j, mask=w_in, other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, s)
            rescale = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(v_ptr + base_v + (key_row * W + key_col[:, None]) * Dv + offs_dv[None, :], mask=v_mask,
                        other=0.0).to(tl.float32)
            l_i = l_i * rescale + p
            acc = acc * rescale[:, None] + p[:, None] * v
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + base_v + (row * W + offs_w[:, None]) * Dv + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=v_mask)
    tl.store(lse_ptr + bh.to(tl.int64) * H * W + row * W + offs_w, m_i + tl.log(l_i), mask=w_in)


@triton.jit
def _na_bwd_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, drpb_ptr,
                   heads, H, W, Dh, Dv, dilation, scale,
                   KS: tl.constexpr, HAS_RPB: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    bh = tl.program_id(0)
    row = tl.program_id(1)
    wb = tl.program_id(2)
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    w_in = offs_w < W
    d_in = offs_d < Dh
    tile_mask = w_in[:, None] & d_in[None, :]
    base = bh.to(tl.int64) * H * W * Dh
    here = base + (row * W + offs_w[:, None]) * Dh + offs_d[None, :]
    base_v = bh.to(tl.int64) * H * W * Dv
    offs_dv = tl.arange(0, BLOCK_DV)
    v_mask = w_in[:, None] & (offs_dv[None, :] < Dv)
    q = tl.load(q_ptr + here, mask=tile_mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + base_v + (row * W + offs_w[:, None]) * Dv + offs_dv[None, :], mask=v_mask,
                 other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * H * W + row * W + offs_w, mask=w_in, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * H * W + row * W + offs_w, mask=w_in, other=0.0)
    row_start = _window_start(row, H, KS, dilation)
    col_start = _window_start(offs_w, W, KS, dilation)
    dq = tl.zeros((BLOCK_W, BLOCK_D), tl.float32)
    for ki in range(KS):
        key_row = row_start + ki * dilation
        for kj in range(KS):
            key_col = col_start + kj * dilation
            key = base + (key_row * W + key_col[:, None]) * Dh + offs_d[None, :]
            k = tl.load(k_ptr + key, mask=tile_mask, other=0.0).to(tl.float32)
            key_v = base_v + (key_row * W + key_col[:, None]) * Dv + offs_dv[None, :]
            v = tl.load(v_ptr + key_v, mask=v_mask, other=0.0).to(tl.float32)
            s = tl.sum(q * k, axis=1) * scale
            bias_i = (key_row - row) // dilation + KS - 1
            bias_j = (key_col - offs_w) // dilation + KS - 1
            bias_index = (bh % heads) * (2 * KS - 1) * (2 * KS - 1) + bias_i * (2 * KS - 1) + bias_j
            if HAS_RPB:
                s += tl.load(rpb_ptr + bias_index, mask=w_in, other=0.0).to(tl.float32)
            p = tl.where(w_in, tl.exp(s - lse), 0.0)
            dp = tl.sum(do * v, axis=1)
            ds = p * (dp - delta)
            dq += ds[:, None] * k * scale
            tl.atomic_add(dk_ptr + key, ds[:, None] * q * scale, mask=tile_mask)
            tl.atomic_add(dv_ptr + key_v, p[:, None] * do, mask=v_mask)
            if HAS_RPB:
                tl.atomic_add(drpb_ptr + bias_index, ds, mask=w_in)
    tl.store(dq_ptr + here, dq.to(dq_ptr.dtype.element_ty), mask=tile_mask)


class _NeighborhoodAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel_size, dilation, scale):
        batch, heads, height, width, dim = q.shape
        out = torch.empty(v.shape, device=q.device, dtype=q.dtype)
        lse = torch.empty((batch, heads, height, width), device=q.device, dtype=torch.float32)
        has_rpb = rpb is not None
        rpb_arg = rpb.contiguous() if has_rpb else q  # dummy pointer when absent
        grid = (batch * heads, height, triton.cdiv(width, BLOCK_W))
        meta = dict(KS=kernel_size, HAS_RPB=has_rpb, BLOCK_W=BLOCK_W, BLOCK_D=max(16, triton.next_power_of_2(dim)),
                    BLOCK_DV=max(16, triton.next_power_of_2(v.shape[-1])))
        _na_fwd_kernel[grid](q, k, v, rpb_arg, out, lse, heads, height, width, dim, v.shape[-1], dilation, scale,
                             **meta)
        ctx.save_for_backward(q, k, v, rpb_arg, out, lse)
        ctx.args = (kernel_size, dilation, scale, has_rpb, meta, grid, rpb.dtype if has_rpb else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rpb_arg, out, lse = ctx.saved_tensors
        kernel_size, dilation, scale, has_rpb, meta, grid, rpb_dtype = ctx.args
        batch, heads, height, width, dim = q.shape
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()
        dq = torch.empty_like(q)
        # Scattered with atomics (a key sits in up to k^2 windows): fp32 buffers, cast at the end.
        dk = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
        drpb = torch.zeros((heads, 2 * kernel_size - 1, 2 * kernel_size - 1), device=q.device, dtype=torch.float32)
        _na_bwd_kernel[grid](q, k, v, rpb_arg, grad_out, lse, delta, dq, dk, dv, drpb,
                             heads, height, width, dim, v.shape[-1], dilation, scale, **meta)
        grad_rpb = drpb.to(rpb_dtype) if has_rpb else None
        return dq, dk.to(k.dtype), dv.to(v.dtype), grad_rpb, None, None, None


def neighborhood_attention_2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Return 2D (dilated) neighborhood attention (B, heads, H, W, head_dim) in q's dtype; NATTEN semantics."""
    _check_inputs(q, k, v, kernel_size, dilation, rpb)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = q.dtype
    work = torch.float32 if q.dtype == torch.bfloat16 else q.dtype  # interpreter: bf16 computed in fp32
    q_, k_, v_ = (t.to(work).contiguous() for t in (q, k, v))
    rpb_ = rpb.to(torch.float32 if rpb.dtype == torch.bfloat16 else rpb.dtype) if rpb is not None else None
    out = _NeighborhoodAttention.apply(q_, k_, v_, rpb_, kernel_size, dilation, scale)
    return out.to(out_dtype)
