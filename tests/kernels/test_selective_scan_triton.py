"""selective_scan Triton kernel vs the chunked reference: forward, last state and gradients of every input.

Tolerances per dtype: fp32 inputs 2e-4 (the kernel and the reference both scan in fp32, in a
different order); fp16 2e-2 and bf16 5e-2 on outputs against the fp32 reference of the same rounded inputs.
"""

from __future__ import annotations

import pytest
import torch

import medai.kernels.selective_scan as kernel_module
from medai.kernels.ops import selective_scan as selective_scan_op
from medai.kernels.selective_scan import selective_scan
from medai.kernels.selective_scan_ref import selective_scan_chunked
from tests.kernels.test_selective_scan import make_inputs

TOL = {
    torch.float32: dict(rtol=2e-4, atol=2e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def _run(fn, inputs, **options):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out, last = fn(**leaves, return_last_state=True, **options)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(out.shape, generator=g).to(out)
    weight_last = torch.randn(last.shape, generator=g).to(last)
    ((out * weight).sum() + (last * weight_last).sum()).backward()
    return out, last, {k: v.grad for k, v in leaves.items()}


# dim 19 (> BLOCK_DIM, not a multiple), N = 5 (padded to 8), L = 70 (> CHUNK = 16 here, ragged last chunk),
# grouped B/C (G = 2 with 10 channels each, so a block spans two groups), L = 1.
@pytest.mark.parametrize("batch,dim,n_state,length,groups", [(2, 19, 5, 70, 0), (1, 20, 4, 37, 2), (1, 3, 1, 1, 0)])
@pytest.mark.parametrize("softplus", [False, True])
def test_forward_and_gradients_match_reference(kernel_device, monkeypatch, batch, dim, n_state, length, groups,
                                               softplus):
    monkeypatch.setattr(kernel_module, "CHUNK", 16)  # several chunks on small L: the backward's chunk walk
    inputs = {k: v.to(kernel_device) for k, v in make_inputs(batch, dim, n_state, length, groups,
                                                            dtype=torch.float32).items()}
    if not softplus:  # Δ is a positive step size; raw randn would make the scan grow without bound
        inputs["delta"] = inputs["delta"].abs() * 0.5
        inputs["delta_bias"] = inputs["delta_bias"].abs() * 0.1
    out, last, grads = _run(selective_scan, inputs, delta_softplus=softplus)
    out_ref, last_ref, grads_ref = _run(selective_scan_chunked, inputs, delta_softplus=softplus)
    torch.testing.assert_close(out, out_ref, **TOL[torch.float32])
    torch.testing.assert_close(last, last_ref, **TOL[torch.float32])
    for name in inputs:
        torch.testing.assert_close(grads[name], grads_ref[name], **TOL[torch.float32],
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(kernel_device, dtype):
    inputs = {k: v.to(kernel_device, dtype) for k, v in make_inputs(1, 8, 4, 20, dtype=torch.float32, seed=2).items()}
    out = selective_scan(**inputs, delta_softplus=True)
    out_ref = selective_scan_chunked(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), out_ref, **TOL[dtype])


def test_dispatch_selects_the_kernel(kernel_device, monkeypatch):
    monkeypatch.setenv("MEDAI_KERNELS", "triton")
    inputs = {k: v.to(kernel_device) for k, v in make_inputs(1, 4, 2, 9, dtype=torch.float32).items()}
    torch.testing.assert_close(selective_scan_op(**inputs), selective_scan_chunked(**inputs), **TOL[torch.float32])
    with pytest.raises(ValueError, match="u must be"):
        selective_scan(**{**inputs, "u": inputs["u"][0]})
