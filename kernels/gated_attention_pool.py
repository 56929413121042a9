"""Triton kernel for gated attention MIL pooling (op `gated_attention_pool`), forward and backward.

Algorithm (one pass over the instances H, as flash attention does for keys):
- forward: a fixed number of programs (NUM_SPLITS, independent of N) each walk every
  NUM_SPLITS-th block of BLOCK_N instances (times D / D_CHUNK programs, each owning one D-chunk of
  the pooled output and recomputing the logits, which reads h in D-chunks). Per block: read h, compute the
  tanh and sigmoid branches (two dots with wv, wu), the gate, the K logits (a dot with ww),
  store the logits, and fold the block into a running max / sum / sum(p*s) / (K, D) accumulator
  (online softmax). A tiny torch combine merges the NUM_SPLITS partials into pooled (K, D), the
  logsumexp (K,) and the attention entropy (K,).
- backward: recompute the logits per block from h and the saved logsumexp (no (K, N)
  probabilities are kept), p = exp(s - lse), dS = p * (h dpooled^T - delta) + dlogits with
  delta = sum_d dpooled * pooled, then dh = p^T dpooled + dhv wv + dhu wu per block and the
  parameter gradients as per-program partials summed afterwards (deterministic, no atomics).

Memory beyond the inputs: the (K, N) logits the op returns, plus NUM_SPLITS x (K, D) forward and
NUM_SPLITS x (2 L D + K L + ...) backward workspaces: independent of N. Registers per program are
bounded by D_CHUNK (h and weight tiles of BLOCK_N x D_CHUNK and D_CHUNK x L), not by D.

The interpreter (TRITON_INTERPRET=1) runs this on CPU; bf16 inputs are computed in fp32 (the
interpreter mishandles bf16 arithmetic); dots use input_precision="ieee" so fp32 matches the
reference tightly (TF32 would be faster on a GPU at ~1e-3 error).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medai.kernels.gated_attention_pool_ref import _check_inputs

# Programs per launch: enough to fill an H100 (132 SMs) twice; the combine work is NUM_SPLITS*K*D.
NUM_SPLITS = 264
# h and the weights are read in D-chunks of this many columns: registers stay bounded for D = 1024+.
D_CHUNK = 128


def _block(n: int, minimum: int = 16) -> int:
    """Power-of-two tile size covering n (tl.dot needs every dimension >= 16)."""
    return max(minimum, triton.next_power_of_2(n))


@triton.jit
def _gate_logits(h_ptr, offs_n, n_ok, wv_ptr, bv_ptr, wu_ptr, bu_ptr, ww_ptr, bw_ptr, dpooled_ptr, D, L, K,
                 WITH_DP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_L: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """For one block of instances: (a = tanh branch, b = sigmoid branch, gate, logits (BLOCK_N, BLOCK_K), dp).

    h and the weights are read in D-chunks of BLOCK_DC, so register use does not grow with D.
    dp = h . dpooled^T (BLOCK_N, BLOCK_K) is accumulated in the same walk when WITH_DP (backward).
    """
    offs_dc = tl.arange(0, BLOCK_DC)
    offs_l = tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, BLOCK_K)
    pre_v = tl.zeros((BLOCK_N, BLOCK_L), tl.float32)
    pre_u = tl.zeros((BLOCK_N, BLOCK_L), tl.float32)
    dp = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for d0 in range(0, D, BLOCK_DC):
        offs_d = d0 + offs_dc
        d_ok = offs_d < D
        h = tl.load(h_ptr + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        ld_mask = (offs_l[None, :] < L) & d_ok[:, None]
        # W^T chunks (BLOCK_DC, BLOCK_L): column l holds row l of wv / wu.
        wv_t = tl.load(wv_ptr + offs_l[None, :] * D + offs_d[:, None], mask=ld_mask, other=0.0).to(tl.float32)
        wu_t = tl.load(wu_ptr + offs_l[None, :] * D + offs_d[:, None], mask=ld_mask, other=0.0).to(tl.float32)
        pre_v += tl.dot(h, wv_t, input_precision="ieee")
        pre_u += tl.dot(h, wu_t, input_precision="ieee")
        if WITH_DP:
            dpooled_t = tl.load(dpooled_ptr + offs_k[None, :] * D + offs_d[:, None],
                                mask=(offs_k[None, :] < K) & d_ok[:, None], other=0.0)  # (BLOCK_DC, BLOCK_K)
            dp += tl.dot(h, dpooled_t, input_precision="ieee")
    pre_v += tl.load(bv_ptr + offs_l, mask=offs_l < L, other=0.0).to(tl.float32)[None, :]
    pre_u += tl.load(bu_ptr + offs_l, mask=offs_l < L, other=0.0).to(tl.float32)[None, :]
    # tanh via exp (no libdevice): tanh(x) = 1 - 2 / (exp(2x) + 1), stable at both ends.
    a = 1.0 - 2.0 / (tl.exp(2.0 * pre_v) + 1.0)
    b = 1.0 / (1.0 + tl.exp(-pre_u))
    gate = a * b
    lk_mask = (offs_l[:, None] < L) & (offs_k[None, :] < K)
    ww_t = tl.load(ww_ptr + offs_k[None, :] * L + offs_l[:, None], mask=lk_mask, other=0.0).to(tl.float32)
    bw = tl.load(bw_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    logits = tl.dot(gate, ww_t, input_precision="ieee") + bw[None, :]
    return a, b, gate, logits, dp


@triton.jit
def _pool_fwd_kernel(
    h_ptr, wv_ptr, bv_ptr, wu_ptr, bu_ptr, ww_ptr, bw_ptr, mask_ptr,
    logits_ptr, m_ptr, l_ptr, t_ptr, acc_ptr,
    N, D, L, K, num_splits,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program (split, chunk): the blocks split, split + num_splits, ...; the pooled columns of D-chunk `chunk`.
    # Every chunk's program recomputes the logits (cheap next to reading h); chunk 0 writes them and the stats.
    split = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_d = chunk * BLOCK_DC + tl.arange(0, BLOCK_DC)
    d_ok = offs_d < D
    offs_k = tl.arange(0, BLOCK_K)
    m_i = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_K,), tl.float32)
    t_i = tl.zeros((BLOCK_K,), tl.float32)  # sum of exp(s - m) * s, for the entropy
    acc = tl.zeros((BLOCK_K, BLOCK_DC), tl.float32)
    num_blocks = tl.cdiv(N, BLOCK_N)
    for block in range(split, num_blocks, num_splits):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        _, _, _, s, _ = _gate_logits(h_ptr, offs_n, n_ok, wv_ptr, bv_ptr, wu_ptr, bu_ptr, ww_ptr, bw_ptr, h_ptr,
                                     D, L, K, False, BLOCK_N, BLOCK_DC, BLOCK_L, BLOCK_K)
        nk_ok = n_ok[:, None] & (offs_k[None, :] < K)
        if chunk == 0:
            tl.store(logits_ptr + offs_k[None, :] * N + offs_n[:, None], s.to(logits_ptr.dtype.element_ty),
                     mask=nk_ok)
        keep = nk_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + offs_k[None, :] * N + offs_n[:, None], mask=nk_ok, other=0) != 0)
        s_kept = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_kept, axis=0))
        # A branch with nothing kept so far keeps m = -inf: shift by 0 there to avoid inf - inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m_i - shift)
        p = tl.where(keep, tl.exp(s_kept - shift[None, :]), 0.0)  # (BLOCK_N, BLOCK_K)
        l_i = l_i * rescale + tl.sum(p, axis=0)
        t_i = t_i * rescale + tl.sum(p * tl.where(keep, s, 0.0), axis=0)
        h_own = tl.load(h_ptr + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(tl.trans(p), h_own, input_precision="ieee")
        m_i = m_new
    k_ok = offs_k < K
    if chunk == 0:
        tl.store(m_ptr + split * K + offs_k, m_i, mask=k_ok)
        tl.store(l_ptr + split * K + offs_k, l_i, mask=k_ok)
        tl.store(t_ptr + split * K + offs_k, t_i, mask=k_ok)
    tl.store(acc_ptr + split * K * D + offs_k[:, None] * D + offs_d[None, :], acc,
             mask=k_ok[:, None] & d_ok[None, :])


@triton.jit
def _pool_bwd_kernel(
    h_ptr, wv_ptr, bv_ptr, wu_ptr, bu_ptr, ww_ptr, bw_ptr, mask_ptr,
    lse_ptr, delta_ptr, dpooled_ptr, dlogits_ptr,
    dh_ptr, dwv_ptr, dbv_ptr, dwu_ptr, dbu_ptr, dww_ptr, dbw_ptr,
    N, D, L, K, num_splits,
    HAS_MASK: tl.constexpr, HAS_DLOGITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (split, chunk): recomputes the scores of its blocks over all of D, then writes the D-chunk
    # `chunk` of dh, dwv, dwu; chunk 0 also writes dww, dbw, dbv, dbu.
    split = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_d = chunk * BLOCK_DC + tl.arange(0, BLOCK_DC)
    offs_k = tl.arange(0, BLOCK_K)
    offs_l = tl.arange(0, BLOCK_L)
    k_ok = offs_k < K
    d_ok = offs_d < D
    l_ok = offs_l < L
    lse = tl.load(lse_ptr + offs_k, mask=k_ok, other=0.0)
    delta = tl.load(delta_ptr + offs_k, mask=k_ok, other=0.0)
    dpooled = tl.load(dpooled_ptr + offs_k[:, None] * D + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                      other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_DC)
    ld_mask = l_ok[:, None] & d_ok[None, :]
    wv = tl.load(wv_ptr + offs_l[:, None] * D + offs_d[None, :], mask=ld_mask, other=0.0).to(tl.float32)
    wu = tl.load(wu_ptr + offs_l[:, None] * D + offs_d[None, :], mask=ld_mask, other=0.0).to(tl.float32)
    ww = tl.load(ww_ptr + offs_k[:, None] * L + offs_l[None, :], mask=k_ok[:, None] & l_ok[None, :],
                 other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_L)
    dwv = tl.zeros((BLOCK_L, BLOCK_DC), tl.float32)
    dwu = tl.zeros((BLOCK_L, BLOCK_DC), tl.float32)
    dbv = tl.zeros((BLOCK_L,), tl.float32)
    dbu = tl.zeros((BLOCK_L,), tl.float32)
    dww = tl.zeros((BLOCK_K, BLOCK_L), tl.float32)
    dbw = tl.zeros((BLOCK_K,), tl.float32)
    num_blocks = tl.cdiv(N, BLOCK_N)
    for block in range(split, num_blocks, num_splits):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        nd_ok = n_ok[:, None] & d_ok[None, :]
        a, b, gate, s, dp = _gate_logits(h_ptr, offs_n, n_ok, wv_ptr, bv_ptr, wu_ptr, bu_ptr, ww_ptr, bw_ptr,
                                         dpooled_ptr, D, L, K, True, BLOCK_N, BLOCK_DC, BLOCK_L, BLOCK_K)
        nk_ok = n_ok[:, None] & k_ok[None, :]
        keep = nk_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + offs_k[None, :] * N + offs_n[:, None], mask=nk_ok, other=0) != 0)
        p = tl.where(keep, tl.exp(s - lse[None, :]), 0.0)  # (BLOCK_N, BLOCK_K), recomputed from the lse
        ds = p * (dp - delta[None, :])
        if HAS_DLOGITS:
            ds += tl.load(dlogits_ptr + offs_k[None, :] * N + offs_n[:, None], mask=nk_ok, other=0.0).to(tl.float32)
        ds = tl.where(nk_ok, ds, 0.0)
        dgate = tl.dot(ds, ww, input_precision="ieee")  # (BLOCK_N, BLOCK_L)
        dww += tl.dot(tl.trans(ds), gate, input_precision="ieee")
        dbw += tl.sum(ds, axis=0)
        row_ok = n_ok[:, None]
        dpre_v = tl.where(row_ok, dgate * b * (1.0 - a * a), 0.0)
        dpre_u = tl.where(row_ok, dgate * a * b * (1.0 - b), 0.0)
        dbv += tl.sum(dpre_v, axis=0)
        dbu += tl.sum(dpre_u, axis=0)
        h_own = tl.load(h_ptr + offs_n[:, None] * D + offs_d[None, :], mask=nd_ok, other=0.0).to(tl.float32)
        dwv += tl.dot(tl.trans(dpre_v), h_own, input_precision="ieee")
        dwu += tl.dot(tl.trans(dpre_u), h_own, input_precision="ieee")
        dh = (tl.dot(p, dpooled, input_precision="ieee") + tl.dot(dpre_v, wv, input_precision="ieee")
              + tl.dot(dpre_u, wu, input_precision="ieee"))
        tl.store(dh_ptr + offs_n[:, None] * D + offs_d[None, :], dh.to(dh_ptr.dtype.element_ty), mask=nd_ok)
    base_ld = split * L * D + offs_l[:, None] * D + offs_d[None, :]
    tl.store(dwv_ptr + base_ld, dwv, mask=ld_mask)
    tl.store(dwu_ptr + base_ld, dwu, mask=ld_mask)
    if chunk == 0:
        tl.store(dbv_ptr + split * L + offs_l, dbv, mask=l_ok)
        tl.store(dbu_ptr + split * L + offs_l, dbu, mask=l_ok)
        tl.store(dww_ptr + split * K * L + offs_k[:, None] * L + offs_l[None, :], dww,
                 mask=k_ok[:, None] & l_ok[None, :])
        tl.store(dbw_ptr + split * K + offs_k, dbw, mask=k_ok)


def _compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """bf16 goes in as fp32 (the interpreter mishandles bf16 arithmetic); others stay, made contiguous."""
    return (t.float() if t.dtype == torch.bfloat16 else t).contiguous()


def _launch_shape(n: int, d: int, hidden: int, k: int) -> tuple[dict, tuple[int, int]]:
    """Tile sizes and the (splits, D-chunks) grid for a bag of n instances."""
    block_n = 32
    block_dc = min(_block(d), D_CHUNK)
    blocks = dict(BLOCK_N=block_n, BLOCK_DC=block_dc, BLOCK_L=_block(hidden), BLOCK_K=_block(k))
    return blocks, (max(1, min(NUM_SPLITS, triton.cdiv(n, block_n))), triton.cdiv(d, block_dc))


def _forward(h, wv, bv, wu, bu, ww, bw, mask):
    """Launch the forward; return (pooled fp32 (K, D), logits (K, N), lse (K,), entropy (K,))."""
    n, d = h.shape
    hidden, k = wv.shape[0], ww.shape[0]
    blocks, grid = _launch_shape(n, d, hidden, k)
    splits = grid[0]
    f32 = dict(device=h.device, dtype=torch.float32)
    logits = torch.empty((k, n), device=h.device, dtype=h.dtype)
    m = torch.empty((splits, k), **f32)
    l_sum = torch.empty((splits, k), **f32)
    t_sum = torch.empty((splits, k), **f32)
    acc = torch.empty((splits, k, d), **f32)
    mask_arg = mask.to(torch.int8).contiguous() if mask is not None else h  # dummy pointer when absent
    _pool_fwd_kernel[grid](
        h, wv, bv, wu, bu, ww, bw, mask_arg, logits, m, l_sum, t_sum, acc,
        n, d, hidden, k, splits, HAS_MASK=mask is not None, **blocks,
    )
    # Combine the per-program partials (NUM_SPLITS x K x D: independent of N).
    m_all = m.amax(dim=0)  # finite: the mask check guarantees one kept instance per branch
    scale = torch.exp(m - m_all)  # splits with nothing kept have m = -inf -> scale 0
    total = (l_sum * scale).sum(dim=0)
    pooled = (acc * scale[..., None]).sum(dim=0) / total[:, None]
    lse = m_all + torch.log(total)
    # entropy = -sum p log p = lse - sum p s
    entropy = lse - (t_sum * scale).sum(dim=0) / total
    return pooled, logits, lse, entropy


class _GatedAttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, wv, bv, wu, bu, ww, bw, mask):
        out_dtype = h.dtype
        tensors = [_compute_dtype(t) for t in (h, wv, bv, wu, bu, ww, bw)]
        pooled, logits, lse, entropy = _forward(*tensors, mask)
        ctx.save_for_backward(*tensors, mask if mask is not None else torch.empty(0), lse, pooled)
        ctx.has_mask = mask is not None
        ctx.dtypes = [t.dtype for t in (h, wv, bv, wu, bu, ww, bw)]
        ctx.mark_non_differentiable(entropy)
        return pooled.to(out_dtype), logits.to(out_dtype), entropy

    @staticmethod
    def backward(ctx, dpooled, dlogits, _dentropy):
        h, wv, bv, wu, bu, ww, bw, mask, lse, pooled = ctx.saved_tensors
        n, d = h.shape
        hidden, k = wv.shape[0], ww.shape[0]
        blocks, grid = _launch_shape(n, d, hidden, k)
        splits = grid[0]
        dpooled = (torch.zeros_like(pooled) if dpooled is None else dpooled.float()).contiguous()
        delta = (dpooled * pooled).sum(dim=1).contiguous()  # sum_n p dp = sum_d dpooled * pooled
        f32 = dict(device=h.device, dtype=torch.float32)
        dh = torch.empty_like(h)
        dwv = torch.empty((splits, hidden, d), **f32)
        dwu = torch.empty((splits, hidden, d), **f32)
        dbv = torch.empty((splits, hidden), **f32)
        dbu = torch.empty((splits, hidden), **f32)
        dww = torch.empty((splits, k, hidden), **f32)
        dbw = torch.empty((splits, k), **f32)
        mask_arg = mask.to(torch.int8).contiguous() if ctx.has_mask else h
        dlogits_arg = dlogits.contiguous() if dlogits is not None else h
        _pool_bwd_kernel[grid](
            h, wv, bv, wu, bu, ww, bw, mask_arg, lse, delta, dpooled, dlogits_arg,
            dh, dwv, dbv, dwu, dbu, dww, dbw, n, d, hidden, k, splits,
            HAS_MASK=ctx.has_mask, HAS_DLOGITS=dlogits is not None, **blocks,
        )
        grads = [dh, dwv.sum(0), dbv.sum(0), dwu.sum(0), dbu.sum(0), dww.sum(0), dbw.sum(0)]
        return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None)


def gated_attention_pool_stats(
    h: torch.Tensor, wv, bv, wu, bu, ww, bw, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (pooled (K, D), logits (K, N) unmasked, attention entropy (K,) in nats) from one fused pass."""
    mask = _check_inputs(h, wv, bv, wu, bu, ww, bw, mask)
    return _GatedAttentionPool.apply(h, wv, bv, wu, bu, ww, bw, mask)


def gated_attention_pool(
    h: torch.Tensor, wv, bv, wu, bu, ww, bw, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pooled (K, D) = softmax(masked logits) @ h, logits (K, N) unmasked); same contract as the reference."""
    pooled, logits, _ = gated_attention_pool_stats(h, wv, bv, wu, bu, ww, bw, mask)
    return pooled, logits


def top_instances(logits: torch.Tensor, count: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Return the indices (K, count) of the highest-scoring kept instances per branch (ACMIL's MBA / AEM top-k)."""
    if mask is not None:
        logits = logits.masked_fill(~mask.expand_as(logits), float("-inf"))
    return logits.topk(min(count, logits.shape[1]), dim=1).indices
