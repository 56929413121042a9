"""gated_attention_pool Triton kernel vs its reference: forward, gradients, masks, entropy, dtypes, dispatch.

Tolerances per dtype (the kernel accumulates in fp32 with IEEE dots):
fp32 rtol/atol 1e-4 (forward) and 2e-4 (gradients); fp16 and bf16 inputs are compared with the
fp32 reference on the same rounded inputs at 2e-2 (fp16) and 5e-2 (bf16, 8-bit mantissa outputs).
"""

from __future__ import annotations

import pytest
import torch

from medai.kernels.gated_attention_pool import gated_attention_pool, gated_attention_pool_stats, top_instances
from medai.kernels.gated_attention_pool_ref import gated_attention_pool_ref
from tests.kernels.test_gated_attention_pool import make_params

TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}
GRAD_TOL = {torch.float32: dict(rtol=2e-4, atol=2e-4), **{k: v for k, v in TOL.items() if k != torch.float32}}


def _run(fn, h, params, mask, weight, weight_logits):
    leaves = [t.clone().requires_grad_() for t in [h, *params]]
    pooled, logits = fn(*leaves, mask=mask)
    ((pooled.float() * weight).sum() + (logits.float() * weight_logits).sum()).backward()
    return pooled, logits, [t.grad for t in leaves]


# N = 1 (one instance), 45 (not a multiple of the 32-instance block), D odd (and split in D-chunks), K = 1,
# L not a power of 2.
@pytest.mark.parametrize("n,d,hidden,k", [(1, 5, 3, 1), (45, 13, 9, 3), (70, 33, 20, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_and_gradients_match_reference_fp32(kernel_device, monkeypatch, n, d, hidden, k, masked):
    import medai.kernels.gated_attention_pool as kernel_module

    monkeypatch.setattr(kernel_module, "D_CHUNK", 16)  # D = 33 runs in 3 chunks of 16: the chunked walk over D
    g = torch.Generator().manual_seed(n + d)
    h = torch.randn(n, d, generator=g).to(kernel_device)
    params = [t.to(kernel_device) for t in make_params(d, hidden, k, seed=n)]
    mask = None
    if masked:
        mask = (torch.rand(k, n, generator=g) > 0.4).to(kernel_device)
        mask[:, -1] = True
        if k > 1 and n > 1:
            mask[0] = False  # branch 0 keeps a single instance
            mask[0, n // 2] = True
    weight = torch.randn(k, d, generator=g).to(kernel_device)
    weight_logits = torch.randn(k, n, generator=g).to(kernel_device)
    pooled, logits, grads = _run(gated_attention_pool, h, params, mask, weight, weight_logits)
    pooled_ref, logits_ref, grads_ref = _run(gated_attention_pool_ref, h, params, mask, weight, weight_logits)
    torch.testing.assert_close(pooled, pooled_ref, **TOL[torch.float32])
    torch.testing.assert_close(logits, logits_ref, **TOL[torch.float32])
    for name, a, b in zip(["h", "wv", "bv", "wu", "bu", "ww", "bw"], grads, grads_ref):
        torch.testing.assert_close(a, b, **GRAD_TOL[torch.float32], msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(kernel_device, dtype):
    n, d, hidden, k = 50, 24, 16, 2
    g = torch.Generator().manual_seed(5)
    h = torch.randn(n, d, generator=g).to(kernel_device, dtype)
    params = [t.to(kernel_device, dtype) for t in make_params(d, hidden, k, seed=5)]
    weight = torch.randn(k, d, generator=g).to(kernel_device)
    weight_logits = torch.randn(k, n, generator=g).to(kernel_device)
    pooled, logits, grads = _run(gated_attention_pool, h, params, None, weight, weight_logits)
    # Reference in fp32 on the same (rounded) inputs: the error left is the kernel's output rounding.
    pooled_ref, logits_ref, grads_ref = _run(
        gated_attention_pool_ref, h.float(), [p.float() for p in params], None, weight, weight_logits
    )
    assert pooled.dtype == dtype and logits.dtype == dtype and grads[0].dtype == dtype
    torch.testing.assert_close(pooled.float(), pooled_ref, **TOL[dtype])
    torch.testing.assert_close(logits.float(), logits_ref, **TOL[dtype])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.float(), b, **GRAD_TOL[dtype])


def test_entropy_and_top_instances(kernel_device):
    n, d, k = 40, 8, 3
    g = torch.Generator().manual_seed(11)
    h = torch.randn(n, d, generator=g).to(kernel_device)
    params = [t.to(kernel_device) for t in make_params(d, 8, k, seed=11)]
    mask = torch.ones(k, n, dtype=torch.bool, device=kernel_device)
    mask[1, ::2] = False
    _, logits, entropy = gated_attention_pool_stats(h, *params, mask=mask)
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
    expected = -(weights * torch.log(weights.clamp_min(1e-38))).sum(dim=1)
    torch.testing.assert_close(entropy, expected, rtol=1e-4, atol=1e-5)
    assert bool((entropy <= torch.log(mask.sum(1).float()) + 1e-5).all())  # bounded by log(#kept)
    top = top_instances(logits, 5, mask)
    assert top.shape == (k, 5) and bool(mask[1, top[1]].all())  # masked instances never selected
    torch.testing.assert_close(logits.gather(1, top), logits.masked_fill(~mask, float("-inf")).topk(5).values)


def test_workspace_independent_of_bag_size():
    from medai.kernels.gated_attention_pool import NUM_SPLITS, _launch_shape

    small, large = _launch_shape(10_000, 512, 128, 2), _launch_shape(1_000_000, 512, 128, 2)
    assert small[1] == large[1] == (NUM_SPLITS, 4)  # same (K, D) partials for 10k and 1M instances; D in 4 chunks


def test_dispatch_selects_the_kernel(monkeypatch, kernel_device):
    import medai.kernels.gated_attention_pool as kernel_module
    from medai.kernels.ops import gated_attention_pool as op

    monkeypatch.setenv("MEDAI_KERNELS", "triton")
    calls = []
    monkeypatch.setattr(kernel_module, "gated_attention_pool", lambda *a, **kw: calls.append(1) or ("k", "k"))
    assert op(torch.randn(3, 4, device=kernel_device), *make_params(4, 2, 1)) == ("k", "k") and calls == [1]


def test_bad_inputs_are_refused_by_the_kernel_path(kernel_device):
    h = torch.randn(10, 8, device=kernel_device)
    params = [t.to(kernel_device) for t in make_params(8, 4, 2)]
    with pytest.raises(ValueError, match="every instance"):
        gated_attention_pool(h, *params, mask=torch.zeros(2, 10, dtype=torch.bool, device=kernel_device))
    with pytest.raises(ValueError, match="empty"):
        gated_attention_pool(h[:0], *params)
