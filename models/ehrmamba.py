"""EHRMamba (Fallahpour et al. 2024): EHR event sequences through a Mamba backbone, with a causal
Transformer of similar size as the baseline it is compared against.

Embeddings follow EHRMamba/Odyssey (`MambaEmbeddingsForCEHR`): the concept embedding is
concatenated with sinusoidal time-delta and age embeddings whose frequency and phase are learned
(sin(t·w + φ)), projected back to `d_model` through tanh, then token-type, visit-order and
visit-segment embeddings are added and the sum is LayerNorm-ed. The backbone is medai's one Mamba
(`models.layers.mamba.MambaStack`, scan via `kernels.ops.selective_scan`). Two heads share it:
next-token logits (tied to the concept embedding) for pretraining, and a sequence classifier on
the last real token (the model is causal, so only that token has read the whole sequence). For
multitask prompted fine-tuning the first token is a task token and the classifier emits one
block of logits per task; the pipeline reads the block of each sample's task.

Inputs (batch, L), right-padded with 0: `input_ids`, `type_ids`, `time_stamps` (days),
`ages` (years), `visit_orders`, `visit_segments`, `attention_mask` (1 = real token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medai.models.layers.mamba import MambaConfig, MambaStack
from medai.models.registry import register_model


@dataclass
class EHRMambaConfig:
    """EHRMamba hyper-parameters; `ehrmamba` reproduces the paper (768-d, 32 blocks, 2,048 tokens)."""

    vocab_size: int = 4096
    d_model: int = 768
    n_layers: int = 32
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    time_embeddings_size: int = 32
    type_vocab_size: int = 16
    max_num_visits: int = 512
    visit_segments: int = 3
    max_seq_length: int = 2048  # the paper's training length; longer sequences run (the scan is linear)
    num_labels: int = 1
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    backbone: Literal["mamba", "transformer"] = "mamba"
    n_heads: int = 8  # transformer baseline only
    ffn_mult: int = 4  # transformer baseline only
    task_logits: dict[str, list[int]] = field(default_factory=dict)  # task -> [start, stop) in the classifier output

    def __post_init__(self) -> None:
        if self.backbone == "transformer" and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    def mamba_config(self) -> MambaConfig:
        """The backbone's MambaConfig."""
        return MambaConfig(d_model=self.d_model, d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                           n_layers=self.n_layers)


class TimeEmbedding(nn.Module):
    """sin(t·w + φ) with learned w, φ (Time2Vec's periodic part); deltas between tokens when `is_delta`."""

    def __init__(self, size: int, is_delta: bool = False):
        super().__init__()
        self.is_delta = is_delta
        self.w = nn.Parameter(torch.empty(1, size))
        self.phi = nn.Parameter(torch.empty(1, size))
        nn.init.xavier_uniform_(self.w)
        nn.init.xavier_uniform_(self.phi)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, L) times -> (batch, L, size)."""
        t = t.float()
        if self.is_delta:
            t = torch.cat([torch.zeros_like(t[:, :1]), t[:, 1:] - t[:, :-1]], dim=1)
        return torch.sin(t.unsqueeze(-1) * self.w + self.phi)


class EHREmbeddings(nn.Module):
    """Concept ⊕ time-delta ⊕ age → tanh(linear), + token type + visit order + visit segment, LayerNorm."""

    def __init__(self, cfg: EHRMambaConfig):
        super().__init__()
        self.cfg = cfg
        self.concept_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.visit_order_embeddings = nn.Embedding(cfg.max_num_visits, cfg.d_model)
        self.visit_segment_embeddings = nn.Embedding(cfg.visit_segments, cfg.d_model)
        self.time_embeddings = TimeEmbedding(cfg.time_embeddings_size, is_delta=True)
        self.age_embeddings = TimeEmbedding(cfg.time_embeddings_size)
        self.scale_back_concat_layer = nn.Linear(cfg.d_model + 2 * cfg.time_embeddings_size, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        # std 0.02 as in transformers' Mamba/BERT: the tied output layer starts near uniform
        for table in (self.concept_embeddings, self.token_type_embeddings, self.visit_order_embeddings,
                      self.visit_segment_embeddings):
            nn.init.normal_(table.weight, std=0.02)
        with torch.no_grad():
            self.concept_embeddings.weight[cfg.pad_token_id].zero_()

    def forward(self, batch: dict[str, torch.Tensor], concept_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, L, d_model); `concept_embeds` replaces the concept lookup (integrated gradients)."""
        ids = batch["input_ids"]
        concept = self.concept_embeddings(ids) if concept_embeds is None else concept_embeds
        x = torch.cat([concept, self.time_embeddings(batch["time_stamps"]), self.age_embeddings(batch["ages"])], dim=-1)
        x = torch.tanh(self.scale_back_concat_layer(x))
        x = (
            x
            + self.token_type_embeddings(batch["type_ids"].clamp(0, self.cfg.type_vocab_size - 1))
            + self.visit_order_embeddings(batch["visit_orders"].clamp(0, self.cfg.max_num_visits - 1))
            + self.visit_segment_embeddings(batch["visit_segments"].clamp(0, self.cfg.visit_segments - 1))
        )
        return self.dropout(self.norm(x))


