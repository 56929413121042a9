"""Triton flash-attention kernel for slide transformers (op `slide_attention`), forward and backward.

Same contract as kernels/slide_attention_ref.py (dilated LongNet segments, 2D-local windows over
patch-grid coords, key padding). Algorithm:
- The pattern is expressed per token as an integer group (segment * dilation + residue) and a
  grid position; a query sees a key iff the groups match, the key is real and (with a window)
  both grid offsets are within the radius. The wrapper sorts tokens by group and, with a window,
  by 8 x 4 tiles of the patch grid (`token_order`), and precomputes per block of 32 tokens
  the min/max group and the bounding box of its coords. A query block then skips every key block
  whose group range or expanded box does not meet its own: the work follows the pattern's
  sparsity (segments and windows cost what they attend to, up to block granularity).
- forward: online softmax over the kept key blocks (flash attention 2), fp32 accumulation,
  saves the logsumexp (B, heads, N).
- backward: delta = rowsum(dO * O) - dlse; one kernel per key block accumulates dK, dV over the
  query blocks that meet it, one per query block accumulates dQ; scores are recomputed from the
  saved logsumexp, so no (N x N) tensor ever exists. Memory: O(N * head_dim).
Padding sizes: any N, any head_dim (tiles are padded to powers of two >= 16 and masked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medai.kernels.slide_attention_ref import check_slide_inputs, token_groups

BLOCK = 32  # tokens per query / key tile (>= 16 for tl.dot); tuned for the interpreter, 64-128 on a GPU
_NO_WINDOW = 1 << 30


@triton.jit
def _scores(q, k_ptrs, kv_mask, gq, xq, yq, offs_k, g_ptr, xy_ptr, ok_ptr, N, scale, radius,
            HAS_WINDOW: tl.constexpr):
    """Scaled scores (BLOCK_M, BLOCK_N) of a query tile against one key tile, and which pairs are allowed."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    k_in = offs_k < N
    gk = tl.load(g_ptr + offs_k, mask=k_in, other=-1)
    ok = tl.load(ok_ptr + offs_k, mask=k_in, other=0) != 0
    allowed = (gq[:, None] == gk[None, :]) & ok[None, :]
    if HAS_WINDOW:
        xk = tl.load(xy_ptr + offs_k * 2, mask=k_in, other=0)
        yk = tl.load(xy_ptr + offs_k * 2 + 1, mask=k_in, other=0)
        dx = xq[:, None] - xk[None, :]
        dy = yq[:, None] - yk[None, :]
        allowed = allowed & (dx <= radius) & (dx >= -radius) & (dy <= radius) & (dy >= -radius)
    return s, allowed


