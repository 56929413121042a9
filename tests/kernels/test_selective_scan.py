"""The chunked selective scan equals the sequential loop, forward and backward, on awkward shapes."""

from __future__ import annotations

import pytest
import torch

from medai.kernels.dispatch import KernelUnavailableError
from medai.kernels.ops import selective_scan
from medai.kernels.selective_scan_ref import linear_scan, selective_scan_chunked, selective_scan_sequential


def make_inputs(batch, dim, n_state, length, groups=0, dtype=torch.float64, seed=0, a_scale=4.0):
    """Random scan inputs in mamba-ssm's layout; groups=0 gives the ungrouped (batch, N, L) B and C."""
    g = torch.Generator().manual_seed(seed)
    bc_shape = (batch, n_state, length) if groups == 0 else (batch, groups, n_state, length)
    return dict(
        u=torch.randn(batch, dim, length, generator=g, dtype=dtype),
        delta=torch.randn(batch, dim, length, generator=g, dtype=dtype),
        A=-torch.rand(dim, n_state, generator=g, dtype=dtype) * a_scale - 0.1,
        B=torch.randn(*bc_shape, generator=g, dtype=dtype),
        C=torch.randn(*bc_shape, generator=g, dtype=dtype),
        D=torch.randn(dim, generator=g, dtype=dtype),
        z=torch.randn(batch, dim, length, generator=g, dtype=dtype),
        delta_bias=torch.randn(dim, generator=g, dtype=dtype),
    )


def run_both(inputs, chunk_size=None, **options):
    """Outputs and gradients of the sequential and chunked scans for the same leaves."""
    results = []
    for fn, extra in ((selective_scan_sequential, {}), (selective_scan_chunked, {"chunk_size": chunk_size})):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out, last = fn(**leaves, return_last_state=True, **options, **extra)
        g = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + last.sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        results.append((out, last, dict(zip(leaves, grads))))
    return results


@pytest.mark.parametrize(
    "batch,dim,n_state,length,groups,chunk_size",
    [
        (1, 1, 1, 1, 0, None),  # a single step
        (2, 5, 3, 17, 0, None),  # one step past a 16-block
        (2, 6, 4, 257, 0, 64),  # several chunks, the last one short
        (1, 8, 16, 300, 2, 37),  # grouped B/C, chunk not a multiple of the block
        (3, 4, 2, 1000, 4, None),  # one group per channel
    ],
)
def test_chunked_equals_sequential_forward_and_gradients(batch, dim, n_state, length, groups, chunk_size):
    inputs = make_inputs(batch, dim, n_state, length, groups)
    (ref_out, ref_last, ref_grads), (out, last, grads) = run_both(inputs, chunk_size, delta_softplus=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)
    for name in inputs:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_long_sequence_forward_and_gradients_match():
    inputs = make_inputs(1, 2, 4, 2500)
    (ref_out, ref_last, ref_grads), (out, last, grads) = run_both(inputs, chunk_size=512, delta_softplus=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(last, ref_last, rtol=1e-9, atol=1e-9)
    for name in inputs:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-8, atol=1e-8, msg=f"grad of {name}")


def test_very_long_sequence_forward_matches_in_float32():
    inputs = make_inputs(1, 4, 4, 40000, dtype=torch.float32)
    ref = selective_scan_sequential(**inputs, delta_softplus=True)
    out = selective_scan_chunked(**inputs, delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_without_optional_terms_and_without_softplus():
    inputs = make_inputs(2, 3, 5, 50)
    inputs["delta"] = inputs["delta"].abs()
    kept = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    ref = selective_scan_sequential(**kept)
    out = selective_scan_chunked(**kept)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # D and z really change the result (so the comparison above is not vacuous for them).
    assert not torch.allclose(out, selective_scan_chunked(**kept, D=inputs["D"], z=inputs["z"]))


def test_gradcheck_small():
    inputs = make_inputs(1, 2, 2, 21)
    leaves = tuple(v.requires_grad_() for v in inputs.values())

    def fn(*args):
        return selective_scan_chunked(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True,
                                      chunk_size=8)

    assert torch.autograd.gradcheck(fn, leaves)


def test_strong_decay_stays_finite_and_exact():
    # Δ·A down to about -500 per step: any exp(-cumsum) formulation would overflow.
    inputs = make_inputs(1, 3, 4, 300, dtype=torch.float32, a_scale=50.0)
    inputs["delta"] = inputs["delta"].abs() * 5
    ref = selective_scan_sequential(**inputs)
    out = selective_scan_chunked(**inputs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_inputs_accumulate_in_float32_and_return_input_dtype(dtype, tol):
    inputs = make_inputs(2, 4, 4, 200, dtype=torch.float32)
    inputs["delta"] = inputs["delta"] * 0.1
    ref = selective_scan_sequential(**inputs, delta_softplus=True)
    out = selective_scan_chunked(**{k: v.to(dtype) for k, v in inputs.items()}, delta_softplus=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_autocast_does_not_lower_scan_precision():
    inputs = make_inputs(1, 4, 4, 100, dtype=torch.float32)
    ref = selective_scan_chunked(**inputs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan_chunked(**inputs, delta_softplus=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_linear_scan_matches_a_loop_with_padding_levels():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 16 * 16 + 5, 3, 2, generator=g, dtype=torch.float64)
    x = torch.randn(2, 16 * 16 + 5, 3, 2, generator=g, dtype=torch.float64)
    h, p = linear_scan(a, x)
    state, prod = torch.zeros_like(x[:, 0]), torch.ones_like(a[:, 0])
    for t in range(a.shape[1]):
        state = a[:, t] * state + x[:, t]
        prod = prod * a[:, t]
        torch.testing.assert_close(h[:, t], state)
        torch.testing.assert_close(p[:, t], prod)
    h_only, no_p = linear_scan(a, x, need_p=False)  # what the recurrence's forward and adjoint use
    assert no_p is None
    torch.testing.assert_close(h_only, h, rtol=0, atol=0)


def test_public_op_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("MEDAI_KERNELS", "auto")
    inputs = make_inputs(1, 3, 2, 40)
    out = selective_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(out, selective_scan_sequential(**inputs, delta_softplus=True))
    monkeypatch.setenv("MEDAI_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # forced Triton on CPU without the interpreter: says what to set
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        selective_scan(**inputs)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"u": torch.zeros(1, 3, 4, 5)}, "u must be"),
        ({"delta": torch.zeros(1, 3, 39)}, "delta"),
        ({"A": torch.zeros(4, 2)}, "A must be"),
        ({"B": torch.zeros(1, 2, 39)}, "B must be"),
        ({"C": torch.zeros(1, 2, 2, 40)}, "not divisible"),
        ({"D": torch.zeros(2)}, "D must be"),
    ],
)
def test_bad_shapes_are_named(change, message):
    inputs = {**make_inputs(1, 3, 2, 40), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan_chunked(**inputs)


@pytest.mark.gpu
def test_mamba_ssm_kernel_matches_the_reference_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("mamba_ssm")
    inputs = {k: v.float().cuda() for k, v in make_inputs(2, 8, 16, 1000, dtype=torch.float32).items()}
    out = selective_scan(**inputs, delta_softplus=True)  # auto mode: mamba-ssm's kernel on CUDA
    ref = selective_scan_chunked(**{k: v.cpu() for k, v in inputs.items()}, delta_softplus=True)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)
