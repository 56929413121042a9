"""MedViT-V2 (Manzari et al. 2025): a hybrid CNN-transformer with KAN layers and (dilated)
neighborhood attention for medical image classification.

Layout (paper Fig. 2, public code `MedViT.py`):
  stem: four 3x3 conv-BN-ReLU, stride 4 overall
  stage 1: Local Feature Perception (LFP) blocks
  stage 2: LFP blocks, then one Global Feature Perception (GFP) block
  stage 3: [LFP, LFP, GFP] repeated
  stage 4: GFP blocks
  head: BatchNorm, global average pool, linear
LFP = patch embed -> BN -> 2D neighborhood attention with relative position bias (7x7 window)
      -> residual -> BN -> locality feed-forward (1x1 conv, h-swish, 3x3 or 7x7 depthwise conv,
      h-swish, squeeze-excite, 1x1 conv), which carries its own residual as in the public code.
GFP = patch embed -> BN -> efficient MHSA (keys/values averaged over sr^2 tokens) on 75% of the
      channels -> 1x1 projection to the remaining channels -> multi-head convolutional attention
      -> concat -> BN -> FasterKAN feed-forward per pixel (models/layers/kan.py).

Dilation. The paper describes Dilated Neighborhood Attention; the public code calls NATTEN with
dilation 1. `dilation_schedule="dinat"` (default) alternates NA and DiNA inside each stage as
DiNAT does, with the dilation that makes a 7x7 window span the stage's feature map at the
reference input size (224 px: 8, 4, 2, 1); `"none"` uses dilation 1; `dilations` sets every LFP
block explicitly. At run time a dilation larger than the feature map allows is reduced to fit.

Feature maps smaller than the 7x7 window (inputs under 224 px reach them in stages 2-3) attend
to the whole map with the matching position biases; the public code pads them with zero tokens.

`reference_code_compat=True` reproduces the public code exactly so its released checkpoints
give the same outputs: dilation 1, NATTEN's zero padding of small maps, and its raw `reshape` (not `permute`) between channel-first
maps and the token layouts fed to neighborhood attention and to the KAN. That reshape mixes
channels with pixels; the checkpoints were trained with it, so this switch keeps it, while the
default follows the paper (attention over pixels, KAN over each pixel's channel vector).
`convert_reference_state_dict` maps the public checkpoint names onto this implementation;
`convert_medvit_checkpoint` turns an authors' `.pth` into safetensors (`medai models convert medvit`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from medai.kernels import ops
from medai.errors import CheckpointError, ConfigError, ModelInputError
from medai.models.layers.kan import FasterKAN, FasterKANConfig
from medai.models.pretrained import Converted, Shipped, register_converter
from medai.models.registry import create_model, load_state_strict, register_model, save_weights

log = logging.getLogger(__name__)

BN_EPS = 1e-5
MIN_INPUT_PX = 28  # MedMNIST's native size; below it the stage-2 spatial reduction has no tokens
MAX_INPUT_PX = 1024  # stage-2 global attention memory grows with the fourth power of the side
CARD = "data_cards/checkpoints/medvit.md"


@dataclass
class MedViTConfig:
    """MedViT-V2 hyper-parameters; defaults are MedViT-V2-T as published."""

    depths: tuple[int, int, int, int] = (2, 2, 6, 1)
    dims: tuple[int, int, int, int] = (64, 128, 192, 384)
    stem_channels: tuple[int, int, int] = (64, 32, 64)
    strides: tuple[int, int, int, int] = (1, 2, 2, 2)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    head_dim: int = 32
    mix_block_ratio: float = 0.75  # share of GFP channels that go through E-MHSA
    local_mlp_ratio: float = 3.0  # LFP locality feed-forward expansion
    global_mlp_ratio: float = 2.0  # GFP KAN hidden width / channels
    na_kernel_size: int = 7
    dilation_schedule: Literal["dinat", "none"] = "dinat"
    dinat_input_px: int = 224  # input size the DiNAT dilations are computed for
    dilations: list[list[int]] | None = None  # per stage, one per LFP block; overrides the schedule
    reference_code_compat: bool = False
    drop_path_rate: float = 0.1
    attn_drop: float = 0.0
    drop: float = 0.0
    num_classes: int = 1000
    in_chans: int = 3
    kan: FasterKANConfig = field(default_factory=FasterKANConfig)

    def __post_init__(self) -> None:
        if self.depths[2] % 3:
            raise ConfigError(f"depths[2] must be a multiple of 3 (stage 3 repeats LFP, LFP, GFP), got {self.depths[2]}")
        if min(self.depths[1], self.depths[3]) < 1:
            raise ConfigError(f"stages 2 and 4 need at least one block, got depths {self.depths}")
        if any(d % self.head_dim for d in self.dims):
            raise ConfigError(f"every width must be a multiple of head_dim={self.head_dim}, got {self.dims}")
        # GFP blocks (stages 2-4) give E-MHSA a share rounded to a multiple of 32; MHCA needs the rest.
        no_mhca = [d for d in self.dims[1:] if d <= _make_divisible(int(d * self.mix_block_ratio), 32)]
        if no_mhca:
            raise ConfigError(
                f"widths {no_mhca} of stages 2-4 leave no channels for MHCA at mix_block_ratio={self.mix_block_ratio}"
            )
        if self.na_kernel_size % 2 == 0:
            raise ConfigError(f"na_kernel_size must be odd, got {self.na_kernel_size}")
        if self.reference_code_compat and self.dilations and any(d != 1 for s in self.dilations for d in s):
            raise ConfigError("reference_code_compat=True reproduces the public code, which uses dilation 1")


def stage_layout(depths: tuple[int, int, int, int]) -> list[list[str]]:
    """Block kinds per stage ('local' = LFP, 'global' = GFP): the paper's hybrid strategy."""
    return [
        ["local"] * depths[0],
        ["local"] * (depths[1] - 1) + ["global"],
        ["local", "local", "global"] * (depths[2] // 3),
        ["global"] * depths[3],
    ]


def lfp_dilations(config: MedViTConfig) -> list[list[int]]:
    """Dilation of every LFP block, per stage (one entry per LFP block in that stage)."""
    layout = stage_layout(config.depths)
    counts = [kinds.count("local") for kinds in layout]
    if config.reference_code_compat or config.dilation_schedule == "none":
        schedule = [[1] * n for n in counts]
    else:
        schedule, side = [], config.dinat_input_px / 4  # the stem reduces by 4
        for stage, n in enumerate(counts):
            side /= config.strides[stage]
            dilation = max(1, int(side) // config.na_kernel_size)
            schedule.append([1 if i % 2 == 0 else dilation for i in range(n)])  # NA, DiNA, NA, ...
    if config.dilations is not None:
        if [len(s) for s in config.dilations] != counts:
            raise ConfigError(f"dilations must list one value per LFP block per stage, {counts} in all")
        schedule = [list(s) for s in config.dilations]
    return schedule


def _make_divisible(value: float, divisor: int) -> int:
    """Round to the nearest multiple of `divisor`, never more than 10% down (MobileNet's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvNormAct(nn.Sequential):
    """3x3 conv (padding 1, no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_chans, eps=BN_EPS)
        self.act = nn.ReLU(inplace=True)


class PatchEmbed(nn.Module):
    """Downsample by 2 (average pool) and/or change width (1x1 conv + BN); identity otherwise."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1):
        super().__init__()
        self.pool = (
            nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if stride == 2 else nn.Identity()
        )
        if stride == 2 or in_chans != out_chans:
            self.conv = nn.Conv2d(in_chans, out_chans, 1, bias=False)
            self.norm = nn.BatchNorm2d(out_chans, eps=BN_EPS)
        else:
            self.conv, self.norm = nn.Identity(), nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, out, H/stride, W/stride)."""
        return self.norm(self.conv(self.pool(x)))


class NeighborhoodAttention2d(nn.Module):
    """Multi-head 2D (dilated) neighborhood attention over channels-last maps (B, H, W, C).

    Parameters are NATTEN's NeighborhoodAttention2D ones (qkv, rpb, proj). Maps smaller than the
    window are zero-padded at the bottom/right and cropped back, as NATTEN does.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, pad_small_maps: bool = True):
        super().__init__()
        self.num_heads, self.kernel_size, self.dilation = num_heads, kernel_size, dilation
        self.pad_small_maps = pad_small_maps
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def effective_dilation(self, height: int, width: int) -> int:
        """The configured dilation, reduced so that the dilated window fits the map."""
        return max(1, min(self.dilation, min(height, width) // self.kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, channels = x.shape
        if min(height, width) < self.kernel_size and not self.pad_small_maps:
            return self._clipped_window(x)
        dilation = self.effective_dilation(height, width)
        pad_h, pad_w = max(0, self.kernel_size - height), max(0, self.kernel_size - width)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = height + pad_h, width + pad_w
        qkv = self.qkv(x).reshape(batch, padded_h, padded_w, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)  # each (B, heads, H, W, head_dim)
        out = ops.neighborhood_attention_2d(q, k, v, self.kernel_size, dilation, self.rpb, self.scale)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, padded_h, padded_w, channels)
        return self.proj(out[:, :height, :width])


    def _clipped_window(self, x: Tensor) -> Tensor:
        """Map smaller than the window: every pixel attends to the whole map, with the position
        bias of each offset (the window clipped to the image instead of padded with zero tokens)."""
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        rows = torch.arange(height, device=x.device).repeat_interleave(width)
        cols = torch.arange(width, device=x.device).repeat(height)
        k1 = self.kernel_size - 1
        bias = self.rpb[:, rows[None, :] - rows[:, None] + k1, cols[None, :] - cols[:, None] + k1]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, channels))


class SqueezeExcite(nn.Module):
    """Channel gating: global average -> Linear -> ReLU -> Linear -> hard sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.reduce = nn.Linear(channels, channels // reduction)
        self.restore = nn.Linear(channels // reduction, channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        gate = F.hardsigmoid(self.restore(F.relu(self.reduce(x.mean((2, 3))))))
        return x * gate[:, :, None, None]


class LocalityFeedForward(nn.Module):
    """x + (1x1 conv -> BN -> h-swish -> kxk depthwise -> BN -> h-swish -> SE -> 1x1 conv -> BN)(x)."""

    def __init__(self, dim: int, kernel_size: int, expand_ratio: float, se_reduction: int):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.expand = nn.Conv2d(dim, hidden, 1, bias=False)
        self.expand_norm = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False)
        self.depthwise_norm = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, se_reduction)
        self.project = nn.Conv2d(hidden, dim, 1, bias=False)
        self.project_norm = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        y = F.hardswish(self.expand_norm(self.expand(x)))
        y = F.hardswish(self.depthwise_norm(self.depthwise(y)))
        return x + self.project_norm(self.project(self.se(y)))


class LocalFeaturePerception(nn.Module):
    """LFP block: (dilated) neighborhood attention then the locality feed-forward, both residual."""

    def __init__(
        self, in_chans: int, dim: int, stride: int, ffn_kernel: int, drop_path: float, dilation: int,
        config: MedViTConfig,
    ):
        super().__init__()
        self.reference_reshape = config.reference_code_compat
        self.embed = PatchEmbed(in_chans, dim, stride)
        self.attn_norm = nn.BatchNorm2d(dim, eps=BN_EPS)
        # The public code (NATTEN) pads maps smaller than the window with zero tokens; otherwise
        # the window is clipped to the map, so small inputs attend to pixels, not padding.
        self.attn = NeighborhoodAttention2d(
            dim, dim // config.head_dim, config.na_kernel_size, dilation, pad_small_maps=config.reference_code_compat
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ffn_norm = nn.BatchNorm2d(dim, eps=BN_EPS)
        # SE reduction = dim, so the gate's bottleneck has expand_ratio units (as published)
        self.ffn = LocalityFeedForward(dim, ffn_kernel, config.local_mlp_ratio, se_reduction=dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, dim, H', W')."""
        x = self.embed(x)
        b, c, h, w = x.shape
        y = self.attn_norm(x)
        if self.reference_reshape:
            y = self.attn(y.reshape(b, h, w, c)).reshape(b, c, h, w)
        else:
            y = self.attn(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.drop_path(y)
        return x + self.ffn(self.ffn_norm(x))


class EfficientMHSA(nn.Module):
    """Multi-head self-attention whose keys/values are averaged over groups of sr^2 tokens."""

    def __init__(self, dim: int, head_dim: int, sr_ratio: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads, self.scale = dim // head_dim, head_dim**-0.5
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)
        self.tokens_per_key = sr_ratio**2
        # Pooling runs over consecutive tokens in raster order (Next-ViT's E-MHSA), not 2D blocks.
        self.reduce_norm = nn.BatchNorm1d(dim, eps=BN_EPS) if sr_ratio > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, C)."""
        batch, tokens, channels = x.shape
        kv_in = x
        if self.reduce_norm is not None:
            pooled = F.avg_pool1d(x.transpose(1, 2), self.tokens_per_key, self.tokens_per_key)
            kv_in = self.reduce_norm(pooled).transpose(1, 2)
        heads = lambda t: t.reshape(batch, -1, self.num_heads, channels // self.num_heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(kv_in)), heads(self.v(kv_in)),
            dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, channels)))


class MultiHeadConvAttention(nn.Module):
    """MHCA: grouped 3x3 conv (one group per head) -> BN -> ReLU -> 1x1 conv."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.group_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim // head_dim, bias=False)
        self.norm = nn.BatchNorm2d(dim, eps=BN_EPS)
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.proj(F.relu(self.norm(self.group_conv(x))))


class GlobalFeaturePerception(nn.Module):
    """GFP block: E-MHSA on part of the channels, MHCA on the rest, concat, FasterKAN feed-forward."""

    def __init__(self, in_chans: int, dim: int, stride: int, sr_ratio: int, drop_path: float, config: MedViTConfig):
        super().__init__()
        self.reference_reshape = config.reference_code_compat
        ratio = config.mix_block_ratio
        mhsa_dim = _make_divisible(int(dim * ratio), 32)
        mhca_dim = dim - mhsa_dim
        self.embed = PatchEmbed(in_chans, mhsa_dim, stride)
        self.mhsa_norm = nn.BatchNorm2d(mhsa_dim, eps=BN_EPS)
        self.mhsa = EfficientMHSA(mhsa_dim, config.head_dim, sr_ratio, config.attn_drop, config.drop)
        self.mhsa_drop_path = DropPath(drop_path * ratio) if drop_path > 0 else nn.Identity()
        self.mhca_embed = PatchEmbed(mhsa_dim, mhca_dim)
        self.mhca = MultiHeadConvAttention(mhca_dim, config.head_dim)
        self.mhca_drop_path = DropPath(drop_path * (1 - ratio)) if drop_path > 0 else nn.Identity()
        self.kan_norm = nn.BatchNorm2d(dim, eps=BN_EPS)
        self.kan = FasterKAN([dim, int(dim * config.global_mlp_ratio), dim], config.kan)
        self.kan_drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, dim, H', W')."""
        x = self.embed(x)
        b, c, h, w = x.shape
        tokens = self.mhsa_norm(x).flatten(2).transpose(1, 2)
        x = x + self.mhsa_drop_path(self.mhsa(tokens)).transpose(1, 2).reshape(b, c, h, w)
        y = self.mhca_embed(x)
        y = y + self.mhca_drop_path(self.mhca(y))
        x = torch.cat([x, y], dim=1)
        y = self.kan_norm(x)
        d = x.shape[1]
        if self.reference_reshape:
            y = self.kan(y.reshape(-1, d)).reshape(b, d, h, w)
        else:
            y = self.kan(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.kan_drop_path(y)


class MedViT(nn.Module):
    """MedViT-V2 classifier: (B, in_chans, H, W) images -> (B, num_classes) logits."""

    def __init__(self, config: MedViTConfig):
        super().__init__()
        self.config = config
        c0, c1, c2 = config.stem_channels
        self.stem = nn.Sequential(
            ConvNormAct(config.in_chans, c0, 2), ConvNormAct(c0, c1, 1), ConvNormAct(c1, c2, 1), ConvNormAct(c2, c2, 2)
        )
        layout, dilations = stage_layout(config.depths), lfp_dilations(config)
        total = sum(config.depths)  # stochastic depth grows linearly over all blocks
        drop_paths = [config.drop_path_rate * i / max(1, total - 1) for i in range(total)]
        blocks, in_chans, index = [], c2, 0
        self.stage_ends: list[int] = []
        for stage, kinds in enumerate(layout):
            dim, local_index = config.dims[stage], 0
            for position, kind in enumerate(kinds):
                stride = 2 if config.strides[stage] == 2 and position == 0 else 1
                if kind == "local":
                    ffn_kernel = 7 if stage == 0 else 3
                    dilation = dilations[stage][local_index]
                    local_index += 1
                    blocks.append(
                        LocalFeaturePerception(in_chans, dim, stride, ffn_kernel, drop_paths[index], dilation, config)
                    )
                else:
                    blocks.append(
                        GlobalFeaturePerception(in_chans, dim, stride, config.sr_ratios[stage], drop_paths[index], config)
                    )
                in_chans, index = dim, index + 1
            self.stage_ends.append(index - 1)
        self.blocks = nn.ModuleList(blocks)
        self.num_features = in_chans
        self.head_norm = nn.BatchNorm2d(in_chans, eps=BN_EPS)
        self.head = nn.Linear(in_chans, config.num_classes)
        self.apply(_init_weights)

    def check_input(self, x: Tensor) -> None:
        """Raise ModelInputError unless x is (B, in_chans, H, W), finite, with sides in the supported range."""
        if x.dim() != 4:
            raise ModelInputError(f"MedViT expects images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_chans:
            raise ModelInputError(
                f"MedViT was built for {self.config.in_chans} channel(s), got {x.shape[1]} "
                f"(shape {tuple(x.shape)}); convert the image or build the model with in_chans={x.shape[1]}"
            )
        height, width = x.shape[-2:]
        if min(height, width) < MIN_INPUT_PX or max(height, width) > MAX_INPUT_PX:
            raise ModelInputError(
                f"MedViT takes images with sides from {MIN_INPUT_PX} to {MAX_INPUT_PX} px, got {height}x{width}; "
                "resize first (the transforms in medai/transforms do)"
            )
        if self.config.reference_code_compat and height != width:
            raise ModelInputError(f"reference_code_compat reproduces code that needs square images, got {height}x{width}")
        if not torch.isfinite(x).all():
            raise ModelInputError("image contains NaN or infinite values")

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> normalised final feature map (B, num_features, H/32, W/32)."""
        self.check_input(x)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head_norm(x)

    def forward_head(self, features: Tensor) -> Tensor:
        """Final feature map -> logits (B, num_classes); pooled features (B, num_features) without a head."""
        return self.head(features.mean((2, 3)))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for `num_classes`; 0 removes it (forward returns pooled features)."""
        self.config = replace(self.config, num_classes=num_classes)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    # The public code's initialisation: truncated normal (std 0.02) for every linear and 2D
    # conv (the KAN spline included), unit/zero norms; the NA position bias keeps NATTEN's init.
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---- variants: the published depths and widths (MedViTV2 `MedViT.py`) ---------------------------
VARIANTS: dict[str, dict] = {
    "medvit_tiny": dict(depths=(2, 2, 6, 1), dims=(64, 128, 192, 384), drop_path_rate=0.1),
    "medvit_small": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), drop_path_rate=0.1),
    "medvit_base": dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), drop_path_rate=0.2),
    "medvit_large": dict(depths=(2, 2, 6, 2), dims=(96, 256, 512, 1024), drop_path_rate=0.2),
}
# Tests: the fewest blocks the layout allows, and GFP widths that keep an MHCA share (E-MHSA rounds to 32s).
TINY = dict(depths=(1, 1, 3, 1), dims=(32, 128, 128, 128), stem_channels=(16, 16, 32), num_classes=4)


