"""PyTorch reference for slide attention (op `slide_attention`): attention over 10^4-10^6 patch tokens.

Which keys a query sees (all conditions that are given must hold):
- LongNet-style dilated segments (Ding et al. 2023, used by Prov-GigaPath): tokens are cut into
  segments of `segment_length` consecutive positions; inside a segment, a query attends to the
  keys whose offset in the segment has the same residue modulo `dilation`. Every residue is
  computed (LongNet spreads the residues over heads; here every head computes all of them, so
  each token has an output), and the work per segment drops from w^2 to w^2 / dilation.
  Several (segment_length, dilation) calls can be mixed as LongNet does with the returned
  logsumexp: weights softmax over the branches' lse.
- 2D local windows over `coords` (B, N, 2), the patch-grid positions (column, row) of
  tissue-only, irregular grids: a query attends to keys within `window_radius` grid steps in
  both axes (Chebyshev distance).
- `key_padding_mask` (B, N), True = real token, for ragged batches.
A query with no allowed key outputs zeros and has logsumexp -inf.

This reference defines correctness for the Triton kernel (kernels/slide_attention.py). It runs
in query chunks: each chunk materialises (chunk x N) scores, never N x N, and its backward
recomputes each chunk (activation checkpointing), so memory stays O(chunk * N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Query chunk: chunk * N scores per (batch, head) stay under 2^24 elements (64 MiB in fp32).
SCORE_BUDGET = 1 << 24


def token_groups(num_tokens: int, segment_length: int | None, dilation: int, device) -> torch.Tensor:
    """Return the (N,) int64 group of every position: queries attend only within their group."""
    pos = torch.arange(num_tokens, device=device)
    length = segment_length or num_tokens
    return (pos // length) * dilation + (pos % length) % dilation


def check_slide_inputs(q, k, v, coords, segment_length, dilation, window_radius, key_padding_mask) -> None:
    """Validate shapes and pattern arguments; raise ValueError naming the bad one."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "slide_attention expects q, k, v of one shape (B, heads, N, head_dim); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, _, n, _ = q.shape
    if segment_length is not None and segment_length < 1:
        raise ValueError(f"segment_length must be >= 1, got {segment_length}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if window_radius is not None:
        if window_radius < 0:
            raise ValueError(f"window_radius must be >= 0, got {window_radius}")
        if coords is None:
            raise ValueError("window_radius needs coords (B, N, 2): the patch-grid position of every token")
    if coords is not None:
        if coords.shape != (batch, n, 2):
            raise ValueError(f"coords must be (B, N, 2) = ({batch}, {n}, 2), got {tuple(coords.shape)}")
        if coords.is_floating_point():
            raise ValueError("coords must be integer patch-grid indices (divide pixel coords by the patch size)")
    if key_padding_mask is not None and (key_padding_mask.shape != (batch, n) or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"key_padding_mask must be bool (B, N) = ({batch}, {n}), got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)}")


def allowed_pairs(rows: torch.Tensor, groups, coords, window_radius, key_padding_mask) -> torch.Tensor:
    """Return bool (B, len(rows), N): which keys each query in `rows` may attend to."""
    batch = coords.shape[0] if coords is not None else (key_padding_mask.shape[0] if key_padding_mask is not None else 1)
    allowed = (groups[rows, None] == groups[None, :]).unsqueeze(0).expand(batch, -1, -1)
    if window_radius is not None:
        delta = (coords[:, rows, None, :] - coords[:, None, :, :]).abs()
        allowed = allowed & (delta.amax(dim=-1) <= window_radius)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    return allowed


def _attend_chunk(q_chunk, k, v, allowed, scale):
    """Softmax attention of one query chunk; returns (out, lse); empty rows give 0 and -inf."""
    acc = torch.promote_types(q_chunk.dtype, torch.float32)
    scores = (q_chunk.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    weights = weights.masked_fill(~allowed[:, None], 0.0)
    return (weights @ v.to(acc)).to(q_chunk.dtype), lse


def slide_attention_ref(
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
    """Return (out (B, heads, N, head_dim) in q's dtype, logsumexp (B, heads, N) fp32) under the sparsity pattern."""
    check_slide_inputs(q, k, v, coords, segment_length, dilation, window_radius, key_padding_mask)
    batch, heads, n, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    groups = token_groups(n, segment_length, dilation, q.device)
    chunk = max(1, min(n, SCORE_BUDGET // max(1, batch * heads * n)))
    outs, lses = [], []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(n, start + chunk), device=q.device)
        allowed = allowed_pairs(rows, groups, coords, window_radius, key_padding_mask).expand(batch, -1, -1)
        q_chunk = q[:, :, start : start + chunk]
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse = checkpoint(_attend_chunk, q_chunk, k, v, allowed, scale, use_reentrant=False)
        else:
            out, lse = _attend_chunk(q_chunk, k, v, allowed, scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2).float()


def dense_attention_naive(q, k, v, allowed: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The definition written plainly with a full (B, 1|heads, N, N) bool mask; for tests on small N only."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(F.softmax(scores, dim=-1), nan=0.0)
    return weights @ v