class CausalTransformer(nn.Module):
    """Pre-norm causal Transformer encoder (the baseline), SDPA attention so 16k tokens fit on CPU."""

    def __init__(self, cfg: EHRMambaConfig):
        super().__init__()
        self.layers = nn.ModuleList(_TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Right padding + causal attention: real tokens never see padding, so `mask` is not needed."""
        for layer in self.layers:
            hidden = layer(hidden)
        return self.norm_f(hidden)


class _TransformerBlock(nn.Module):
    def __init__(self, cfg: EHRMambaConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.proj(att.transpose(1, 2).reshape(b, length, d)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class EHRMamba(nn.Module):
    """EHRMamba: embeddings → backbone → {next-token logits, per-task classification logits}."""

    def __init__(self, cfg: EHRMambaConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = EHREmbeddings(cfg)
        self.backbone = MambaStack(cfg.mamba_config()) if cfg.backbone == "mamba" else CausalTransformer(cfg)
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.d_model, cfg.num_labels))

    def encode(self, batch: dict[str, torch.Tensor], concept_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (batch, L, d_model)."""
        mask = batch.get("attention_mask")
        hidden = self.embeddings(batch, concept_embeds)
        return self.backbone(hidden, mask=mask.bool() if mask is not None else None)

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, L, vocab) logits, the output layer tied to the concept embedding."""
        return hidden @ self.embeddings.concept_embeddings.weight.t()

    def pretraining_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over real tokens (EHRMamba's pretraining objective)."""
        hidden = self.encode(batch)
        logits = self.next_token_logits(hidden[:, :-1])
        target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)

    def classify(self, batch: dict[str, torch.Tensor], concept_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, num_labels) logits from the last real token's hidden state."""
        hidden = self.encode(batch, concept_embeds)
        last = batch["attention_mask"].long().sum(1).clamp(min=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.classifier(pooled.to(self.classifier[1].weight.dtype))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Classification logits (batch, num_labels)."""
        return self.classify(batch)


_REGISTER = dict(
    family="ehrmamba", config=EHRMambaConfig, input_kind="token_sequence",
    card="data_cards/checkpoints/ehrmamba_small_shared_ehr.md",
)
# Tests: a 32-d, one-block model over a 200-concept vocabulary.
TINY = dict(d_model=32, n_layers=1, time_embeddings_size=8, vocab_size=200, num_labels=3, dropout=0.0)


@register_model(tiny=TINY, **_REGISTER)
def ehrmamba(config: EHRMambaConfig) -> EHRMamba:
    """EHRMamba at the paper's size: 768-d, 32 Mamba blocks (125M parameters at a 4.6k vocabulary)."""
    return EHRMamba(config)


@register_model(defaults=dict(d_model=128, n_layers=4, time_embeddings_size=16), tiny=TINY, **_REGISTER)
def ehrmamba_small(config: EHRMambaConfig) -> EHRMamba:
    """A small EHRMamba for the shared demo data (128-d, 4 blocks): sized to 100-200 patients."""
    return EHRMamba(config)


@register_model(
    defaults=dict(d_model=128, n_layers=2, time_embeddings_size=16, backbone="transformer", n_heads=4),
    tiny=TINY, **_REGISTER,
)
def ehr_transformer_small(config: EHRMambaConfig) -> EHRMamba:
    """The baseline: the same embeddings and heads on a causal Transformer of similar size (128-d, 2 layers)."""
    return EHRMamba(config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