# Trained in this project on BreastMNIST (card: data_cards/checkpoints/medvit.md); num_classes=2, in_chans=1.
_BREASTMNIST = Shipped("checkpoints/breastmnist/medvit_tiny_f16.safetensors")


_REGISTER = dict(
    family="medvit", config=MedViTConfig, input_kind="image_2d", tiny=TINY, feature_extractor=True, card=CARD
)


@register_model(defaults=VARIANTS["medvit_tiny"], pretrained={"breastmnist": _BREASTMNIST}, **_REGISTER)
def medvit_tiny(config: MedViTConfig) -> MedViT:
    """MedViT-V2-T: depths (2, 2, 6, 1), widths (64, 128, 192, 384).

    pretrained='breastmnist' (with num_classes=2, in_chans=1) loads the BreastMNIST checkpoint (28 px).
    """
    return MedViT(config)


@register_model(defaults=VARIANTS["medvit_small"], **_REGISTER)
def medvit_small(config: MedViTConfig) -> MedViT:
    """MedViT-V2-S: depths (2, 2, 6, 2), widths (64, 128, 256, 512)."""
    return MedViT(config)


@register_model(defaults=VARIANTS["medvit_base"], **_REGISTER)
def medvit_base(config: MedViTConfig) -> MedViT:
    """MedViT-V2-B: depths (2, 2, 6, 2), widths (96, 192, 384, 768)."""
    return MedViT(config)


