"""Slide-level multiple-instance learning: ABMIL, ACMIL (+AEM) and TransMIL.

A bag is one slide (or one classic MIL bag): instance features (N, D), N varying per bag,
processed one bag at a time so no padding is ever computed. Every model returns a dict with
`logits` (1, C) for the bag and `attention` (K, N) raw per-instance scores (masked ones at
-inf during training), and offers `attention_scores(features) -> (K, N)` probabilities for
heatmaps.

- ABMIL (Ilse et al. 2018): Linear+ReLU instance projection, gated attention
  a = softmax(w^T (tanh(V h) * sigmoid(U h))), z = sum_i a_i h_i, linear classifier.
- ACMIL (Zhang et al. 2023, "Attention-Challenging MIL"), following the authors' `ACMIL_GA`:
  K attention branches (multiple branch attention), one classifier per branch plus a slide
  classifier on the branch-averaged attention, Stochastic Top-K Instance Masking (STKIM) in
  training and a diversity loss (mean pairwise cosine similarity of the branch attentions).
- AEM (Zhang et al. 2024, attention entropy maximisation): `lambda * sum softmax(a) log_softmax(a)`
  added to the loss (negative entropy, so minimising it spreads attention), for any model here.
- TransMIL (Shao et al. 2021): Nystrom self-attention layers with a pyramid position encoding
  generator (PPEG) over the bag laid out as a square; the bag is read from its class token.

The gated pool goes through `kernels.ops.gated_attention_pool` (chunked online softmax for big
bags, a fused Triton kernel on CUDA). In eval mode the gated-attention models also project the
instances chunk by chunk, so a 1M x 1024 bag needs the features plus O(K N) scores; TransMIL's
eval memory is O(N dim) (see `TransMIL`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medai.errors import CheckpointError
from medai.io.torch_pickle import read_torch_checkpoint
from medai.kernels.ops import gated_attention_pool
from medai.models.pretrained import Converted, SharedData, register_converter
from medai.models.registry import load_state_strict, register_model, save_weights

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------
@dataclass
class AttentionMILConfig:
    """Gated-attention MIL (ABMIL / ACMIL / multi-head); defaults reproduce ACMIL's paper setting."""

    in_features: int = 1024
    num_classes: int = 2
    hidden_features: int = 512  # instance projection width (the authors' D_inner)
    attention_features: int = 128  # gated attention width (L; the authors' D)
    num_branches: int = 5  # K attention branches
    n_masked_patch: int = 10  # STKIM: top instances per branch eligible for masking
    mask_drop: float = 0.6  # STKIM: fraction of those masked each training step
    # "branches": ACMIL (a classifier per branch + slide classifier on the averaged attention);
    # "concat": multi-head ABMIL (the K pooled vectors concatenated, one classifier).
    head_mode: Literal["branches", "concat"] = "branches"
    dropout: float = 0.0
    diversity_weight: float = 1.0  # weight of the branch diversity loss (ACMIL uses 1)
    aem_lambda: float = 0.0  # AEM attention-entropy weight; 0 turns AEM off
    aem_schedule: Literal["constant", "cosine"] = "constant"
    # Eval mode projects and pools this many instances at a time (memory only; results are the same).
    chunk_instances: int = 16384

    def __post_init__(self) -> None:
        if self.chunk_instances < 1:
            raise ValueError(f"chunk_instances must be >= 1, got {self.chunk_instances}")
        if self.num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {self.num_branches}")
        if not 0.0 <= self.mask_drop <= 1.0:
            raise ValueError(f"mask_drop must be in [0, 1], got {self.mask_drop}")
        if self.n_masked_patch < 0:
            raise ValueError(f"n_masked_patch must be >= 0, got {self.n_masked_patch}")


