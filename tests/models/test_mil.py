"""MIL models: every registered variant builds, trains a step, saves/loads; STKIM, AEM and diversity terms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import models
from models.mil import (
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
def test_build_forward_backward_save_load(name, sicap_bags, tmp_path):
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
    path = models.save_weights(model, tmp_path / f"{name}.safetensors")
    clone = tiny(name, 128)
    models.load_weights(clone, path)
    clone.eval()
    torch.testing.assert_close(clone(features)["logits"], model(features)["logits"])


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
