"""MIL models: every variant trains a step on real bags through mil_loss; STKIM, AEM and diversity terms."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medai.models import registry as models
from medai.models.mil import (
    AttentionMIL,
    AttentionMILConfig,
    aem_weight,
    attention_entropy_term,
    branch_diversity_loss,
    mil_loss,
    stochastic_topk_mask,
)

MIL_MODELS = models.list_models("*mil*") + models.list_models("acmil*")
TINY = {"transmil": dict(dim=32, heads=4, landmarks=8)}


def tiny(name: str, in_features: int) -> torch.nn.Module:
    if name.startswith("acmil_bracs"):
        return models.create_model(name)
    return models.create_model(name, in_features=in_features, num_classes=2, **TINY.get(name, {}))


@pytest.fixture(scope="module")
def sicap_bags(mil_sicapv2_128d_path):
    from medai.io.mil_bags import read_sicapv2_bags

    return read_sicapv2_bags(mil_sicapv2_128d_path)


@pytest.mark.parametrize("name", sorted(set(MIL_MODELS)))
def test_mil_loss_trains_every_head_and_attention_scores_sum_to_one(name, sicap_bags):
    torch.manual_seed(0)
    model = tiny(name, 128)
    d = model.config.in_features
    bag = sicap_bags[0]
    features = torch.from_numpy(bag.features)
    if d != 128:  # the BRACS models take 384/512-d features; tile the real ones to that width
        features = features.repeat(1, math.ceil(d / 128))[:, :d]
    model.train()
    out = model(features)
    assert out["logits"].shape == (1, model.config.num_classes)
    loss, logs = mil_loss(model, out, torch.tensor(bag.label))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and "slide_loss" in logs
    # With one branch the authors train no branch classifier (their loss0 is 0 for n_token = 1).
    single = getattr(model.config, "num_branches", 0) == 1
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and not (single and "branch_classifiers" in n)]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    model.eval()
    scores = model.attention_scores(features)
    assert scores.shape[1] == bag.num_instances
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(scores.shape[0]))


@pytest.mark.parametrize("name", ["abmil", "abmil_multihead", "acmil"])
def test_eval_prediction_is_invariant_to_instance_order(name, sicap_bags):
    torch.manual_seed(0)
    model = tiny(name, 128).eval()
    features = torch.from_numpy(sicap_bags[3].features)
    perm = torch.randperm(features.shape[0])
    torch.testing.assert_close(model(features[perm])["logits"], model(features)["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.attention_scores(features[perm]), model.attention_scores(features)[:, perm])


@pytest.mark.parametrize("n,n_masked,drop", [(200, 10, 0.6), (50, 10, 1.0), (3, 10, 1.0), (8, 5, 0.4), (30, 0, 0.6)])
def test_stkim_masks_exactly_the_configured_top_instances(n, n_masked, drop):
    k = 5
    logits = torch.randn(k, n, generator=torch.Generator().manual_seed(n))
    keep = stochastic_topk_mask(logits, n_masked, drop, generator=torch.Generator().manual_seed(0))
    expected = min(int(min(n_masked, n) * drop), n - 1)
    if expected == 0:
        assert keep is None
        return
    assert keep.shape == (k, n) and keep.dtype == torch.bool
    top = torch.topk(logits, min(n_masked, n), dim=1).indices
    for b in range(k):
        masked = (~keep[b]).nonzero().flatten()
        assert len(masked) == expected
        assert set(masked.tolist()) <= set(top[b].tolist()), "masked an instance outside the top-k"
        assert keep[b].any(), "masked every instance"


def test_stkim_choice_is_random_across_steps():
    logits = torch.randn(1, 100)
    draws = {tuple((~stochastic_topk_mask(logits, 10, 0.6)[0]).nonzero().flatten().tolist()) for _ in range(20)}
    assert len(draws) > 1


def test_acmil_training_step_masks_and_eval_does_not(sicap_bags):
    torch.manual_seed(0)
    model = tiny("acmil", 128)
    features = torch.from_numpy(sicap_bags[0].features)
    model.train()
    attention = model(features)["attention"]
    n_masked = torch.isinf(attention).sum(dim=1)
    assert (n_masked == int(10 * 0.6)).all()
    model.eval()
    assert torch.isfinite(model(features)["attention"]).all()


def test_entropy_term_equals_direct_computation():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 3
    logits[1, :5] = float("-inf")  # STKIM-masked instances contribute nothing
    p = torch.softmax(logits.double(), dim=1).numpy()
    direct = sum(sum(pi * math.log(pi) for pi in row if pi > 0) for row in p) / 3
    assert float(attention_entropy_term(logits)) == pytest.approx(direct, rel=1e-5)
    leaf = logits.clone().requires_grad_()
    attention_entropy_term(leaf).backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[1, :5] == 0).all()  # masked: finite, zero gradient
    uniform = torch.zeros(1, 64)
    assert float(attention_entropy_term(uniform)) == pytest.approx(-math.log(64), rel=1e-6)


def test_aem_term_enters_the_loss_with_its_weight():
    torch.manual_seed(0)
    features = torch.randn(30, 16)
    base = AttentionMIL(AttentionMILConfig(in_features=16, num_branches=1, n_masked_patch=0, head_mode="concat"))
    aem = AttentionMIL(AttentionMILConfig(in_features=16, num_branches=1, n_masked_patch=0, head_mode="concat", aem_lambda=0.1))
    aem.load_state_dict(base.state_dict())
    label = torch.tensor(1)
    out = base(features)
    loss_base, _ = mil_loss(base, out, label)
    loss_aem, logs = mil_loss(aem, out, label)
    expected = 0.1 * float(attention_entropy_term(out["attention"]).detach())
    assert float((loss_aem - loss_base).detach()) == pytest.approx(expected, rel=1e-5)
    assert logs["aem_lambda"] == 0.1


def test_aem_cosine_schedule():
    assert aem_weight(0.1, "constant", 0.7) == 0.1
    assert aem_weight(0.1, "cosine", 0.0) == pytest.approx(0.1)
    assert aem_weight(0.1, "cosine", 0.5) == pytest.approx(0.05)
    assert aem_weight(0.1, "cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        aem_weight(0.1, "linear", 0.5)


def test_diversity_loss_equals_mean_pairwise_cosine():
    logits = torch.randn(4, 25, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(logits, dim=1).numpy()
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    direct = np.mean([p[i] @ p[j] / (np.linalg.norm(p[i]) * np.linalg.norm(p[j])) for i, j in pairs])
    assert float(branch_diversity_loss(logits)) == pytest.approx(direct, rel=1e-5)
    assert float(branch_diversity_loss(logits[:1])) == 0.0
    same = logits[:1].repeat(3, 1)
    assert float(branch_diversity_loss(same)) == pytest.approx(1.0, rel=1e-6)


def test_transmil_attention_undoes_nystrom_and_square_padding():
    torch.manual_seed(0)
    # 10 instances -> 4x4 grid (6 repeats) + class token = 17 tokens -> left-padded to 24 for 8 landmarks.
    model = tiny("transmil", 12).eval()
    features = torch.randn(10, 12)
    scores = model.attention_scores(features)
    assert scores.shape == (1, 10)
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0))
    layer = model.layer2
    x, side, n = model._tokens(features)
    x = model.ppeg(model.layer1(x), side)
    row = layer.attn.row_attention(layer.norm(x), row=0).mean(dim=0)  # over class token + 16 grid tokens
    assert row.shape == (17,)
    folded = row[1:11].clone()
    folded[:6] += row[11:]
    torch.testing.assert_close(scores[0], folded.clamp_min(0) / folded.clamp_min(0).sum())


def test_transmil_handles_a_single_instance_and_large_bags():
    model = tiny("transmil", 8).eval()
    assert model(torch.randn(1, 8))["logits"].shape == (1, 2)
    assert model.attention_scores(torch.randn(5000, 8)).shape == (1, 5000)


def test_one_bag_at_a_time():
    model = tiny("abmil", 8)
    with pytest.raises(ValueError, match="one bag"):
        model(torch.randn(2, 5, 8))
    assert model(torch.randn(1, 5, 8))["logits"].shape == (1, 2)


# --------------------------------------------------------------------------------------
# Chunked inference: same outputs as the whole-bag path, memory bounded by features + O(K N)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["abmil", "abmil_multihead", "acmil_aem"])
def test_chunked_eval_equals_whole_bag_eval(name):
    torch.manual_seed(0)
    chunked = tiny(name, 64)
    chunked.config.chunk_instances = 1500  # 20k instances -> 14 chunks, the last one partial
    whole = copy.deepcopy(chunked)
    whole.config.chunk_instances = 10**9  # one chunk: the (N, hidden) projection of the whole bag
    chunked.eval(), whole.eval()
    features = torch.randn(20_000, 64, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        a, b = chunked(features), whole(features)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)
    torch.testing.assert_close(chunked.attention_scores(features), whole.attention_scores(features))
    # The same bag through the training path (STKIM off) gives the same pooled logits too.
    whole.train()
    whole.config.n_masked_patch = 0
    with torch.no_grad():
        torch.testing.assert_close(whole(features)["logits"], a["logits"], rtol=1e-5, atol=1e-5)


def test_chunked_eval_casts_half_features_per_chunk():
    torch.manual_seed(0)
    model = tiny("acmil", 32).eval()
    model.config.chunk_instances = 100
    features = torch.randn(1000, 32).half()
    torch.testing.assert_close(model(features)["logits"], model(features.float())["logits"])


_PEAK_RSS_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from medai.models import registry as models
    def peak_mib():
        # VmHWM is the peak that clear_refs resets; getrusage's ru_maxrss also keeps peaks recorded
        # when threads exit (signal->maxrss), which no reset clears, so it can hide the forward's peak.
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    n, d, chunks = int(sys.argv[1]), int(sys.argv[2]), [int(c) for c in sys.argv[3].split(",")]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = models.create_model("acmil", in_features=d).eval()
    with torch.no_grad():
        model(torch.randn(2 * 16384, d))  # warm-up: library initialisation is not the forward's memory
    features = torch.empty((n, d))
    generator = torch.Generator().manual_seed(0)
    for start in range(0, n, 65536):  # filled in blocks: no transient second copy of the bag
        block = features[start : start + 65536]
        block.copy_(torch.randn(block.shape, generator=generator))
        del block
    results = []
    for chunk in chunks:
        model.config.chunk_instances = chunk
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset this process's peak-RSS mark (VmHWM) to the current RSS
        before = peak_mib()
        with torch.no_grad():
            out = model(features)
        after = peak_mib()
        results.append({"chunk": chunk, "extra_peak_mib": after - before, "attention": list(out["attention"].shape),
                        "finite": bool(torch.isfinite(out["logits"]).all())})
        del out
    print(json.dumps({"features_mib": features.numel() * 4 / 2**20, "runs": results}))
    """
)


