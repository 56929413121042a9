"""PyTorch reference for 2D (dilated) neighborhood attention, with NATTEN's semantics.

Each query pixel attends to a `kernel_size` x `kernel_size` window of keys spaced `dilation`
pixels apart. Windows are shifted inward at the borders (they never shrink), so every query
sees exactly kernel_size**2 keys, all with the same residue modulo `dilation` as the query
(NATTEN's `na2d`, Hassani et al. 2023). The relative position bias `rpb` has NATTEN's layout
(heads, 2k-1, 2k-1), indexed by the key's offset from the query in dilated steps, plus k-1.

The computation mirrors NATTEN's split into `qk` (logits over the window) and `av` (weighted
sum of values), each an autograd Function with an explicit backward so memory stays at
O(B*heads*H*W*k^2) for the attention weights instead of k^2 copies of the keys. Work is
chunked over the kernel's row offsets: each step gathers one row of the window for every
query at once (vectorised), so CPU cost is k gathers and k small batched matmuls per call.
"""

from __future__ import annotations

import torch
from torch import Tensor


def window_start(index: Tensor, length: int, kernel_size: int, dilation: int) -> Tensor:
    """Return the first key position of each query's window along one axis (NATTEN's rule).

    Positions are split into `dilation` interleaved groups (same residue mod dilation); within a
    group the window is centred on the query and shifted inward where it would cross an edge.
    """
    group = index % dilation
    pos = index // dilation  # position of the query inside its group
    group_len = (length - group + dilation - 1) // dilation
    start_in_group = (pos - kernel_size // 2).clamp(min=0)
    start_in_group = torch.minimum(start_in_group, group_len - kernel_size)
    return start_in_group * dilation + group


def neighbor_table(length: int, kernel_size: int, dilation: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Return (keys, bias_index), both (length, kernel_size) long tensors for one axis.

    keys[i, j] is the position of the j-th key of query i; bias_index[i, j] indexes the
    relative-position-bias axis: (key - query) / dilation + kernel_size - 1.
    """
    index = torch.arange(length, device=device)
    keys = window_start(index, length, kernel_size, dilation)[:, None] + dilation * torch.arange(
        kernel_size, device=device
    )
    bias_index = (keys - index[:, None]) // dilation + kernel_size - 1
    return keys, bias_index


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, kernel_size: int, dilation: int, rpb: Tensor | None) -> None:
    if q.dim() != 5 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            "neighborhood_attention_2d expects q, k of shape (B, heads, H, W, head_dim) and v of "
            f"shape (B, heads, H, W, value_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    height, width = q.shape[2], q.shape[3]
    if min(height, width) < kernel_size * dilation:
        raise ValueError(
            f"feature map {height}x{width} is smaller than kernel_size*dilation = {kernel_size * dilation}; "
            "pad it first (NATTEN's NeighborhoodAttention2D pads with zeros to the window size)"
        )
    if rpb is not None and rpb.shape != (q.shape[1], 2 * kernel_size - 1, 2 * kernel_size - 1):
        raise ValueError(
            f"rpb must have shape (heads, 2k-1, 2k-1) = ({q.shape[1]}, {2 * kernel_size - 1}, "
            f"{2 * kernel_size - 1}), got {tuple(rpb.shape)}"
        )


def _row_index(rows: Tensor, cols: Tensor, kh: int, width: int) -> Tensor:
    """Flat (H*W*k) index of the keys in kernel row `kh` of every query's window."""
    # (H, 1, 1) * W + (1, W, k) -> (H, W, k): key pixel (rows[h, kh], cols[w, kw]) for query (h, w)
    return (rows[:, kh, None, None] * width + cols[None, :, :]).reshape(-1)


class _NeighborhoodQK(torch.autograd.Function):
    """logits[b, n, h, w, kh*k + kw] = <q[b, n, h, w], k[b, n, rows[h, kh], cols[w, kw]]>."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        batch, heads, height, width, dim = q.shape
        kernel = rows.shape[1]
        k_flat = k.reshape(batch, heads, height * width, dim)
        logits = q.new_empty(batch, heads, height, width, kernel, kernel)
        for kh in range(kernel):
            keys = k_flat[:, :, _row_index(rows, cols, kh, width)].view(batch, heads, height, width, kernel, dim)
            logits[..., kh, :] = (keys @ q.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(q, k, rows, cols)
        return logits.view(batch, heads, height, width, kernel * kernel)

    @staticmethod
    def backward(ctx, grad_logits: Tensor):
        q, k, rows, cols = ctx.saved_tensors
        batch, heads, height, width, dim = q.shape
        kernel = rows.shape[1]
        grad_logits = grad_logits.reshape(batch, heads, height, width, kernel, kernel)
        k_flat = k.reshape(batch, heads, height * width, dim)
        grad_q = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        grad_k = torch.zeros_like(k_flat) if ctx.needs_input_grad[1] else None
        for kh in range(kernel):
            index = _row_index(rows, cols, kh, width)
            g = grad_logits[..., kh, :].unsqueeze(-1)  # (B, n, H, W, k, 1)
            if grad_q is not None:
                keys = k_flat[:, :, index].view(batch, heads, height, width, kernel, dim)
                grad_q += (g * keys).sum(-2)
            if grad_k is not None:
                contrib = g * q.unsqueeze(-2)  # (B, n, H, W, k, D)
                grad_k.index_add_(2, index, contrib.reshape(batch, heads, -1, dim))
        if grad_k is not None:
            grad_k = grad_k.view_as(k)
        return grad_q, grad_k, None, None


class _NeighborhoodAV(torch.autograd.Function):
    """out[b, n, h, w] = sum over the window of attn[b, n, h, w, kh*k + kw] * v[key pixel]."""

    @staticmethod
    def forward(ctx, attn: Tensor, v: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        batch, heads, height, width, dim = v.shape
        kernel = rows.shape[1]
        v_flat = v.reshape(batch, heads, height * width, dim)
        attn6 = attn.view(batch, heads, height, width, kernel, kernel)
        out = v.new_zeros(batch, heads, height, width, dim)
        for kh in range(kernel):
            values = v_flat[:, :, _row_index(rows, cols, kh, width)].view(batch, heads, height, width, kernel, dim)
            out += (attn6[..., kh, :].unsqueeze(-2) @ values).squeeze(-2)
        ctx.save_for_backward(attn, v, rows, cols)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        attn, v, rows, cols = ctx.saved_tensors
        batch, heads, height, width, dim = v.shape
        kernel = rows.shape[1]
        attn6 = attn.view(batch, heads, height, width, kernel, kernel)
        v_flat = v.reshape(batch, heads, height * width, dim)
        grad_attn = attn.new_empty(batch, heads, height, width, kernel, kernel) if ctx.needs_input_grad[0] else None
        grad_v = torch.zeros_like(v_flat) if ctx.needs_input_grad[1] else None
        for kh in range(kernel):
            index = _row_index(rows, cols, kh, width)
            if grad_attn is not None:
                values = v_flat[:, :, index].view(batch, heads, height, width, kernel, dim)
                grad_attn[..., kh, :] = (values @ grad_out.unsqueeze(-1)).squeeze(-1)
            if grad_v is not None:
                contrib = attn6[..., kh, :].unsqueeze(-1) * grad_out.unsqueeze(-2)  # (B, n, H, W, k, D)
                grad_v.index_add_(2, index, contrib.reshape(batch, heads, -1, dim))
        if grad_attn is not None:
            grad_attn = grad_attn.view_as(attn)
        if grad_v is not None:
            grad_v = grad_v.view_as(v)
        return grad_attn, grad_v, None, None


def _whole_map_attention(
    q: Tensor, k: Tensor, v: Tensor, row_bias: Tensor, col_bias: Tensor, rpb: Tensor | None, scale: float
) -> Tensor:
    """The window is the whole map (H = W = kernel_size): plain attention with a dense bias.

    Common in small-input models (NATTEN pads small maps up to the window), and one fused
    scaled_dot_product_attention call is much faster on CPU than gathering windows.
    """
    batch, heads, height, width, dim = q.shape
    n = height * width
    # every query's window starts at 0, so window slot (kh, kw) is key pixel (kh, kw)
    bias = None
    if rpb is not None:
        bias = rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]].reshape(heads, n, n)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(batch, heads, n, dim), k.reshape(batch, heads, n, dim), v.reshape(batch, heads, n, v.shape[-1]),
        attn_mask=bias.to(q.dtype) if bias is not None else None, scale=scale,
    )
    return out.reshape(batch, heads, height, width, v.shape[-1])


def neighborhood_attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Return 2D (dilated) neighborhood attention of shape (B, heads, H, W, value_dim).

    q, k: (B, heads, H, W, head_dim); v: (B, heads, H, W, value_dim); rpb: (heads, 2k-1, 2k-1)
    or None; scale defaults to head_dim ** -0.5. Requires H, W >= kernel_size * dilation.
    """
    _check_inputs(q, k, v, kernel_size, dilation, rpb)
    height, width = q.shape[2], q.shape[3]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows, row_bias = neighbor_table(height, kernel_size, dilation, q.device)
    cols, col_bias = neighbor_table(width, kernel_size, dilation, q.device)
    if height == kernel_size and width == kernel_size:
        return _whole_map_attention(q, k, v, row_bias, col_bias, rpb, scale)
    logits = _NeighborhoodQK.apply(q * scale, k, rows, cols)
    if rpb is not None:
        # bias[n, h, w, kh, kw] = rpb[n, row_bias[h, kh], col_bias[w, kw]]; autograd scatters its grad
        bias = rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]]
        logits = logits + bias.reshape(1, rpb.shape[0], height, width, kernel_size * kernel_size)
    attn = logits.softmax(dim=-1)
    return _NeighborhoodAV.apply(attn, v, rows, cols)
