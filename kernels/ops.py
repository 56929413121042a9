"""The public kernel ops: one function per op, dispatching to Triton or the PyTorch reference.

Each op is registered here with `register_op(name, reference="module:fn", triton="module:fn")`
and exposed as a function that calls `dispatch(name, tensor.device)`. Model code calls only
these functions, never a kernel module directly. `backend_report` lives here, beside the
registrations, so that it sees every op (dispatch never imports this module).
"""

from __future__ import annotations

import torch
from torch import Tensor

from medai.kernels.dispatch import OPS, KernelUnavailableError, dispatch, register_op, select_backend

__all__ = ["selective_scan", "neighborhood_attention_2d", "gated_attention_pool", "slide_attention", "backend_report"]


register_op(
    "selective_scan",
    reference="medai.kernels.selective_scan_ref:selective_scan_chunked",
    triton="medai.kernels.selective_scan:selective_scan",
    peer="mamba_ssm.ops.selective_scan_interface:selective_scan_fn",
)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Mamba's selective scan (mamba-ssm `selective_scan_fn` signature); returns (batch, dim, L) [, state].

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or grouped (batch, G, N, L);
    D, delta_bias: (dim,). Accumulates in fp32, returns u's dtype. On CUDA with `mamba-ssm`
    installed and MEDAI_KERNELS=auto, mamba-ssm's fused kernel runs; otherwise medai's kernel or
    its chunked PyTorch reference (kernels/selective_scan_ref.py).
    """
    return dispatch("selective_scan", u.device)(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


register_op(
    "neighborhood_attention_2d",
    reference="medai.kernels.neighborhood_attention_ref:neighborhood_attention_2d",
    triton="medai.kernels.neighborhood_attention:neighborhood_attention_2d",
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


register_op(
    "gated_attention_pool",
    reference="medai.kernels.gated_attention_pool_ref:gated_attention_pool_ref",
    triton="medai.kernels.gated_attention_pool:gated_attention_pool",
)


def gated_attention_pool(
    h: Tensor, wv: Tensor, bv: Tensor, wu: Tensor, bu: Tensor, ww: Tensor, bw: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gated attention MIL pooling with K branches: (pooled (K, D), logits (K, N) unmasked).

    h: (N, D) instances; wv, wu: (L, D), bv, bu: (L,) the tanh and sigmoid branches; ww: (K, L),
    bw: (K,) the K attention heads; mask: bool (K, N) or (N,), False = excluded before softmax.
    """
    return dispatch("gated_attention_pool", h.device)(h, wv, bv, wu, bu, ww, bw, mask)


register_op(
    "slide_attention",
    reference="medai.kernels.slide_attention_ref:slide_attention_ref",
    triton="medai.kernels.slide_attention:slide_attention",
)


def slide_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coords: Tensor | None = None,
    segment_length: int | None = None,
    dilation: int = 1,
    window_radius: int | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention over slide tokens with an optional sparse pattern: (out (B, heads, N, head_dim), lse (B, heads, N)).

    q, k, v: (B, heads, N, head_dim); LongNet dilated segments (`segment_length`, `dilation`) and/or
    2D-local windows of `window_radius` grid steps over `coords` (B, N, 2) integer patch-grid
    positions; key_padding_mask (B, N) bool, True = real token. Queries with no allowed key give 0.
    """
    return dispatch("slide_attention", q.device)(
        q, k, v, coords, segment_length, dilation, window_radius, key_padding_mask, scale
    )


def backend_report(device: torch.device | str = "cpu") -> dict[str, str]:
    """Return {op: backend or the reason none runs} for every registered op on `device`."""
    report = {}
    for name in OPS:
        try:
            backend = select_backend(name, device)
            peer = OPS.get(name).peer
            report[name] = f"peer ({peer.partition(':')[0].split('.')[0]})" if backend == "peer" and peer else backend
        except KernelUnavailableError as exc:
            report[name] = f"unavailable: {exc}"
    return report