def _eval_forward_peak_rss(n: int, d: int, chunks: list[int]) -> dict:
    """Run ACMIL (K=5, hidden 512) eval forwards on an (n, d) fp32 bag in a child; extra peak RSS per chunk size."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak-RSS reset needs Linux /proc/self/clear_refs")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_CHILD, str(n), str(d), ",".join(map(str, chunks))],
        capture_output=True, text=True, timeout=600, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_bound_mib(n: int, k: int = 5) -> float:
    """Allowed extra peak RSS of an eval forward: fixed chunk buffers plus two fp32 (K, N) score tensors."""
    # One 16,384-instance chunk holds ~32 MiB per (chunk, 512) activation; 192 MiB covers a
    # few of them and allocator slack. Two (K, N) tensors: the logits and one transient.
    return 192 + 2 * k * n * 4 / 2**20


def test_acmil_eval_memory_is_bounded_and_the_whole_bag_path_is_not():
    """100k x 1,024 fp32 bag: the chunked forward stays under the bound; the one-chunk (old) path exceeds it."""
    n = 100_000
    result = _eval_forward_peak_rss(n, 1024, [16384, 10**9])
    chunked, whole = result["runs"]
    bound = _memory_bound_mib(n)
    print(f"ACMIL eval, {n:,} x 1,024 fp32 ({result['features_mib']:.0f} MiB of features): extra peak RSS "
          f"{chunked['extra_peak_mib']:.0f} MiB chunked, {whole['extra_peak_mib']:.0f} MiB whole bag (bound {bound:.0f})")
    assert chunked["attention"] == [5, n] and chunked["finite"]
    assert chunked["extra_peak_mib"] < bound
    # The measurement can fail: projecting the whole bag at once (N x 512 fp32 twice) breaks the bound.
    assert whole["extra_peak_mib"] > bound


@pytest.mark.slow  # ~45 s on 2 cores, most of it drawing the 4 GiB of random features
def test_acmil_eval_on_a_million_instance_bag_runs_in_bounded_memory():
    """1,000,000 x 1,024 fp32 bag (3.8 GiB): extra peak RSS stays at chunk buffers plus O(K N) scores."""
    n = 1_000_000
    result = _eval_forward_peak_rss(n, 1024, [16384])
    (run,) = result["runs"]
    bound = _memory_bound_mib(n)
    print(f"ACMIL eval, {n:,} x 1,024 fp32 ({result['features_mib']:.0f} MiB of features): "
          f"extra peak RSS {run['extra_peak_mib']:.0f} MiB (bound {bound:.0f})")
    assert run["attention"] == [5, n] and run["finite"]
    assert run["extra_peak_mib"] < bound


def test_transmil_chunked_eval_equals_dense_attention():
    torch.manual_seed(0)
    # 300 instances -> 18x18 grid + class token = 325 tokens, left-padded to 328: 47 chunks of 7, the last partial.
    model = models.create_model("transmil", in_features=12, num_classes=2, dim=32, heads=4, landmarks=8,
                                dropout=0.0, chunk_instances=7)
    features = torch.randn(300, 12)
    with torch.no_grad():
        chunked = model.eval()(features)["logits"]
        dense = model.train()(features)["logits"]  # training builds the (heads, n, m), (heads, m, n) factors whole
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-5)


def test_transmil_scores_map_exactly_onto_the_real_instances():
    """Heatmap scores = class-token row of the dense Nystrom attention, pad and class token removed, repeats folded."""
    torch.manual_seed(0)
    model = models.create_model("transmil", in_features=12, num_classes=2, dim=32, heads=4, landmarks=8,
                                chunk_instances=5).eval()
    features = torch.randn(10, 12)
    scores = model.attention_scores(features)
    # 10 instances -> 4x4 grid (instances 0..5 repeated as tokens 11..16) + class token = 17 tokens,
    # left-padded with 7 zero tokens to 24 (a multiple of 8 landmarks): class token at 7, instance i at 8 + i.
    with torch.no_grad():
        x, side, n = model._tokens(features)
        x = model.ppeg(model.layer1(x), side)
        attn = model.layer2.attn
        q, k, _, q_land, k_land, pad = attn._project(model.layer2.norm(x))
        assert (side, n, pad) == (4, 10, 7)
        attn1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)
        attn3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)
        full = (attn1 @ attn._landmark_inverse(q_land, k_land) @ attn3)[0].mean(dim=0)  # (24, 24)
    cls_row = full[7]
    expected = cls_row[8:18].clone()
    expected[:6] += cls_row[18:24]
    expected = expected.clamp_min(0) / expected.clamp_min(0).sum()
    assert scores.shape == (1, 10)
    torch.testing.assert_close(scores[0], expected, rtol=1e-5, atol=1e-6)
