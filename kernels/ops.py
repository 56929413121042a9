"""The public kernel ops: one function per op, dispatching to Triton or the PyTorch reference.

Each op is registered here with `register_op(name, reference="module:fn", triton="module:fn")`
and exposed as a function that calls `dispatch(name, tensor.device)`. Model code calls only
these functions, never a kernel module directly.
"""

from __future__ import annotations

from torch import Tensor

from kernels.dispatch import OPS, dispatch, register_op, select_backend

__all__ = ["OPS", "dispatch", "register_op", "select_backend"]

register_op(
    "neighborhood_attention_2d",
    reference="kernels.neighborhood_attention_ref:neighborhood_attention_2d",
    triton=None,
)


def neighborhood_attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Return 2D (dilated) neighborhood attention, (B, heads, H, W, head_dim), NATTEN semantics.

    q, k, v: (B, heads, H, W, head_dim); rpb: (heads, 2k-1, 2k-1) relative position bias or None;
    scale defaults to head_dim ** -0.5. Windows shift inward at borders; needs H, W >= k*dilation.
    """
    return dispatch("neighborhood_attention_2d", q.device)(q, k, v, kernel_size, dilation, rpb, scale)
