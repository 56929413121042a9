"""neighborhood_attention_2d Triton kernel vs the NATTEN-semantics reference: forward and gradients (q, k, v, rpb).

Tolerances per dtype: fp32 1e-4; fp16 2e-2 and bf16 5e-2 against the fp32 reference on the same rounded inputs.
"""

from __future__ import annotations

import pytest
import torch

from medai.kernels.neighborhood_attention import neighborhood_attention_2d
from medai.kernels.neighborhood_attention_ref import neighborhood_attention_2d as neighborhood_attention_ref
from medai.kernels.ops import neighborhood_attention_2d as neighborhood_attention_op

TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def _inputs(batch, heads, height, width, dim, kernel_size, with_rpb, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, height, width, dim, generator=g).to(device, dtype) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=g).to(device, dtype) if with_rpb else None
    return q, k, v, rpb


def _forward_backward(fn, q, k, v, rpb, kernel_size, dilation, weight):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, rpb)]
    out = fn(leaves[0], leaves[1], leaves[2], kernel_size, dilation, leaves[3])
    (out.float() * weight).sum().backward()
    return out, [t.grad for t in leaves if t is not None]


# (B, heads, H, W, head_dim, kernel, dilation, rpb, value_dim): W > BLOCK_W and not a multiple of it; dilation 3
# does not divide 11 or 10 (uneven dilation groups); a 5x5 kernel on a 5x6 map (the whole map); value_dim 5 != head_dim 8.
CASES = [(1, 2, 5, 17, 5, 3, 1, True, 5), (1, 1, 11, 10, 8, 3, 3, True, 5), (1, 1, 5, 6, 16, 5, 1, False, 16)]


@pytest.mark.parametrize("batch,heads,height,width,dim,kernel_size,dilation,with_rpb,value_dim", CASES)
def test_forward_and_gradients_match_reference(kernel_device, batch, heads, height, width, dim, kernel_size,
                                               dilation, with_rpb, value_dim):
    q, k, v, rpb = _inputs(batch, heads, height, width, dim, kernel_size, with_rpb, kernel_device, seed=height)
    v = v[..., :value_dim].contiguous()  # value_dim may differ from head_dim (first case: equal)
    weight = torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    out, grads = _forward_backward(neighborhood_attention_2d, q, k, v, rpb, kernel_size, dilation, weight)
    out_ref, grads_ref = _forward_backward(neighborhood_attention_ref, q, k, v, rpb, kernel_size, dilation, weight)
    torch.testing.assert_close(out, out_ref, **TOL[torch.float32])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(kernel_device, dtype):
    q, k, v, rpb = _inputs(1, 1, 6, 6, 8, 3, True, kernel_device, dtype=dtype, seed=3)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    out, grads = _forward_backward(neighborhood_attention_2d, q, k, v, rpb, 3, 2, weight)
    out_ref, grads_ref = _forward_backward(
        neighborhood_attention_ref, *(t.float() for t in (q, k, v, rpb)), 3, 2, weight
    )
    assert out.dtype == dtype and grads[0].dtype == dtype
    torch.testing.assert_close(out.float(), out_ref, **TOL[dtype])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.float(), b, **TOL[dtype])


def test_dispatch_and_bad_inputs(kernel_device, monkeypatch):
    monkeypatch.setenv("MEDAI_KERNELS", "triton")
    q, k, v, _ = _inputs(1, 1, 5, 5, 4, 3, False, kernel_device)
    torch.testing.assert_close(neighborhood_attention_op(q, k, v, 3), neighborhood_attention_ref(q, k, v, 3),
                               **TOL[torch.float32])
    with pytest.raises(ValueError, match="smaller than kernel_size"):
        neighborhood_attention_2d(q, k, v, 3, dilation=2)
