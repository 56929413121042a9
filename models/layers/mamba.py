"""Mamba (Gu & Dao 2023): the selective state-space mixer, its residual block and a block stack.

Parameter names follow mamba-ssm and Hugging Face `transformers` (`in_proj`, `conv1d`,
`x_proj`, `dt_proj`, `A_log`, `D`, `out_proj`; block = `norm` + `mixer`), so their weights
load into these modules unchanged. The scan runs through `kernels.ops.selective_scan`:
mamba-ssm's CUDA kernel when installed on a GPU, medai's chunked PyTorch scan everywhere else.

Used by the Mamba U-Nets (`models/umamba.py`) on flattened image tokens and by EHR sequence
models on event sequences (`MambaStack`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medai.kernels.ops import selective_scan


@dataclass
class MambaConfig:
    """Mamba mixer/block hyper-parameters; defaults are the paper's (mamba-ssm's `Mamba`)."""

    d_model: int = 256
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16), the paper's "auto"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    rms_norm: bool = True  # RMSNorm as in Mamba LMs; False uses LayerNorm
    residual_in_fp32: bool = True
    n_layers: int = 1  # blocks in a MambaStack

    def __post_init__(self) -> None:
        for name in ("d_model", "d_state", "d_conv", "expand", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"MambaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dt_rank is not None and self.dt_rank < 1:
            raise ValueError(f"MambaConfig.dt_rank must be >= 1 or None, got {self.dt_rank}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"MambaConfig needs 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    @property
    def d_inner(self) -> int:
        """Width of the expanded inner stream (expand × d_model)."""
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        """Rank of the Δ projection (ceil(d_model/16) when dt_rank is None)."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as in Mamba and Llama), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x / rms(x) * weight, in x's dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MambaMixer(nn.Module):
    """The selective SSM mixer: (batch, L, d_model) -> (batch, L, d_model), causal along L."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        d_inner, d_state, dt_rank = config.d_inner, config.d_state, config.resolved_dt_rank
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=config.bias)
        # Depthwise causal conv: pad d_conv-1 on both sides and keep the first L outputs.
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, config.d_conv, groups=d_inner, padding=config.d_conv - 1, bias=config.conv_bias
        )
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation: S4D-real A = -(1..N), D = 1, Δ bias = softplus⁻¹(log-uniform dt)."""
        cfg = self.config
        a = torch.arange(1, cfg.d_state + 1, dtype=torch.float32).expand(cfg.d_inner, -1)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        std = cfg.resolved_dt_rank**-0.5 * cfg.dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(cfg.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
        ).clamp(min=cfg.dt_init_floor)
        # softplus(bias) = dt  <=>  bias = dt + log(1 - exp(-dt))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mix along L; `mask` (batch, L), True for real tokens, zeroes padding as transformers does."""
        _check_tokens(hidden, self.config, "MambaMixer")
        length = hidden.shape[1]
        if mask is not None:
            hidden = hidden * mask[..., None].to(hidden.dtype)
        x, gate = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, L) each
        x = F.silu(self.conv1d(x)[..., :length])
        if mask is not None:
            x = x * mask[:, None].to(x.dtype)
        dt_rank, d_state = self.config.resolved_dt_rank, self.config.d_state
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([dt_rank, d_state, d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # bias is added in fp32 inside the scan
        y = selective_scan(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D.float(),
            z=gate,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))


class MambaBlock(nn.Module):
    """Pre-norm residual Mamba block: x + mixer(norm(x)), on (batch, L, d_model)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.norm = _norm(config)
        self.mixer = MambaMixer(config)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the block output (batch, L, d_model); the residual is kept in fp32 if configured."""
        _check_tokens(hidden, self.config, "MambaBlock")
        residual = hidden.float() if self.config.residual_in_fp32 else hidden
        out = self.mixer(self.norm(hidden), mask=mask)
        return residual + out


class MambaStack(nn.Module):
    """`n_layers` Mamba blocks and a final norm: (batch, L, d_model) -> (batch, L, d_model)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layers))
        self.norm_f = _norm(config)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the blocks causally along L; `mask` (batch, L) marks real tokens."""
        _check_tokens(hidden, self.config, "MambaStack")
        dtype = hidden.dtype
        for layer in self.layers:
            hidden = layer(hidden, mask=mask).to(dtype)
        return self.norm_f(hidden)


def _norm(config: MambaConfig) -> nn.Module:
    if config.rms_norm:
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def _check_tokens(hidden: torch.Tensor, config: MambaConfig, who: str) -> None:
    if hidden.dim() != 3 or hidden.shape[-1] != config.d_model:
        raise ValueError(f"{who} expects (batch, L, d_model={config.d_model}), got {tuple(hidden.shape)}")