@register_model(defaults=VARIANTS["medvit_large"], **_REGISTER)
def medvit_large(config: MedViTConfig) -> MedViT:
    """MedViT-V2-L: depths (2, 2, 6, 2), widths (96, 256, 512, 1024)."""
    return MedViT(config)


# ---- the public checkpoints' names -> ours ---------------------------------------------------------
_TOP_LEVEL = [(r"^stem\.(\d)\.(conv|norm)\.", r"stem.\1.\2."), (r"^norm\.", "head_norm."), (r"^proj_head\.0\.", "head.")]
_LOCAL = [
    (r"^patch_embed\.", "embed."),
    (r"^norm1\.", "attn_norm."),
    (r"^attn\.(qkv|proj)\.", r"attn.\1."),
    (r"^attn\.rpb$", "attn.rpb"),
    (r"^norm2\.", "ffn_norm."),
    (r"^conv\.conv\.0\.", "ffn.expand."),
    (r"^conv\.conv\.1\.", "ffn.expand_norm."),
    (r"^conv\.conv\.3\.", "ffn.depthwise."),
    (r"^conv\.conv\.4\.", "ffn.depthwise_norm."),
    (r"^conv\.conv\.6\.fc\.0\.", "ffn.se.reduce."),
    (r"^conv\.conv\.6\.fc\.2\.", "ffn.se.restore."),
    (r"^conv\.conv\.7\.", "ffn.project."),
    (r"^conv\.conv\.8\.", "ffn.project_norm."),
]
_GLOBAL = [
    (r"^patch_embed\.", "embed."),
    (r"^norm1\.", "mhsa_norm."),
    (r"^e_mhsa\.(q|k|v|proj)\.", r"mhsa.\1."),
    (r"^e_mhsa\.norm\.", "mhsa.reduce_norm."),
    (r"^projection\.", "mhca_embed."),
    (r"^mhca\.group_conv3x3\.", "mhca.group_conv."),
    (r"^mhca\.norm\.", "mhca.norm."),
    (r"^mhca\.projection\.", "mhca.proj."),
    (r"^norm2\.", "kan_norm."),
    (r"^kan\.layers\.(\d+)\.layernorm\.", r"kan.layers.\1.norm."),
    (r"^kan\.layers\.(\d+)\.rbf\.grid$", r"kan.layers.\1.basis.grid"),
    (r"^kan\.layers\.(\d+)\.spline_linear\.", r"kan.layers.\1.spline."),
]
# The public GFP builds a locality feed-forward (`conv`) that its forward never calls.
_GLOBAL_UNUSED = re.compile(r"^conv\.conv\.")


