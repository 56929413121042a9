"""The public kernel ops: one function per op, dispatching to Triton or the PyTorch reference.

Each op is registered here with `register_op(name, reference="module:fn", triton="module:fn")`
and exposed as a function that calls `dispatch(name, tensor.device)`. Model code calls only
these functions, never a kernel module directly.
"""

from __future__ import annotations

from kernels.dispatch import OPS, dispatch, register_op, select_backend

__all__ = ["OPS", "dispatch", "register_op", "select_backend"]

register_op("gated_attention_pool", reference="kernels.gated_attention_pool_ref:gated_attention_pool_ref")


def gated_attention_pool(h, wv, bv, wu, bu, ww, bw, mask=None):
    """Gated attention MIL pooling with K branches: (pooled (K, D), logits (K, N) unmasked); see the reference."""
    return dispatch("gated_attention_pool", h.device)(h, wv, bv, wu, bu, ww, bw, mask)
