"""Triton kernel for Mamba's selective scan (op `selective_scan`), forward and backward.

Same signature and contract as kernels/selective_scan_ref.py (mamba-ssm's `selective_scan_fn`).
The Triton part is the recurrence core y = scan(u, Δ, A, B, C); Δ's bias and softplus, the D
skip and the SiLU(z) gate are elementwise and stay in PyTorch (autograd), around the kernel.

Algorithm:
- forward: a program owns one batch element and BLOCK_DIM channels, with the (BLOCK_DIM, N)
  state in registers, and walks time: h = exp(Δ_t A) h + Δ_t u_t B_t, y_t = C_t . h. Every
  CHUNK steps it writes the state at the chunk start (B, L/CHUNK, D, N): that and the output are
  all it stores; B·L·D·N is never materialised.
- backward: chunks in reverse. For each, the states of the chunk are recomputed from its saved
  start state into a per-program scratch of CHUNK x BLOCK_DIM x N (reused across chunks), then
  the adjoint g_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1} runs backward through the chunk giving
  du, dΔ (per channel, in registers), dA (accumulated over time in registers) and dB, dC
  (summed over the channels of a group with atomic adds).
All arithmetic in fp32 (fp64 inputs are scanned in fp32 here; the reference keeps fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medai.kernels.selective_scan_ref import _check_and_prepare, _finish

CHUNK = 64  # steps between saved states: memory B·D·N·L/CHUNK, recompute cost one extra forward
BLOCK_DIM = 16


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, y_ptr, states_ptr, last_ptr,
                     DIM, L, NS, G, per_group, num_chunks,
                     CHUNK: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    batch = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    c_in = offs_c < DIM
    cn_in = c_in[:, None] & (offs_n[None, :] < NS)
    group = offs_c // per_group
    a = tl.load(a_ptr + offs_c[:, None] * NS + offs_n[None, :], mask=cn_in, other=0.0)
    row = (batch * DIM + offs_c).to(tl.int64) * L  # u, Δ, y: (B, D, L)
    bc_row = ((batch * G + group).to(tl.int64) * NS)[:, None] * L + offs_n[None, :] * L  # B, C: (B, G, N, L)
    h = tl.zeros((BLOCK_DIM, BLOCK_N), tl.float32)
    for chunk in range(0, num_chunks):
        state_at = ((batch * num_chunks + chunk).to(tl.int64) * DIM + offs_c)[:, None] * NS + offs_n[None, :]
        tl.store(states_ptr + state_at, h, mask=cn_in)
        for t in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, L)):
            u = tl.load(u_ptr + row + t, mask=c_in, other=0.0)
            dt = tl.load(delta_ptr + row + t, mask=c_in, other=0.0)
            b = tl.load(b_ptr + bc_row + t, mask=cn_in, other=0.0)
            c = tl.load(c_ptr + bc_row + t, mask=cn_in, other=0.0)
            h = tl.exp(dt[:, None] * a) * h + (dt * u)[:, None] * b
            tl.store(y_ptr + row + t, tl.sum(h * c, axis=1), mask=c_in)
    tl.store(last_ptr + (batch * DIM + offs_c)[:, None] * NS + offs_n[None, :], h, mask=cn_in)


@triton.jit
def _scan_bwd_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, states_ptr, dy_ptr, dlast_ptr, scratch_ptr,
                     du_ptr, ddelta_ptr, da_ptr, db_ptr, dc_ptr,
                     DIM, L, NS, G, per_group, num_chunks, dim_blocks,
                     HAS_DLAST: tl.constexpr, CHUNK: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    batch = tl.program_id(0)
    dim_block = tl.program_id(1)
    offs_c = dim_block * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    c_in = offs_c < DIM
    cn_in = c_in[:, None] & (offs_n[None, :] < NS)
    group = offs_c // per_group
    a = tl.load(a_ptr + offs_c[:, None] * NS + offs_n[None, :], mask=cn_in, other=0.0)
    row = (batch * DIM + offs_c).to(tl.int64) * L
    bc_row = ((batch * G + group).to(tl.int64) * NS)[:, None] * L + offs_n[None, :] * L
    tile = tl.arange(0, BLOCK_DIM)[:, None] * BLOCK_N + offs_n[None, :]
    scratch = scratch_ptr + (batch * dim_blocks + dim_block).to(tl.int64) * CHUNK * BLOCK_DIM * BLOCK_N
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + (batch * DIM + offs_c)[:, None] * NS + offs_n[None, :], mask=cn_in, other=0.0)
    else:
        carry = tl.zeros((BLOCK_DIM, BLOCK_N), tl.float32)  # exp(Δ_{t+1} A) g_{t+1}, beyond the end: dlast
    da = tl.zeros((BLOCK_DIM, BLOCK_N), tl.float32)
    for back in range(0, num_chunks):
        chunk = num_chunks - 1 - back
        start = chunk * CHUNK
        stop = tl.minimum(start + CHUNK, L)
        state_at = ((batch * num_chunks + chunk).to(tl.int64) * DIM + offs_c)[:, None] * NS + offs_n[None, :]
        h0 = tl.load(states_ptr + state_at, mask=cn_in, other=0.0)
        h = h0
        for t in range(start, stop):  # recompute this chunk's states into the scratch
            u = tl.load(u_ptr + row + t, mask=c_in, other=0.0)
            dt = tl.load(delta_ptr + row + t, mask=c_in, other=0.0)
            b = tl.load(b_ptr + bc_row + t, mask=cn_in, other=0.0)
            h = tl.exp(dt[:, None] * a) * h + (dt * u)[:, None] * b
            tl.store(scratch + (t - start) * BLOCK_DIM * BLOCK_N + tile, h)
        tl.debug_barrier()  # the scratch written by some threads is read by others below
        for i in range(0, stop - start):
            t = stop - 1 - i
            u = tl.load(u_ptr + row + t, mask=c_in, other=0.0)
            dt = tl.load(delta_ptr + row + t, mask=c_in, other=0.0)
            b = tl.load(b_ptr + bc_row + t, mask=cn_in, other=0.0)
            c = tl.load(c_ptr + bc_row + t, mask=cn_in, other=0.0)
            dy = tl.load(dy_ptr + row + t, mask=c_in, other=0.0)
            h_t = tl.load(scratch + (t - start) * BLOCK_DIM * BLOCK_N + tile)
            if t > start:
                h_prev = tl.load(scratch + (t - start - 1) * BLOCK_DIM * BLOCK_N + tile)
            else:
                h_prev = h0
            g = c * dy[:, None] + carry  # adjoint of h_t
            decay = tl.exp(dt[:, None] * a)
            g = tl.where(cn_in, g, 0.0)
            # h_t = decay * h_prev + dt * u * b
            d_decay = g * h_prev * decay  # d/d(dt*a) of the decay term
            da += d_decay * dt[:, None]
            ddt = tl.sum(d_decay * a + g * u[:, None] * b, axis=1)
            du = tl.sum(g * dt[:, None] * b, axis=1)
            tl.store(du_ptr + row + t, du, mask=c_in)
            tl.store(ddelta_ptr + row + t, ddt, mask=c_in)
            tl.atomic_add(db_ptr + bc_row + t, g * (dt * u)[:, None], mask=cn_in)
            tl.atomic_add(dc_ptr + bc_row + t, h_t * dy[:, None], mask=cn_in)
            carry = decay * g
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(da_ptr + (batch * DIM + offs_c)[:, None] * NS + offs_n[None, :], da, mask=cn_in)


class _SelectiveScanCore(torch.autograd.Function):
    """y (B, D, L) and last state (B, D, N) of h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t, y_t = C_t . h_t (fp32)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], A.shape[1]
        num_chunks = triton.cdiv(length, CHUNK)
        block_n = triton.next_power_of_2(n_state)
        f32 = dict(device=u.device, dtype=torch.float32)
        y = torch.empty((batch, dim, length), **f32)
        states = torch.empty((batch, num_chunks, dim, n_state), **f32)
        last = torch.empty((batch, dim, n_state), **f32)
        grid = (batch, triton.cdiv(dim, BLOCK_DIM))
        _scan_fwd_kernel[grid](u, delta, A, B, C, y, states, last, dim, length, n_state, groups, dim // groups,
                               num_chunks, CHUNK=CHUNK, BLOCK_DIM=BLOCK_DIM, BLOCK_N=block_n)
        ctx.save_for_backward(u, delta, A, B, C, states)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, states = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], A.shape[1]
        num_chunks = states.shape[1]
        block_n = triton.next_power_of_2(n_state)
        dim_blocks = triton.cdiv(dim, BLOCK_DIM)
        f32 = dict(device=u.device, dtype=torch.float32)
        grad_y = torch.zeros((batch, dim, length), **f32) if grad_y is None else grad_y.float().contiguous()
        scratch = torch.empty((batch * dim_blocks, CHUNK, BLOCK_DIM, block_n), **f32)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        da = torch.empty((batch, dim, n_state), **f32)
        db, dc = torch.zeros_like(B), torch.zeros_like(C)
        dlast = grad_last.float().contiguous() if grad_last is not None else u
        _scan_bwd_kernel[(batch, dim_blocks)](
            u, delta, A, B, C, states, grad_y, dlast, scratch, du, ddelta, da, db, dc,
            dim, length, n_state, groups, dim // groups, num_chunks, dim_blocks,
            HAS_DLAST=grad_last is not None, CHUNK=CHUNK, BLOCK_DIM=BLOCK_DIM, BLOCK_N=block_n,
        )
        return du, ddelta, da.sum(0), db, dc


def selective_scan(
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
    """Selective scan with the Triton core; returns (batch, dim, L) in u's dtype [, (batch, dim, N) fp32 state]."""
    out_dtype = u.dtype
    with torch.autocast(device_type=u.device.type, enabled=False):
        uf, delta, A, B, C = _check_and_prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        batch, dim, length = uf.shape
        if length == 0:
            out = _finish(uf.new_zeros(batch, dim, 0), uf, D, z, out_dtype)
            return (out, uf.new_zeros(batch, dim, A.shape[1])) if return_last_state else out
        y, last = _SelectiveScanCore.apply(*(t.float().contiguous() for t in (uf, delta, A, B, C)))
        out = _finish(y.to(uf.dtype), uf, D, z, out_dtype)
    return (out, last.to(uf.dtype)) if return_last_state else out