def convert_reference_state_dict(state: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Map a public MedViTV2 state dict (`features.N...` names) onto this implementation's names.

    GFP blocks are told apart from LFP blocks by their `e_mhsa` keys. The GFP's unused
    feed-forward weights are dropped (logged). Any other name that no rule matches raises
    CheckpointError listing them. Load the result into a model built with
    reference_code_compat=True to reproduce the public code's outputs.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel checkpoints
    global_blocks = {m.group(1) for k in state if (m := re.match(r"^features\.(\d+)\.e_mhsa\.", k))}
    converted, unmatched, dropped = {}, [], []
    for key, tensor in state.items():
        new_key = None
        block = re.match(r"^features\.(\d+)\.(.*)$", key)
        if block:
            index, rest = block.groups()
            if index in global_blocks and _GLOBAL_UNUSED.match(rest):
                dropped.append(key)
                continue
            for pattern, repl in _GLOBAL if index in global_blocks else _LOCAL:
                if re.match(pattern, rest):
                    new_key = f"blocks.{index}." + re.sub(pattern, repl, rest)
                    break
        else:
            for pattern, repl in _TOP_LEVEL:
                if re.match(pattern, key):
                    new_key = re.sub(pattern, repl, key)
                    break
        if new_key is None:
            unmatched.append(key)
        else:
            converted[new_key] = tensor
    if unmatched:
        raise CheckpointError(source, "names with no MedViT-V2 mapping", unexpected=unmatched)
    if dropped:
        log.info("%s: dropped %d unused GFP feed-forward tensors (never called by the public code)", source, len(dropped))
    return converted


def reference_config_from_state_dict(state: dict[str, Tensor]) -> dict:
    """Infer the variant name and num_classes of a public MedViTV2 state dict (converted names)."""
    num_classes = state["head.weight"].shape[0]
    widths = tuple(
        state[f"blocks.{i}.ffn_norm.weight"].shape[0] if f"blocks.{i}.ffn_norm.weight" in state
        else state[f"blocks.{i}.kan_norm.weight"].shape[0]
        for i in range(max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")) + 1)
    )
    dims = tuple(dict.fromkeys(widths))  # unique widths in order of appearance = stage widths
    depths = tuple(widths.count(d) for d in dims)
    for name, spec in VARIANTS.items():
        if tuple(spec["dims"]) == dims and tuple(spec["depths"]) == depths:
            return {"variant": name, "num_classes": num_classes, "in_chans": state["stem.0.conv.weight"].shape[1]}
    raise CheckpointError("checkpoint", f"widths {dims} and depths {depths} match no MedViT-V2 variant")


def read_reference_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Return the model state dict inside a public MedViTV2 `.pth` file (tensors only).

    The public training script saves `{'model': state_dict, 'optimizer': ..., ...}`; bare state
    dicts and DataParallel `module.` prefixes are accepted too. Only tensors are unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or code-carrying pickles
        # torch's own message advises turning its weights-only guard off, which would run code from the file: not relayed.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        at = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
        cause = None
        if at is not None:
            cause = lines[at].split("WeightsUnpickler error:", 1)[-1].strip() or (lines[at + 1] if at + 1 < len(lines) else "")
            cause = cause.split(". ")[0]  # the first sentence; torch's advice follows
        reason = (f"it holds objects other than tensors, or is corrupt ({cause or type(exc).__name__})"
                  if "weights_only" in str(exc) else (lines[0] if lines else type(exc).__name__))
        raise CheckpointError(path, f"not a tensors-only PyTorch checkpoint: {reason}; medai never unpickles "
                                    "code from a checkpoint") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(path, "no state dict of tensors found (expected the model's or {'model': ...})")
    return payload


@register_converter("medvit", reads="a MedViTV2 checkpoint released by the authors (.pth)")
def convert_medvit_checkpoint(source: str | Path, destination: str | Path) -> Converted:
    """Convert a public MedViTV2 `.pth` to safetensors; return the variant and create_model kwargs.

    Names are mapped by `convert_reference_state_dict`, the variant and head size are read from the
    shapes, and the result is loaded strictly into a model built with `reference_code_compat=True`
    before it is written, so a file that converts loads.
    """
    source, destination = Path(source), Path(destination)
    state = convert_reference_state_dict(read_reference_checkpoint(source), source=str(source))
    facts = reference_config_from_state_dict(state)
    kwargs = {"num_classes": facts["num_classes"], "in_chans": facts["in_chans"], "reference_code_compat": True}
    model = create_model(facts["variant"], **kwargs)
    load_state_strict(model, state, source)
    save_weights(model, destination, {"source": source.name, "variant": facts["variant"], "create_model_kwargs": kwargs})
    log.info("converted %s -> %s (%s, %d classes)", source, destination, facts["variant"], facts["num_classes"])
    return Converted(destination, facts["variant"], kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def public_code_parameter_count(model: MedViT) -> int:
    """Parameters the authors' MedViT.py would report for the same config (`sum(p.numel())`).

    It also builds, in each GFP block, a locality feed-forward that its forward never calls,
    and stores the KAN grids as frozen parameters; both are added to our trainable count.
    """
    extra = 0
    for block in model.blocks:
        if isinstance(block, GlobalFeaturePerception):
            dim = block.kan_norm.num_features
            unused = LocalityFeedForward(dim, 3, model.config.global_mlp_ratio, se_reduction=dim)
            extra += count_parameters(unused) + sum(layer.basis.grid.numel() for layer in block.kan.layers)
    return count_parameters(model) + extra


__all__ = [
    "MedViT", "MedViTConfig", "public_code_parameter_count", "convert_reference_state_dict", "count_parameters",
    "convert_medvit_checkpoint", "read_reference_checkpoint",
    "lfp_dilations", "stage_layout", "VARIANTS",
]