@dataclass
class TransMILConfig:
    """TransMIL (Shao et al. 2021) with the paper's defaults (512-d, 8 heads, 256 landmarks)."""

    in_features: int = 1024
    num_classes: int = 2
    dim: int = 512
    heads: int = 8
    landmarks: int = 256
    pinv_iterations: int = 6
    residual_kernel: int = 33
    dropout: float = 0.1
    # Eval mode computes Nystrom attention this many tokens at a time: blocks of heads x landmarks x chunk
    # (8 x 256 x 4096 fp32 = 32 MiB) instead of two heads x landmarks x N matrices (memory only).
    chunk_instances: int = 4096

    def __post_init__(self) -> None:
        if self.chunk_instances < 1:
            raise ValueError(f"chunk_instances must be >= 1, got {self.chunk_instances}")


# --------------------------------------------------------------------------------------
# Losses and STKIM (pure tensor functions, tested on their own)
# --------------------------------------------------------------------------------------
def stochastic_topk_mask(
    logits: torch.Tensor, n_masked_patch: int, mask_drop: float, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """Return a bool keep-mask (K, N) hiding a random `mask_drop` share of each branch's top instances.

    As in ACMIL: per branch take the top-min(n_masked_patch, N) instances by score and mask
    int(that * mask_drop) of them at random; at least one instance always stays visible.
    Returns None when nothing would be masked.
    """
    k, n = logits.shape
    top = min(n_masked_patch, n)
    n_drop = min(int(top * mask_drop), n - 1)
    if n_drop <= 0:
        return None
    _, top_indices = torch.topk(logits.detach(), top, dim=1)
    noise = torch.rand((k, top), generator=generator, device=logits.device if generator is None else "cpu")
    chosen = torch.argsort(noise.to(logits.device), dim=1)[:, :n_drop]
    dropped = torch.gather(top_indices, 1, chosen)
    keep = torch.ones((k, n), dtype=torch.bool, device=logits.device)
    keep.scatter_(1, dropped, False)
    return keep


def masked_softmax(attention: torch.Tensor) -> torch.Tensor:
    """Softmax over instances of attention logits (K, N); -inf entries get weight 0."""
    return torch.softmax(attention.float(), dim=-1)


def attention_entropy_term(attention: torch.Tensor) -> torch.Tensor:
    """AEM term: sum_i p_i log p_i over instances, averaged over branches (negative entropy; 0 for masked)."""
    log_p = torch.log_softmax(attention.float(), dim=-1)
    p = log_p.exp()
    # Zero the -inf logs *before* multiplying: a where() after p * log_p would pass 0 * -inf = nan
    # into the gradient of masked instances.
    safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    return (p * safe_log_p).sum() / attention.shape[0]


def branch_diversity_loss(attention: torch.Tensor) -> torch.Tensor:
    """ACMIL diversity loss: mean pairwise cosine similarity of branch attention distributions."""
    k = attention.shape[0]
    if k < 2:
        return attention.new_zeros(())
    p = F.normalize(masked_softmax(attention), dim=-1)
    similarity = p @ p.transpose(0, 1)
    pairs = torch.triu_indices(k, k, offset=1, device=attention.device)
    return similarity[pairs[0], pairs[1]].mean()


def aem_weight(aem_lambda: float, schedule: str, progress: float) -> float:
    """AEM weight at training progress in [0, 1]: constant, or cosine-annealed from lambda to 0."""
    if schedule == "constant":
        return aem_lambda
    if schedule == "cosine":
        progress = min(max(progress, 0.0), 1.0)
        return aem_lambda * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown AEM schedule {schedule!r} (constant, cosine)")


def mil_loss(
    model: nn.Module, output: dict[str, torch.Tensor], label: torch.Tensor, progress: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total training loss of a MIL model for one bag and its parts (slide CE, branch CE, diversity, AEM)."""
    label = label.reshape(1).long()
    cfg = model.config
    loss = F.cross_entropy(output["logits"], label)
    logs = {"slide_loss": float(loss.detach())}
    if "branch_logits" in output and output["branch_logits"].shape[0] > 1:
        k = output["branch_logits"].shape[0]
        branch = F.cross_entropy(output["branch_logits"], label.repeat(k))
        diversity = branch_diversity_loss(output["attention"])
        loss = loss + branch + cfg.diversity_weight * diversity
        logs.update(branch_loss=float(branch.detach()), diversity_loss=float(diversity.detach()))
    weight = aem_weight(getattr(cfg, "aem_lambda", 0.0), getattr(cfg, "aem_schedule", "constant"), progress)
    if weight > 0 and "attention" in output:
        entropy = attention_entropy_term(output["attention"])
        loss = loss + weight * entropy
        logs.update(aem_term=float(entropy.detach()), aem_lambda=weight)
    return loss, logs


def _as_bag(features: torch.Tensor) -> torch.Tensor:
    """Accept (N, D) or a batch of one bag (1, N, D); return (N, D)."""
    if features.dim() == 3:
        if features.shape[0] != 1:
            raise ValueError(f"MIL models take one bag at a time; got a batch of {features.shape[0]}")
        features = features[0]
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"expected bag features (N, D) with N >= 1, got shape {tuple(features.shape)}")
    return features


# --------------------------------------------------------------------------------------
# Gated attention MIL: ABMIL, ACMIL, multi-head
# --------------------------------------------------------------------------------------
class GatedAttention(nn.Module):
    """K-branch gated attention scorer whose parameters feed `gated_attention_pool`."""

    def __init__(self, in_features: int, attention_features: int, num_branches: int):
        super().__init__()
        self.tanh_branch = nn.Linear(in_features, attention_features)  # V
        self.sigmoid_branch = nn.Linear(in_features, attention_features)  # U
        self.heads = nn.Linear(attention_features, num_branches)  # w, one row per branch

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (pooled (K, D), raw logits (K, N))."""
        return gated_attention_pool(
            h,
            self.tanh_branch.weight,
            self.tanh_branch.bias,
            self.sigmoid_branch.weight,
            self.sigmoid_branch.bias,
            self.heads.weight,
            self.heads.bias,
            mask,
        )


class AttentionMIL(nn.Module):
    """Gated-attention MIL with K branches (ABMIL at K=1 without masking; ACMIL with STKIM)."""

    def __init__(self, config: AttentionMILConfig):
        super().__init__()
        self.config = config
        c = config
        self.projection = nn.Linear(c.in_features, c.hidden_features, bias=False)
        self.attention = GatedAttention(c.hidden_features, c.attention_features, c.num_branches)
        self.dropout = nn.Dropout(c.dropout)
        if c.head_mode == "branches":
            self.branch_classifiers = nn.ModuleList(
                [nn.Linear(c.hidden_features, c.num_classes) for _ in range(c.num_branches)]
            )
            self.slide_classifier = nn.Linear(c.hidden_features, c.num_classes)
        else:
            self.classifier = nn.Linear(c.hidden_features * c.num_branches, c.num_classes)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Project instance features (N, in_features), cast to the model's dtype, to (N, hidden_features)."""
        weight = self.projection.weight
        return F.relu(self.projection(_as_bag(features).to(weight.dtype)))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return logits (1, C), branch_logits (K, C) in branch mode, attention (K, N) with STKIM masks at -inf.

        Training projects the whole bag at once (STKIM needs every score before the pool). Eval mode
        runs `config.chunk_instances` instances at a time (`pool_in_chunks`), so inference memory is
        the features plus O(K N) scores whatever N is; both give the same outputs to float rounding.
        """
        c = self.config
        if self.training:
            h = self.embed(features)
            mask = None
            if c.n_masked_patch > 0 and c.mask_drop > 0:
                with torch.no_grad():
                    _, raw = self.attention(h)
                mask = stochastic_topk_mask(raw, c.n_masked_patch, c.mask_drop)
            pooled, logits = self.attention(h, mask)
            attention = logits if mask is None else logits.masked_fill(~mask, float("-inf"))
        else:
            pooled, attention = self.pool_in_chunks(features)
        pooled = self.dropout(pooled)
        if c.head_mode == "branches":
            branch_logits = torch.stack([head(pooled[i]) for i, head in enumerate(self.branch_classifiers)])
            # softmax(A).mean(0) @ h == mean over branches of the pooled vectors.
            slide = self.slide_classifier(pooled.mean(dim=0, keepdim=True))
            return {"logits": slide, "branch_logits": branch_logits, "attention": attention}
        return {"logits": self.classifier(pooled.reshape(1, -1)), "attention": attention}

    def pool_in_chunks(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmasked pool (pooled (K, hidden), raw logits (K, N)), `config.chunk_instances` instances at a time.

        Each chunk is projected and pooled by `gated_attention_pool`; the chunk results are merged
        with an online softmax: a chunk's pooled vector is a softmax average over that chunk, so
        weighting it by exp(chunk log-sum-exp - bag log-sum-exp) gives the bag's softmax average.
        Peak memory is the features, the (K, N) logits and one chunk's activations, never the
        (N, hidden) projection of the whole bag (2 GB at 1M x 512 fp32).
        """
        features = _as_bag(features)
        n, chunk = features.shape[0], self.config.chunk_instances
        pooled = log_norm = logits = None
        for start in range(0, n, chunk):
            chunk_pooled, chunk_logits = self.attention(self.embed(features[start : start + chunk]))
            if logits is None:
                # One preallocated (K, N) output rather than a list to concatenate: no second copy.
                logits = chunk_logits.new_empty((chunk_logits.shape[0], n))
            logits[:, start : start + chunk] = chunk_logits
            chunk_log_norm = torch.logsumexp(chunk_logits.float(), dim=1, keepdim=True)  # (K, 1)
            if pooled is None:
                pooled, log_norm = chunk_pooled.float(), chunk_log_norm
                continue
            merged = torch.logaddexp(log_norm, chunk_log_norm)
            pooled = pooled * torch.exp(log_norm - merged) + chunk_pooled.float() * torch.exp(chunk_log_norm - merged)
            log_norm = merged
        return pooled.to(logits.dtype), logits

    @torch.no_grad()
    def attention_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Per-branch attention probabilities (K, N), no masking, for heatmaps; memory as the eval forward."""
        return masked_softmax(self.pool_in_chunks(features)[1])


# --------------------------------------------------------------------------------------
# TransMIL
# --------------------------------------------------------------------------------------
def _moore_penrose_pinv(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """Iterative Moore-Penrose pseudo-inverse (Razavi et al.), as in the Nystromformer paper."""
    abs_x = x.abs()
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (col.max() * row.max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Nystrom-approximated multi-head self-attention (Xiong et al. 2021), O(N m) for m landmarks.

    Training builds the two (heads, N, m) and (heads, m, N) softmax factors in full. Eval mode
    computes the same product `chunk` tokens at a time: the landmark summary softmax(q_m k^T) v
    with an online softmax over key chunks, then each query chunk's softmax(q k_m^T) pinv(.) times
    it, so no (heads, N, m) matrix exists; what stays O(N) is q, k, v and the output (N x dim each).
    """

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, residual_kernel: int,
                 dropout: float, chunk: int = 4096):
        super().__init__()
        self.heads, self.landmarks, self.pinv_iterations, self.chunk = heads, landmarks, pinv_iterations, chunk
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * self.head_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * self.head_dim, dim), nn.Dropout(dropout))
        # Depthwise conv over the sequence on the values (the Nystromformer residual).
        self.residual = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def _project(self, x: torch.Tensor):
        """Left-pad to a multiple of the landmarks; return scaled q, k, v (B, H, n + pad, d), their landmarks and the pad."""
        b, n, _ = x.shape
        m = self.landmarks
        pad = (m - n % m) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q = q * self.scale
        group = q.shape[2] // m
        q_land = q.reshape(b, self.heads, m, group, self.head_dim).mean(dim=3)
        k_land = k.reshape(b, self.heads, m, group, self.head_dim).mean(dim=3)
        return q, k, v, q_land, k_land, pad

    def _landmark_inverse(self, q_land: torch.Tensor, k_land: torch.Tensor) -> torch.Tensor:
        """pinv(softmax(q_m k_m^T)): the (B, H, m, m) middle Nystrom factor."""
        return _moore_penrose_pinv(torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1), self.pinv_iterations)

    def _landmark_summary(self, q_land: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Return softmax(q_m k^T) @ v (B, H, m, d) and that softmax's log-normaliser (B, H, m, 1), keys in chunks."""
        b, h, m, d = q_land.shape
        running_max = q_land.new_full((b, h, m, 1), float("-inf"))
        running_sum = q_land.new_zeros((b, h, m, 1))
        summary = q_land.new_zeros((b, h, m, d))
        for start in range(0, k.shape[2], self.chunk):
            scores = q_land @ k[:, :, start : start + self.chunk].transpose(-1, -2)  # (B, H, m, chunk)
            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
            rescale = torch.exp(running_max - new_max)
            weights = torch.exp(scores - new_max)
            running_sum = running_sum * rescale + weights.sum(dim=-1, keepdim=True)
            summary = summary * rescale + weights @ v[:, :, start : start + self.chunk]
            running_max = new_max
        return summary / running_sum, running_max + torch.log(running_sum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over (B, n, dim); output (B, n, dim)."""
        n = x.shape[1]
        q, k, v, q_land, k_land, pad = self._project(x)
        attn2_inv = self._landmark_inverse(q_land, k_land)
        if self.training:
            attn1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)  # (B, H, n, m)
            attn3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)  # (B, H, m, n)
            out = (attn1 @ attn2_inv) @ (attn3 @ v)
        else:
            summary, _ = self._landmark_summary(q_land, k, v)
            out = torch.empty_like(v)
            for start in range(0, q.shape[2], self.chunk):
                attn1 = torch.softmax(q[:, :, start : start + self.chunk] @ k_land.transpose(-1, -2), dim=-1)
                out[:, :, start : start + self.chunk] = (attn1 @ attn2_inv) @ summary
        out = out + self.residual(v)
        out = out.transpose(1, 2).reshape(x.shape[0], -1, self.heads * self.head_dim)
        return self.to_out(out)[:, -n:]  # drop the left padding

    @torch.no_grad()
    def row_attention(self, x: torch.Tensor, row: int) -> torch.Tensor:
        """Approximate attention of query `row` (of the unpadded sequence) over all n tokens: (H, n).

        Row `row` of softmax(q k_m^T) pinv(.) softmax(q_m k^T), built key chunk by key chunk from
        the softmax log-normalisers, so memory is O(H n) plus (H, m, chunk) blocks.
        """
        q, k, v, q_land, k_land, pad = self._project(x[:1])
        _, log_norm = self._landmark_summary(q_land, k, v)
        query = q[0, :, pad + row : pad + row + 1]  # (H, 1, d)
        mix = torch.softmax(query @ k_land[0].transpose(-1, -2), dim=-1) @ self._landmark_inverse(q_land, k_land)[0]
        weights = torch.empty((self.heads, k.shape[2]), dtype=q.dtype, device=q.device)
        for start in range(0, k.shape[2], self.chunk):
            attn3 = torch.exp(q_land[0] @ k[0, :, start : start + self.chunk].transpose(-1, -2) - log_norm[0])
            weights[:, start : start + self.chunk] = (mix @ attn3)[:, 0]
        return weights[:, pad:]  # undo the Nystrom left padding


class TransLayer(nn.Module):
    """Pre-norm Nystrom attention block with a residual connection."""

    def __init__(self, c: TransMILConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.dim)
        self.attn = NystromAttention(
            c.dim, c.heads, c.landmarks, c.pinv_iterations, c.residual_kernel, c.dropout, c.chunk_instances
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + attention(norm(x))."""
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions over the square token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """x (B, 1 + side*side, dim) with the class token first; returns the same shape."""
        b, _, dim = x.shape
        cls_token, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(b, dim, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """TransMIL: projection, class token, square padding, Nystrom layer, PPEG, Nystrom layer, classifier.

    Memory: nothing N x N, and in eval mode nothing N x landmarks either (attention runs in
    `config.chunk_instances`-token blocks). But unlike the gated-attention models, inference is
    not bounded by the features plus O(N) scores: both layers map the whole token sequence to a
    new one and PPEG convolves the whole square grid, so about a dozen (N, dim) activations live
    at once (q, k, v, padded copies, outputs, residual; measured 1.3 GB above 195 MiB of features
    at N = 50k, D = 1024, dim 512, against 1.9 GB with the whole (heads, N, m) factors).
    Going below O(N dim) would need the layers streamed with recomputation, which this
    architecture does not allow without restructuring; for the largest slides use ABMIL/ACMIL.
    """

    def __init__(self, config: TransMILConfig):
        super().__init__()
        self.config = c = config
        self.projection = nn.Sequential(nn.Linear(c.in_features, c.dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, c.dim) * 0.02)
        self.layer1 = TransLayer(c)
        self.ppeg = PPEG(c.dim)
        self.layer2 = TransLayer(c)
        self.norm = nn.LayerNorm(c.dim)
        self.classifier = nn.Linear(c.dim, c.num_classes)

    def _tokens(self, features: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Project, pad to a square by repeating the first instances, prepend the class token."""
        h = self.projection(_as_bag(features)).unsqueeze(0)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            h = torch.cat([h, h[:, :extra]], dim=1)
        return torch.cat([self.cls_token.expand(1, -1, -1), h], dim=1), side, n

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return logits (1, C); attention maps come from `attention_scores` (AEM does not apply here)."""
        x, side, _ = self._tokens(features)
        x = self.layer2(self.ppeg(self.layer1(x), side))
        return {"logits": self.classifier(self.norm(x)[:, 0])}

    def _cls_attention(self, layer: TransLayer, x: torch.Tensor, n: int) -> torch.Tensor:
        """Class-token attention over the N real instances, averaged over heads and renormalised.

        `row_attention` has already dropped the Nystrom left padding; here the class token
        (token 0) goes, and the square-padding tokens N + j, copies of instance j, fold onto j.
        Nystrom weights can be slightly negative (pseudo-inverse), so they are clamped at 0.
        """
        with torch.no_grad():
            weights = layer.attn.row_attention(layer.norm(x), row=0).mean(dim=0)  # (1 + side^2,)
        tokens = weights[1:]
        scores = tokens[:n].clone()
        extra = tokens.shape[0] - n
        if extra:
            scores[:extra] += tokens[n:]
        scores = scores.clamp_min(0)
        return scores / scores.sum().clamp_min(1e-12)

    @torch.no_grad()
    def attention_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Class-token attention probabilities (1, N) of the last layer, padding undone, for heatmaps.

        Memory as the eval forward: O(N dim) token activations, no N x N or N x landmarks matrix.
        """
        x, side, n = self._tokens(features)
        x = self.ppeg(self.layer1(x), side)
        return self._cls_attention(self.layer2, x, n).unsqueeze(0)


# --------------------------------------------------------------------------------------
# The ACMIL authors' checkpoints (torch pickles) -> medai safetensors, without running their code.
# Their `checkpoint-best.pth` holds {model: state dict, optimizer, epoch, config: utils.utils.Struct};
# it is read through `medai.io.torch_pickle` (allow-listed tensors and containers; the Struct becomes
# an inert record), every tensor is mapped onto AttentionMIL names (unmatched names are an error),
# loaded strictly into a model whose shape is inferred from the tensors, and written as safetensors
# with the training config as metadata.
# --------------------------------------------------------------------------------------
_ACMIL_NAME_MAP = {
    "dimreduction.fc1.weight": "projection.weight",
    "attention.attention_V.0.weight": "attention.tanh_branch.weight",
    "attention.attention_V.0.bias": "attention.tanh_branch.bias",
    "attention.attention_U.0.weight": "attention.sigmoid_branch.weight",
    "attention.attention_U.0.bias": "attention.sigmoid_branch.bias",
    "attention.attention_weights.weight": "attention.heads.weight",
    "attention.attention_weights.bias": "attention.heads.bias",
    "Slide_classifier.fc.weight": "slide_classifier.weight",
    "Slide_classifier.fc.bias": "slide_classifier.bias",
}


def acmil_key(author_key: str) -> str | None:
    """Return medai's name for a tensor of the authors' ACMIL_GA, or None when it has no counterpart."""
    if author_key in _ACMIL_NAME_MAP:
        return _ACMIL_NAME_MAP[author_key]
    parts = author_key.split(".")
    # classifier.{i}.fc.{weight,bias} -> branch_classifiers.{i}.{weight,bias}
    if len(parts) == 4 and parts[0] == "classifier" and parts[1].isdigit() and parts[2] == "fc":
        return f"branch_classifiers.{parts[1]}.{parts[3]}"
    return None


def convert_acmil_state_dict(author_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the authors' ACMIL_GA state dict onto AttentionMIL names; raise KeyError naming unmatched tensors."""
    converted, unmatched = {}, []
    for key, tensor in author_state.items():
        name = acmil_key(key)
        if name is None:
            unmatched.append(key)
        else:
            converted[name] = tensor.detach().clone().contiguous()
    if unmatched:
        raise KeyError(f"ACMIL tensors with no medai counterpart: {', '.join(sorted(unmatched))}")
    return converted


def acmil_config_from_state(state: dict[str, torch.Tensor], **overrides) -> AttentionMILConfig:
    """Infer an AttentionMILConfig (widths, K, classes) from a converted ACMIL state dict."""
    hidden, in_features = state["projection.weight"].shape
    num_branches, attention_features = state["attention.heads.weight"].shape
    num_classes = state["slide_classifier.weight"].shape[0]
    values = dict(
        in_features=in_features,
        hidden_features=hidden,
        attention_features=attention_features,
        num_branches=num_branches,
        num_classes=num_classes,
    )
    values.update(overrides)
    return AttentionMILConfig(**values)


# The authors' training-config class, loaded as an inert record (attributes only).
ACMIL_RECORD_CLASSES = ("utils.utils.Struct",)
# Training-config fields kept as metadata in the converted file.
_KEPT_CONFIG = ("D_feat", "D_inner", "n_token", "n_masked_patch", "mask_drop", "n_class", "arch", "pretrain", "dataset", "seed", "lr", "wd", "train_epoch")


def read_acmil_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (the authors' model state dict, {epoch, config fields}) from a checkpoint, safely."""
    obj = read_torch_checkpoint(path, records=ACMIL_RECORD_CLASSES)
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(path, "expected a dict with a 'model' state dict (the ACMIL authors' save_model layout)")
    state = obj["model"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "the 'model' entry holds non-tensor values")
    config = obj.get("config")
    fields = config.as_dict() if hasattr(config, "as_dict") else {}
    info = {k: fields[k] for k in _KEPT_CONFIG if k in fields}
    info["epoch"] = obj.get("epoch")
    return dict(state), info


@register_converter("acmil", reads="an ACMIL authors' checkpoint-best.pth (read without executing the pickle)")
def convert_acmil_checkpoint(src: str | Path, dest: str | Path) -> Converted:
    """Convert an ACMIL authors' checkpoint to medai safetensors; return the file and how to load it."""
    author_state, info = read_acmil_checkpoint(src)
    try:
        state = convert_acmil_state_dict(author_state)
    except KeyError as exc:
        raise CheckpointError(src, str(exc.args[0])) from exc
    config = acmil_config_from_state(state)
    model = AttentionMIL(config)
    load_state_strict(model, state, src)  # names every missing / unexpected / mis-shaped tensor
    meta = {"source": str(src), "format": "medai.models.mil.AttentionMIL", "authors_config": json.dumps(info)}
    log.info("converted %s (%d tensors, K=%d) -> %s", src, len(state), config.num_branches, dest)
    shape = ("in_features", "hidden_features", "attention_features", "num_branches", "num_classes")
    return Converted(save_weights(model, dest, metadata=meta), "acmil", {k: getattr(config, k) for k in shape})


# --------------------------------------------------------------------------------------
# Registered variants
# --------------------------------------------------------------------------------------
_CARD = "data_cards/checkpoints/mil.md"
_ABMIL = dict(num_branches=1, n_masked_patch=0, mask_drop=0.0, head_mode="concat")
_ACMIL = dict(num_branches=5, n_masked_patch=10, mask_drop=0.6, head_mode="branches")
# Tiny widths for tests, on bags of 16-d instance features.
_TINY = dict(in_features=16, hidden_features=16, attention_features=8)
_GATED = dict(family="mil", config=AttentionMILConfig, input_kind="feature_bag", card=_CARD)


def _bracs(tag: str) -> SharedData:
    # The authors' BRACS checkpoints in the shared data, converted once into the cache.
    return SharedData("acmil_bracs_checkpoints", f"acmil_bracs_{tag}/checkpoint-best.pth",
                      target=f"acmil_bracs_{tag}.safetensors", convert=convert_acmil_checkpoint)


@register_model(defaults=_ABMIL, tiny=_TINY, **_GATED)
def abmil(config: AttentionMILConfig) -> nn.Module:
    """ABMIL: gated attention pooling, one branch, one classifier (Ilse et al. 2018)."""
    return AttentionMIL(config)


@register_model(defaults={**_ABMIL, "aem_lambda": 0.1}, tiny=_TINY, **_GATED)
def abmil_aem(config: AttentionMILConfig) -> nn.Module:
    """ABMIL trained with the AEM attention-entropy term (lambda 0.1)."""
    return AttentionMIL(config)


@register_model(defaults={**_ABMIL, "num_branches": 4}, tiny=_TINY, **_GATED)
def abmil_multihead(config: AttentionMILConfig) -> nn.Module:
    """Multi-head gated attention MIL: 4 attention heads, pooled vectors concatenated, one classifier."""
    return AttentionMIL(config)


@register_model(defaults={**_ABMIL, "num_branches": 4, "aem_lambda": 0.1}, tiny=_TINY, **_GATED)
def abmil_multihead_aem(config: AttentionMILConfig) -> nn.Module:
    """Multi-head gated attention MIL with the AEM term (lambda 0.1)."""
    return AttentionMIL(config)


@register_model(defaults=_ACMIL, tiny=_TINY, **_GATED)
def acmil(config: AttentionMILConfig) -> nn.Module:
    """ACMIL: 5 attention branches, STKIM (top 10, drop 0.6), diversity loss (Zhang et al. 2023)."""
    return AttentionMIL(config)


@register_model(defaults={**_ACMIL, "aem_lambda": 0.1}, tiny=_TINY, **_GATED)
def acmil_aem(config: AttentionMILConfig) -> nn.Module:
    """ACMIL trained with the AEM attention-entropy term (lambda 0.1)."""
    return AttentionMIL(config)


# The authors' two released BRACS models (3 classes); tests keep their feature widths.
_BRACS_512D = dict(in_features=512, hidden_features=256, attention_features=128, num_branches=1, num_classes=3,
                   n_masked_patch=0, mask_drop=0.0, head_mode="branches")
_BRACS_384D = dict(in_features=384, hidden_features=128, attention_features=128, num_branches=5, num_classes=3,
                   n_masked_patch=10, mask_drop=0.6, head_mode="branches")
_BRACS_TINY = dict(hidden_features=16, attention_features=8)


@register_model(defaults=_BRACS_512D, tiny=_BRACS_TINY, pretrained={"bracs": _bracs("512d")}, **_GATED)
def acmil_bracs_512d(config: AttentionMILConfig) -> nn.Module:
    """The ACMIL authors' BRACS model on 512-d features (256-d projection, 1 branch, 3 classes)."""
    return AttentionMIL(config)


@register_model(defaults=_BRACS_384D, tiny=_BRACS_TINY, pretrained={"bracs": _bracs("384d")}, **_GATED)
def acmil_bracs_384d(config: AttentionMILConfig) -> nn.Module:
    """The ACMIL authors' BRACS model on 384-d features (128-d projection, 5 branches, 3 classes)."""
    return AttentionMIL(config)


@register_model(
    family="mil", config=TransMILConfig, input_kind="feature_bag", card=_CARD,
    tiny=dict(in_features=16, dim=32, heads=4, landmarks=8),
)
def transmil(config: TransMILConfig) -> nn.Module:
    """TransMIL: two Nystrom attention layers with PPEG (Shao et al. 2021)."""
    return TransMIL(config)
