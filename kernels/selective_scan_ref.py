"""PyTorch reference of Mamba's selective scan (mamba-ssm's `selective_scan_fn` signature).

The recurrence, per batch b, channel d and state n (A is diagonal, Δ, B, C depend on time):

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t          y_t = C_t · h_t + D u_t,   out = y ⊙ silu(z)

Two implementations:
- `selective_scan_sequential`: a plain loop over time; the ground truth in tests.
- `selective_scan_chunked`: what CPU users run. Time is cut into chunks whose state tensor
  (batch, dim, N, chunk) fits a memory budget; inside a chunk a blocked prefix scan solves the
  linear recurrence: all blocks of 16 steps are scanned at once (16 vectorized steps), then
  the block ends are scanned the same way, recursively, and carried back in. It multiplies
  only by decays <= 1 (no division, no exp of cumulative sums), so it is as stable as the loop.
  Backward recomputes each chunk (like mamba-ssm's CUDA kernel), so training memory stays
  O(batch·dim·N·chunk) instead of O(batch·dim·N·L).

All arithmetic is in float32 (float64 for float64 inputs, so tests can be exact) whatever the input dtype (mixed precision inside the scan gives
NaNs, as the Mamba U-Net authors found); outputs come back in the dtype of `u`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Block length of the blocked scan: 16 vectorized steps per level, levels = log16(L).
_LEAF = 16
# Elements of one (batch, dim, N, chunk) float32 state tensor: 4 Mi elements = 16 MiB.
_CHUNK_BUDGET = 1 << 22


def _check_and_prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Validate shapes; return fp32 (fp64 for fp64 input) tensors, B and C as (batch, G, N, L), Δ final."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta {tuple(delta.shape)} must match u {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported (Mamba uses real A)")
    n_state = A.shape[1]
    grouped = []
    for name, m in (("B", B), ("C", C)):
        if m.dim() == 3:
            m = m.unsqueeze(1)
        if m.dim() != 4 or m.shape[0] != batch or m.shape[2] != n_state or m.shape[3] != length:
            raise ValueError(
                f"selective_scan: {name} must be (batch, N, L) or (batch, G, N, L) with batch={batch}, "
                f"N={n_state}, L={length}; got {tuple(m.shape)}"
            )
        if dim % m.shape[1]:
            raise ValueError(f"selective_scan: dim={dim} is not divisible by {name}'s groups G={m.shape[1]}")
        grouped.append(m.to(compute))
    B, C = grouped
    if D is not None and D.shape != (dim,):
        raise ValueError(f"selective_scan: D must be (dim={dim},), got {tuple(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z {tuple(z.shape)} must match u {tuple(u.shape)}")
    delta = delta.to(compute)
    if delta_bias is not None:
        if delta_bias.shape != (dim,):
            raise ValueError(f"selective_scan: delta_bias must be (dim={dim},), got {tuple(delta_bias.shape)}")
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.to(compute), delta, A.to(compute), B, C


def _finish(y, u, D, z, out_dtype):
    """Add the D skip and the SiLU(z) gate (both in fp32), cast to the input dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_sequential(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Selective scan as a loop over time (ground truth); returns (batch, dim, L) [, last state]."""
    out_dtype = u.dtype
    uf, delta, A, B, C = _check_and_prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    batch, dim, length = uf.shape
    groups = B.shape[1]
    # Expand grouped B, C to one row per channel: (batch, dim, N, L).
    B = B.repeat_interleave(dim // groups, dim=1)
    C = C.repeat_interleave(dim // groups, dim=1)
    h = uf.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, :, :, t] * uf[:, :, t, None]
        ys.append((h * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(batch, dim, 0)
    out = _finish(y, uf, D, z, out_dtype)
    return (out, h) if return_last_state else out


def _block_scan(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan h_t = a_t h_{t-1} + x_t (h_{-1} = 0) along dim -3 (short); returns (h, prod a).

    A loop over the few steps of dim -3, each step vectorized over every other dim (all blocks
    of the sequence at once, and the contiguous (dim, N) tail): O(L) work in few Python steps.
    """
    # Written in place into preallocated outputs: a list + torch.stack copied every step once more.
    h, p = torch.empty_like(x), torch.empty_like(a)
    h[..., 0, :, :] = x[..., 0, :, :]
    p[..., 0, :, :] = a[..., 0, :, :]
    for t in range(1, a.shape[-3]):
        torch.addcmul(x[..., t, :, :], a[..., t, :, :], h[..., t - 1, :, :], out=h[..., t, :, :])
        torch.mul(a[..., t, :, :], p[..., t - 1, :, :], out=p[..., t, :, :])
    return h, p


def linear_scan(a: torch.Tensor, x: torch.Tensor, need_p: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Solve h_t = a_t h_{t-1} + x_t (h_{-1} = 0) for a, x of shape (..., L, dim, N).

    O(L) work in O(16 log16 L) vectorized steps. Returns (h, P) where P_t = a_0 a_1 ... a_t
    (the factor a nonzero initial state is multiplied by); P is None when `need_p` is False,
    which saves a full-size product the callers that start from zero never read.
    """
    length = a.shape[-3]
    if length <= _LEAF:
        return _block_scan(a, x)
    pad = (-length) % _LEAF
    if pad:
        # Padding steps with a = 1, x = 0 leave the state unchanged; they are cut off below.
        a = F.pad(a, (0, 0, 0, 0, 0, pad), value=1.0)
        x = F.pad(x, (0, 0, 0, 0, 0, pad), value=0.0)
    blocks = a.shape[-3] // _LEAF
    h_local, p_local = _block_scan(a.unflatten(-3, (blocks, _LEAF)), x.unflatten(-3, (blocks, _LEAF)))
    # States at the end of each block, solved by the same scan one level up.
    h_ends, p_ends = linear_scan(p_local[..., -1, :, :], h_local[..., -1, :, :], need_p=need_p)
    carry_h = F.pad(h_ends[..., :-1, :, :], (0, 0, 0, 0, 1, 0), value=0.0)
    h = torch.addcmul(h_local, p_local, carry_h[..., None, :, :]).flatten(-4, -3)[..., :length, :, :]
    if not need_p:
        return h, None
    carry_p = F.pad(p_ends[..., :-1, :, :], (0, 0, 0, 0, 1, 0), value=1.0)
    p = (p_local * carry_p[..., None, :, :]).flatten(-4, -3)
    return h, p[..., :length, :, :]


class _LinearRecurrence(torch.autograd.Function):
    """h_t = a_t h_{t-1} + x_t from h0, along dim -3, with the adjoint recurrence as backward.

    Autograd through the blocked scan would allocate a full-size zero gradient for every step
    it slices; the adjoint is itself a linear recurrence run backwards in time:
    λ_t = g_t + a_{t+1} λ_{t+1},  dx_t = λ_t,  da_t = λ_t h_{t-1},  dh0 = a_0 λ_0.
    """

    @staticmethod
    def forward(ctx, a, x, h0):
        # Fold the initial state into the first input: h_0 = a_0 h0 + x_0.
        first = torch.addcmul(x[..., :1, :, :], a[..., :1, :, :], h0[..., None, :, :])
        h, _ = linear_scan(a, torch.cat([first, x[..., 1:, :, :]], -3), need_p=False)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        next_a = torch.cat([a[..., 1:, :, :], torch.zeros_like(a[..., :1, :, :])], -3)
        lam, _ = linear_scan(next_a.flip(-3), grad_h.flip(-3), need_p=False)
        lam = lam.flip(-3)
        h_prev = torch.cat([h0[..., None, :, :], h[..., :-1, :, :]], -3)
        return lam * h_prev, lam, a[..., 0, :, :] * lam[..., 0, :, :]


def _scan_chunk(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: u, Δ (batch, G, T, Dg); A (G, Dg, N); B, C (batch, G, T, N); h0 (batch, G, Dg, N).

    Time sits before (Dg, N) so each scan step reads contiguous memory. Returns y
    (batch, G, T, Dg) without D/z, and the state after the chunk (batch, G, Dg, N).
    """
    decay = torch.exp(delta[..., None] * A[None, :, None])  # (batch, G, T, Dg, N)
    drive = (delta * u)[..., None] * B[:, :, :, None, :]  # (batch, G, T, Dg, N)
    h = _LinearRecurrence.apply(decay, drive, h0)
    y = (h * C[:, :, :, None, :]).sum(-1)
    return y, h[:, :, -1]


def _chunk_length(batch: int, dim: int, n_state: int, length: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(chunk_size, length))
    per_step = max(1, batch * dim * n_state)
    steps = max(_LEAF, _CHUNK_BUDGET // per_step)
    steps = 1 << int(math.log2(steps))  # whole blocks of _LEAF steps
    return max(1, min(steps, length))


class _ChunkedScan(torch.autograd.Function):
    """Chunked scan with a recomputing backward: saves only the states at chunk boundaries."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):  # fp32, time-major grouped layout (see _scan_chunk)
        length = u.shape[2]
        h = u.new_zeros(u.shape[0], u.shape[1], u.shape[3], A.shape[-1])
        boundaries, ys = [], []
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            boundaries.append(h)
            y, h = _scan_chunk(*(t[:, :, start:stop] for t in (u, delta)), A, *(t[:, :, start:stop] for t in (B, C)), h)
            ys.append(y)
        ctx.chunk = chunk
        ctx.save_for_backward(u, delta, A, B, C, *boundaries)
        return torch.cat(ys, 2), h

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, *boundaries = ctx.saved_tensors
        chunk, length = ctx.chunk, u.shape[2]
        grads = [torch.zeros_like(t) for t in (u, delta, B, C)]
        grad_A = torch.zeros_like(A)
        if grad_y is None:
            grad_y = torch.zeros(*u.shape, dtype=u.dtype, device=u.device)
        grad_h = grad_last if grad_last is not None else torch.zeros_like(boundaries[0])
        starts = list(range(0, length, chunk))
        for index in reversed(range(len(starts))):
            start, stop = starts[index], min(starts[index] + chunk, length)
            with torch.enable_grad():
                inputs = [t[:, :, start:stop].detach().requires_grad_() for t in (u, delta, B, C)]
                a_leaf = A.detach().requires_grad_()
                h0 = boundaries[index].detach().requires_grad_()
                y, h_end = _scan_chunk(inputs[0], inputs[1], a_leaf, inputs[2], inputs[3], h0)
                chunk_grads = torch.autograd.grad(
                    (y, h_end), (*inputs, a_leaf, h0), (grad_y[:, :, start:stop], grad_h)
                )
            for full, part in zip(grads, chunk_grads[:4]):
                full[:, :, start:stop] = part
            grad_A += chunk_grads[4]
            grad_h = chunk_grads[5]
        return grads[0], grads[1], grad_A, grads[2], grads[3], None


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int | None = None,
):
    """Selective scan by chunked parallel prefix scans; returns (batch, dim, L) [, (batch, dim, N) state]."""
    out_dtype = u.dtype
    # Autocast must not lower the scan's precision (fp16 decays underflow and the state blows up).
    with torch.autocast(device_type=u.device.type, enabled=False):
        uf, delta, A, B, C = _check_and_prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        batch, dim, length = uf.shape
        groups, n_state = B.shape[1], A.shape[1]
        if length == 0:
            out = _finish(uf.new_zeros(batch, dim, 0), uf, D, z, out_dtype)
            return (out, uf.new_zeros(batch, dim, n_state)) if return_last_state else out
        per_group = dim // groups
        chunk = _chunk_length(batch, dim, n_state, length, chunk_size)
        # Time-major layout (see _scan_chunk): (batch, G, L, Dg) and (batch, G, L, N).
        y, last = _ChunkedScan.apply(
            uf.view(batch, groups, per_group, length).transpose(2, 3).contiguous(),
            delta.view(batch, groups, per_group, length).transpose(2, 3).contiguous(),
            A.view(groups, per_group, n_state),
            B.transpose(2, 3).contiguous(),
            C.transpose(2, 3).contiguous(),
            chunk,
        )
        out = _finish(y.transpose(2, 3).reshape(batch, dim, length), uf, D, z, out_dtype)
    if return_last_state:
        return out, last.reshape(batch, dim, n_state)
    return out
