"""PyTorch reference of gated attention pooling (Ilse et al. 2018; K branches as in ACMIL).

For instance features h (N, D):

    logits = ww @ (tanh(wv h + bv) * sigmoid(wu h + bu)) + bw          (K, N)
    pooled = softmax(logits with masked instances set to -inf, over N) @ h   (K, D)

This file defines correctness for the op `kernels.ops.gated_attention_pool`; the Triton
kernel (issue 11) keeps the same signature. Small bags run in one dense pass; large bags
run in chunks of CHUNK_INSTANCES with an online (running max / running sum) softmax, so
memory stays at the features plus O(K N) logits and never holds an (N, L) activation of
the whole bag. The two paths agree to float rounding (tested up to N = 100k).
"""

from __future__ import annotations

import torch

# Above this many instances the pool runs chunked; 16k x L=128 fp32 is 8 MiB per activation.
CHUNK_INSTANCES = 16384


def _check_inputs(h, wv, bv, wu, bu, ww, bw, mask) -> torch.Tensor | None:
    """Validate shapes; return the mask broadcast to (K, N) bool, or None."""
    if h.dim() != 2:
        raise ValueError(f"gated_attention_pool: h must be (N, D), got shape {tuple(h.shape)}")
    n, d = h.shape
    if n == 0:
        raise ValueError("gated_attention_pool: the bag is empty (N = 0)")
    hidden = wv.shape[0]
    if wv.shape != (hidden, d) or wu.shape != (hidden, d):
        raise ValueError(f"gated_attention_pool: wv/wu must be (L, {d}), got {tuple(wv.shape)} and {tuple(wu.shape)}")
    if bv.shape != (hidden,) or bu.shape != (hidden,):
        raise ValueError(f"gated_attention_pool: bv/bu must be ({hidden},), got {tuple(bv.shape)} and {tuple(bu.shape)}")
    if ww.dim() != 2 or ww.shape[1] != hidden:
        raise ValueError(f"gated_attention_pool: ww must be (K, {hidden}), got {tuple(ww.shape)}")
    k = ww.shape[0]
    if bw.shape != (k,):
        raise ValueError(f"gated_attention_pool: bw must be ({k},), got {tuple(bw.shape)}")
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"gated_attention_pool: mask must be bool (False = excluded), got {mask.dtype}")
    if mask.shape == (n,):
        mask = mask.unsqueeze(0).expand(k, n)
    elif mask.shape != (k, n):
        raise ValueError(f"gated_attention_pool: mask must be ({k}, {n}) or ({n},), got {tuple(mask.shape)}")
    if not bool(mask.any(dim=1).all()):
        # softmax over an empty set has no value; STKIM never masks every instance.
        raise ValueError("gated_attention_pool: the mask excludes every instance of at least one branch")
    return mask


def gated_attention_logits(h: torch.Tensor, wv, bv, wu, bu, ww, bw) -> torch.Tensor:
    """Return raw gated attention scores (K, N) for instances h (N, D), in h's dtype."""
    gate = torch.tanh(torch.nn.functional.linear(h, wv, bv)) * torch.sigmoid(torch.nn.functional.linear(h, wu, bu))
    return torch.nn.functional.linear(gate, ww, bw).transpose(0, 1)


def _accumulation_dtype(h: torch.Tensor) -> torch.dtype:
    """Softmax and sums run in fp32 for half inputs, in h's dtype for fp32/fp64."""
    return torch.promote_types(h.dtype, torch.float32)


def _pool_dense(h, wv, bv, wu, bu, ww, bw, mask):
    logits = gated_attention_logits(h, wv, bv, wu, bu, ww, bw)
    acc = _accumulation_dtype(h)
    scores = logits.to(acc)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=1)
    pooled = (weights @ h.to(acc)).to(h.dtype)
    return pooled, logits


def _pool_online(h, wv, bv, wu, bu, ww, bw, mask, chunk: int):
    """Chunked pool with an online softmax: exact, O(chunk * L) activation memory."""
    n, d = h.shape
    k = ww.shape[0]
    acc = _accumulation_dtype(h)
    running_max = torch.full((k, 1), float("-inf"), device=h.device, dtype=acc)
    running_sum = torch.zeros((k, 1), device=h.device, dtype=acc)
    accumulator = torch.zeros((k, d), device=h.device, dtype=acc)
    # One preallocated (K, N) output: small per-chunk tensors kept alive between the large
    # temporaries would fragment the CPU heap and inflate resident memory by hundreds of MiB.
    all_logits = torch.empty((k, n), device=h.device, dtype=torch.result_type(h, wv))
    for start in range(0, n, chunk):
        h_chunk = h[start : start + chunk]
        logits = gated_attention_logits(h_chunk, wv, bv, wu, bu, ww, bw)
        all_logits[:, start : start + chunk] = logits
        scores = logits.to(acc)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, start : start + chunk], float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(dim=1, keepdim=True))
        # A branch whose instances so far are all masked keeps max = -inf; shift by 0 there to avoid nan.
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        rescale = torch.exp(running_max - shift)
        exp_scores = torch.exp(scores - shift)
        running_sum = running_sum * rescale + exp_scores.sum(dim=1, keepdim=True)
        accumulator = accumulator * rescale + exp_scores @ h_chunk.to(acc)
        running_max = new_max
    pooled = (accumulator / running_sum).to(h.dtype)
    return pooled, all_logits


def gated_attention_pool_ref(
    h: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    wu: torch.Tensor,
    bu: torch.Tensor,
    ww: torch.Tensor,
    bw: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pooled (K, D) = softmax(masked logits) @ h, logits (K, N) unmasked raw scores)."""
    mask = _check_inputs(h, wv, bv, wu, bu, ww, bw, mask)
    if h.shape[0] <= CHUNK_INSTANCES:
        return _pool_dense(h, wv, bv, wu, bu, ww, bw, mask)
    return _pool_online(h, wv, bv, wu, bu, ww, bw, mask, CHUNK_INSTANCES)