@triton.jit
def _blocks_meet(qinfo_ptr, kinfo_ptr, kb, radius, HAS_WINDOW: tl.constexpr):
    """True when key block kb can hold an allowed key for the query block described at qinfo_ptr."""
    meet = (tl.load(kinfo_ptr + kb * 6) <= tl.load(qinfo_ptr + 1)) & (tl.load(kinfo_ptr + kb * 6 + 1) >= tl.load(qinfo_ptr))
    if HAS_WINDOW:
        meet = meet & (tl.load(kinfo_ptr + kb * 6 + 2) <= tl.load(qinfo_ptr + 3) + radius)
        meet = meet & (tl.load(kinfo_ptr + kb * 6 + 3) >= tl.load(qinfo_ptr + 2) - radius)
        meet = meet & (tl.load(kinfo_ptr + kb * 6 + 4) <= tl.load(qinfo_ptr + 5) + radius)
        meet = meet & (tl.load(kinfo_ptr + kb * 6 + 5) >= tl.load(qinfo_ptr + 4) - radius)
    return meet


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, g_ptr, xy_ptr, ok_ptr, qinfo_ptr, kinfo_ptr,
                N, Dh, heads, num_blocks, scale, radius,
                HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    base = bh.to(tl.int64) * N * Dh
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < N
    d_in = offs_d < Dh
    q = tl.load(q_ptr + base + offs_m[:, None] * Dh + offs_d[None, :], mask=m_in[:, None] & d_in[None, :],
                other=0.0).to(tl.float32)
    g_b = g_ptr + b * N
    xy_b = xy_ptr + b * N * 2
    ok_b = ok_ptr + b * N
    gq = tl.load(g_b + offs_m, mask=m_in, other=-2)
    xq = tl.load(xy_b + offs_m * 2, mask=m_in, other=0)
    yq = tl.load(xy_b + offs_m * 2 + 1, mask=m_in, other=0)
    qinfo = qinfo_ptr + (b * num_blocks + qb) * 6
    kinfo = kinfo_ptr + b * num_blocks * 6
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for kb in range(0, num_blocks):
        if _blocks_meet(qinfo, kinfo, kb, radius, HAS_WINDOW):
            offs_k = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_mask = (offs_k[:, None] < N) & d_in[None, :]
            tile = base + offs_k[:, None] * Dh + offs_d[None, :]
            s, allowed = _scores(q, k_ptr + tile, kv_mask, gq, xq, yq, offs_k, g_b, xy_b, ok_b, N, scale, radius,
                                 HAS_WINDOW)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
            p = tl.where(allowed, tl.exp(s - shift[:, None]), 0.0)
            rescale = tl.exp(m_i - shift)
            v = tl.load(v_ptr + tile, mask=kv_mask, other=0.0).to(tl.float32)
            l_i = l_i * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, m_i + tl.log(tl.where(has_any, l_i, 1.0)), float("-inf"))
    tl.store(o_ptr + base + offs_m[:, None] * Dh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_in[:, None] & d_in[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + offs_m, lse, mask=m_in)


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, g_ptr, xy_ptr, ok_ptr,
                     qinfo_ptr, kinfo_ptr, N, Dh, heads, num_blocks, scale, radius,
                     HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    base = bh.to(tl.int64) * N * Dh
    offs_k = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < Dh
    kv_mask = (offs_k[:, None] < N) & d_in[None, :]
    k_tile = base + offs_k[:, None] * Dh + offs_d[None, :]
    v = tl.load(v_ptr + k_tile, mask=kv_mask, other=0.0).to(tl.float32)
    g_b = g_ptr + b * N
    xy_b = xy_ptr + b * N * 2
    ok_b = ok_ptr + b * N
    kinfo = kinfo_ptr + b * num_blocks * 6
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for qb in range(0, num_blocks):
        qinfo = qinfo_ptr + (b * num_blocks + qb) * 6
        if _blocks_meet(qinfo, kinfo, kb, radius, HAS_WINDOW):
            offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
            m_in = offs_m < N
            q_mask = m_in[:, None] & d_in[None, :]
            q_tile = base + offs_m[:, None] * Dh + offs_d[None, :]
            q = tl.load(q_ptr + q_tile, mask=q_mask, other=0.0).to(tl.float32)
            do = tl.load(do_ptr + q_tile, mask=q_mask, other=0.0).to(tl.float32)
            gq = tl.load(g_b + offs_m, mask=m_in, other=-2)
            xq = tl.load(xy_b + offs_m * 2, mask=m_in, other=0)
            yq = tl.load(xy_b + offs_m * 2 + 1, mask=m_in, other=0)
            lse = tl.load(lse_ptr + bh.to(tl.int64) * N + offs_m, mask=m_in, other=0.0)
            delta = tl.load(delta_ptr + bh.to(tl.int64) * N + offs_m, mask=m_in, other=0.0)
            s, allowed = _scores(q, k_ptr + k_tile, kv_mask, gq, xq, yq, offs_k, g_b, xy_b, ok_b, N, scale, radius,
                                 HAS_WINDOW)
            p = tl.where(allowed, tl.exp(s - tl.where(allowed, lse[:, None], 0.0)), 0.0)
            dv += tl.dot(tl.trans(p), do, input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee") * scale
    tl.store(dk_ptr + k_tile, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + k_tile, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, g_ptr, xy_ptr, ok_ptr,
                   qinfo_ptr, kinfo_ptr, N, Dh, heads, num_blocks, scale, radius,
                   HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    base = bh.to(tl.int64) * N * Dh
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < N
    d_in = offs_d < Dh
    q_mask = m_in[:, None] & d_in[None, :]
    q_tile = base + offs_m[:, None] * Dh + offs_d[None, :]
    q = tl.load(q_ptr + q_tile, mask=q_mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + q_tile, mask=q_mask, other=0.0).to(tl.float32)
    g_b = g_ptr + b * N
    xy_b = xy_ptr + b * N * 2
    ok_b = ok_ptr + b * N
    gq = tl.load(g_b + offs_m, mask=m_in, other=-2)
    xq = tl.load(xy_b + offs_m * 2, mask=m_in, other=0)
    yq = tl.load(xy_b + offs_m * 2 + 1, mask=m_in, other=0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * N + offs_m, mask=m_in, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * N + offs_m, mask=m_in, other=0.0)
    qinfo = qinfo_ptr + (b * num_blocks + qb) * 6
    kinfo = kinfo_ptr + b * num_blocks * 6
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for kb in range(0, num_blocks):
        if _blocks_meet(qinfo, kinfo, kb, radius, HAS_WINDOW):
            offs_k = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_mask = (offs_k[:, None] < N) & d_in[None, :]
            tile = base + offs_k[:, None] * Dh + offs_d[None, :]
            s, allowed = _scores(q, k_ptr + tile, kv_mask, gq, xq, yq, offs_k, g_b, xy_b, ok_b, N, scale, radius,
                                 HAS_WINDOW)
            p = tl.where(allowed, tl.exp(s - tl.where(allowed, lse[:, None], 0.0)), 0.0)
            v = tl.load(v_ptr + tile, mask=kv_mask, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + tile, mask=kv_mask, other=0.0).to(tl.float32)
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds, k, input_precision="ieee") * scale
    tl.store(dq_ptr + q_tile, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


def _block_info(groups: torch.Tensor, xy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per block of BLOCK tokens: (min group, max group, min x, max x, min y, max y) over `valid` tokens, int32.

    A block with no valid token gets an empty range (min > max), so nothing meets it.
    """
    batch, n = groups.shape
    blocks = triton.cdiv(n, BLOCK)
    pad = blocks * BLOCK - n
    big, small = torch.iinfo(torch.int32).max // 4, torch.iinfo(torch.int32).min // 4

    def reduce(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = _pad_right(values.masked_fill(~valid, big), pad, big).view(batch, blocks, BLOCK).amin(-1)
        high = _pad_right(values.masked_fill(~valid, small), pad, small).view(batch, blocks, BLOCK).amax(-1)
        return low, high

    parts = [*reduce(groups), *reduce(xy[..., 0]), *reduce(xy[..., 1])]
    return torch.stack(parts, dim=-1).to(torch.int32).contiguous()


def _pad_right(values: torch.Tensor, pad: int, fill: int) -> torch.Tensor:
    """Right-pad the last axis with `fill`."""
    return torch.nn.functional.pad(values, (0, pad), value=fill)


class _SlideAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, groups, xy, key_ok, scale, radius, has_window):
        batch, heads, n, dim = q.shape
        blocks = triton.cdiv(n, BLOCK)
        qinfo = _block_info(groups, xy, torch.ones_like(key_ok, dtype=torch.bool))
        kinfo = _block_info(groups, xy, key_ok.bool())
        out = torch.empty_like(q)
        lse = torch.empty((batch, heads, n), device=q.device, dtype=torch.float32)
        meta = dict(HAS_WINDOW=has_window, BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=max(16, triton.next_power_of_2(dim)))
        _fwd_kernel[(blocks, batch * heads)](q, k, v, out, lse, groups, xy, key_ok, qinfo, kinfo,
                                             n, dim, heads, blocks, scale, radius, **meta)
        ctx.save_for_backward(q, k, v, out, lse, groups, xy, key_ok, qinfo, kinfo)
        ctx.args = (scale, radius, meta)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, groups, xy, key_ok, qinfo, kinfo = ctx.saved_tensors
        scale, radius, meta = ctx.args
        batch, heads, n, dim = q.shape
        blocks = triton.cdiv(n, BLOCK)
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1)
        if grad_lse is not None:  # d lse / d s = p: folds into delta (rows with lse = -inf have p = 0)
            delta = delta - torch.nan_to_num(grad_lse.float(), nan=0.0, posinf=0.0, neginf=0.0)
        delta = delta.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (groups, xy, key_ok, qinfo, kinfo, n, dim, heads, blocks, scale, radius)
        _bwd_dkdv_kernel[(blocks, batch * heads)](q, k, v, grad_out, lse, delta, dk, dv, *common, **meta)
        _bwd_dq_kernel[(blocks, batch * heads)](q, k, v, grad_out, lse, delta, dq, *common, **meta)
        return dq, dk, dv, None, None, None, None, None, None


TILE_W, TILE_H = 8, 4  # a 32-token block covers an 8 x 4 patch tile: compact boxes for 2D windows


def token_order(groups: torch.Tensor, coords: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Return the (B, N) order the kernel sees tokens in, or None to keep theirs.

    Tokens are sorted by group (segments and dilation residues become contiguous runs), then, with
    a window, by 8 x 4 tiles of the patch grid, so each block of 32 tokens covers a compact box and
    meets few key blocks. Any order is correct (the result is put back); this one is fast.
    """
    if coords is None:
        if bool((groups[1:] >= groups[:-1]).all()):
            return None  # dense or contiguous segments: already grouped
        return torch.argsort(groups, stable=True).expand(batch, -1)
    x = coords[..., 0].long() - coords[..., 0].amin(dim=1, keepdim=True)
    y = coords[..., 1].long() - coords[..., 1].amin(dim=1, keepdim=True)
    tiles_x = int(x.max()) // TILE_W + 1
    tiles_y = int(y.max()) // TILE_H + 1
    tile = (y // TILE_H) * tiles_x + x // TILE_W
    within = (y % TILE_H) * TILE_W + x % TILE_W
    key = (groups.long()[None] * (tiles_x * tiles_y) + tile) * (TILE_W * TILE_H) + within
    return torch.argsort(key, dim=1, stable=True)


def slide_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: torch.Tensor | None = None,
    segment_length: int | None = None,
    dilation: int = 1,
    window_radius: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (out (B, heads, N, head_dim) in q's dtype, logsumexp (B, heads, N) fp32); see the reference for the pattern."""
    check_slide_inputs(q, k, v, coords, segment_length, dilation, window_radius, key_padding_mask)
    batch, heads, n, dim = q.shape
    scale = dim**-0.5 if scale is None else float(scale)
    out_dtype = q.dtype
    work = torch.float32 if q.dtype == torch.bfloat16 else q.dtype  # interpreter: bf16 computed in fp32
    groups = token_groups(n, segment_length, dilation, q.device)
    has_window = window_radius is not None
    order = token_order(groups, coords if has_window else None, batch)  # (B, N) or None

    def arrange(t: torch.Tensor, axis: int) -> torch.Tensor:
        if order is None:
            return t
        index = order.view(batch, *([1] * (axis - 1)), n, *([1] * (t.dim() - axis - 1))).expand(
            *t.shape[:axis], n, *t.shape[axis + 1 :])
        return t.gather(axis, index)

    xy = arrange(coords, 1).to(torch.int32) if has_window else torch.zeros((batch, n, 2), dtype=torch.int32, device=q.device)
    key_ok = key_padding_mask if key_padding_mask is not None else torch.ones((batch, n), dtype=torch.bool, device=q.device)
    key_ok = arrange(key_ok, 1).to(torch.int8).contiguous()
    group_ids = arrange(groups.expand(batch, n), 1).to(torch.int32).contiguous()
    q_, k_, v_ = (arrange(t, 2).to(work).contiguous() for t in (q, k, v))
    radius = int(window_radius) if has_window else _NO_WINDOW
    out, lse = _SlideAttention.apply(q_, k_, v_, group_ids, xy.contiguous(), key_ok, scale, radius, has_window)
    if order is not None:
        inverse = torch.argsort(order, dim=1)
        out = out.gather(2, inverse[:, None, :, None].expand_as(out))
        lse = lse.gather(2, inverse[:, None, :].expand_as(lse))
    return out.to(out_dtype), lse


def visited_block_fraction(
    num_tokens: int,
    coords: torch.Tensor | None = None,
    segment_length: int | None = None,
    dilation: int = 1,
    window_radius: int | None = None,
) -> float:
    """Return the fraction of (query block, key block) pairs the kernel computes for this pattern (1.0 = dense).

    The same block test as the kernel (`_blocks_meet`), evaluated on the host for one slide: this is
    the work the sparse pattern leaves, to compare with its FLOP reduction.
    """
    device = coords.device if coords is not None else "cpu"
    groups = token_groups(num_tokens, segment_length, dilation, device)
    order = token_order(groups, coords[:1] if window_radius is not None else None, 1)
    order = torch.arange(num_tokens, device=device) if order is None else order[0]
    xy = (coords[0] if coords is not None else torch.zeros(num_tokens, 2, dtype=torch.long))[order].to(torch.int32)
    info = _block_info(groups[order].to(torch.int32)[None], xy[None], torch.ones(1, num_tokens, dtype=torch.bool))[0]
    meet = (info[None, :, 0] <= info[:, None, 1]) & (info[None, :, 1] >= info[:, None, 0])
    if window_radius is not None:
        r = window_radius
        meet &= (info[None, :, 2] <= info[:, None, 3] + r) & (info[None, :, 3] >= info[:, None, 2] - r)
        meet &= (info[None, :, 4] <= info[:, None, 5] + r) & (info[None, :, 5] >= info[:, None, 4] - r)
    return float(meet.float().mean())
