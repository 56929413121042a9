"""U-Mamba (Ma, Li & Wang 2024): residual U-Nets with Mamba layers over flattened image tokens.

- **U-Mamba-Bot**: a Mamba layer at the bottleneck of a residual U-Net encoder.
- **U-Mamba-Enc**: a Mamba layer after every encoder stage.

Both in 2D and 3D, built from MONAI's `UnetResBlock` (encoder), `UnetrUpBlock` (transposed conv,
skip concat, residual block) and `UnetOutBlock`. A Mamba layer flattens (B, C, *spatial) to
(B, L, C) tokens, applies LayerNorm and one Mamba mixer per scan direction, and adds the result
back (pre-norm residual). Scan directions, as an option beyond the paper's single forward scan:
`forward` (raster order), `reverse` (the same order backwards) and `inter_slice` (the first
spatial axis varies fastest, so the scan runs across slices at each in-plane position),
following SegMamba's tri-orientated Mamba; each direction has its own mixer and their outputs
are averaged. The scan runs in fp32 with autocast off, as U-Mamba's code does, because half
precision inside the recurrence gives NaNs.

The MONAI DynUNet baseline with the same stages and recipe is `models/dynunet.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medai.models.layers.mamba import MambaConfig, MambaMixer
from medai.models.pretrained import Shipped
from medai.models.registry import register_model

Direction = Literal["forward", "reverse", "inter_slice"]


@dataclass
class UMambaConfig:
    """U-Mamba hyper-parameters; defaults follow nnU-Net's 3D plan for small MR crops (4 stages)."""

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 3
    features: tuple[int, ...] = (32, 64, 128, 256)
    blocks_per_stage: int = 1  # residual blocks per encoder stage (the first one strides)
    # Mamba after the last encoder stage (U-Mamba-Bot) or after every one (U-Mamba-Enc) ...
    mamba_placement: Literal["bottleneck", "encoder"] = "bottleneck"
    mamba_stages: tuple[int, ...] | None = None  # ... or after these encoder stages
    scan_directions: tuple[Direction, ...] = ("forward",)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    norm: str = "instance"

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"UMambaConfig.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.features) < 2:
            raise ValueError(f"UMambaConfig.features needs at least 2 stages, got {self.features}")
        bad = [s for s in self.mamba_stages or () if not 0 <= s < len(self.features)]
        if bad:
            raise ValueError(f"UMambaConfig.mamba_stages {bad} outside 0..{len(self.features) - 1}")
        unknown = [d for d in self.scan_directions if d not in ("forward", "reverse", "inter_slice")]
        if unknown or not self.scan_directions:
            raise ValueError(f"UMambaConfig.scan_directions must be from forward/reverse/inter_slice, got {unknown}")

    @property
    def mamba_stage_indices(self) -> tuple[int, ...]:
        """Encoder stages followed by a Mamba layer: `mamba_stages` if given, else from the placement."""
        if self.mamba_stages is not None:
            return self.mamba_stages
        last = len(self.features) - 1
        return (last,) if self.mamba_placement == "bottleneck" else tuple(range(last + 1))

    @property
    def downsampling(self) -> int:
        """Factor by which every spatial size must be divisible (2 per stage after the first)."""
        return 2 ** (len(self.features) - 1)


class MambaLayer(nn.Module):
    """LayerNorm + Mamba over the flattened spatial tokens of (B, C, *spatial), pre-norm residual."""

    def __init__(self, channels: int, config: UMambaConfig):
        super().__init__()
        self.spatial_dims = config.spatial_dims
        self.directions = tuple(config.scan_directions)
        self.norm = nn.LayerNorm(channels)
        mixer_config = MambaConfig(d_model=channels, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand)
        self.mixers = nn.ModuleList(MambaMixer(mixer_config) for _ in self.directions)  # one per direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x + mean over directions of Mamba(LayerNorm(tokens)), same shape as x."""
        dtype = x.dtype
        # Mixed precision stays off in the Mamba path (U-Mamba found NaNs otherwise).
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B, L, C), raster order
            mixed = 0
            for direction, mixer in zip(self.directions, self.mixers):
                mixed = mixed + self._scan(mixer, tokens, direction, x.shape[2:])
            mixed = mixed / len(self.mixers)
            out = x + mixed.transpose(1, 2).reshape(x.shape)
        return out.to(dtype)

    @staticmethod
    def _scan(mixer: MambaMixer, tokens: torch.Tensor, direction: str, spatial: torch.Size) -> torch.Tensor:
        if direction == "forward":
            return mixer(tokens)
        if direction == "reverse":
            return mixer(tokens.flip(1)).flip(1)
        # inter_slice: move the first spatial axis to the end so it varies fastest, scan, move back.
        grid = tokens.unflatten(1, tuple(spatial))  # (B, S0, S1[, S2], C)
        order = (0, *range(2, grid.dim() - 1), 1, grid.dim() - 1)
        moved = grid.permute(order)
        mixed = mixer(moved.flatten(1, -2)).reshape(moved.shape)
        inverse = [order.index(i) for i in range(len(order))]
        return mixed.permute(inverse).flatten(1, -2)


class UMamba(nn.Module):
    """Residual U-Net (MONAI blocks) with Mamba layers after the configured encoder stages."""

    def __init__(self, config: UMambaConfig):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetResBlock, UnetrUpBlock

        self.config = config
        dims, feats = config.spatial_dims, config.features
        self.stages = nn.ModuleList()
        channels = config.in_channels
        for index, width in enumerate(feats):
            blocks = [UnetResBlock(dims, channels, width, 3, 1 if index == 0 else 2, config.norm)]
            blocks += [UnetResBlock(dims, width, width, 3, 1, config.norm) for _ in range(config.blocks_per_stage - 1)]
            if index in config.mamba_stage_indices:
                blocks.append(MambaLayer(width, config))
            self.stages.append(nn.Sequential(*blocks))
            channels = width
        self.decoder = nn.ModuleList(
            UnetrUpBlock(dims, feats[i + 1], feats[i], 3, 2, config.norm, res_block=True)
            for i in reversed(range(len(feats) - 1))
        )
        self.head = UnetOutBlock(dims, feats[0], config.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (B, out_channels, *spatial) for x (B, in_channels, *spatial)."""
        spatial = x.shape[2:]
        if x.dim() != self.config.spatial_dims + 2 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"UMamba expects (B, {self.config.in_channels}, {self.config.spatial_dims} spatial dims), "
                f"got {tuple(x.shape)}"
            )
        factor = self.config.downsampling
        if any(s % factor for s in spatial):
            raise ValueError(f"UMamba: spatial size {tuple(spatial)} must be divisible by {factor}")
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)


# Trained in this project (card: data_cards/checkpoints/umamba_hippocampus.md); needs features=(16, 32, 64, 128).
_HIPPOCAMPUS = Shipped("checkpoints/msd_hippocampus/umamba_bot_3d_f16.safetensors")


_REGISTER = dict(family="umamba", config=UMambaConfig, card="data_cards/checkpoints/umamba_hippocampus.md")
TINY = dict(features=(4, 8, 8))  # 2 downsamplings: inputs divisible by 4


@register_model(
    defaults=dict(spatial_dims=3, mamba_placement="bottleneck"), input_kind="volume_3d", tiny=TINY,
    pretrained={"msd_hippocampus": _HIPPOCAMPUS}, **_REGISTER,
)
def umamba_bot_3d(config: UMambaConfig) -> UMamba:
    """U-Mamba-Bot 3D: Mamba at the bottleneck; overrides are UMambaConfig fields.

    pretrained='msd_hippocampus' (with features=(16, 32, 64, 128)) loads the Task04 checkpoint.
    """
    return UMamba(config)


@register_model(
    defaults=dict(spatial_dims=3, mamba_placement="encoder"), input_kind="volume_3d", tiny=TINY, **_REGISTER
)
def umamba_enc_3d(config: UMambaConfig) -> UMamba:
    """U-Mamba-Enc 3D: Mamba after every encoder stage; overrides are UMambaConfig fields."""
    return UMamba(config)


@register_model(
    defaults=dict(spatial_dims=2, mamba_placement="bottleneck"), input_kind="image_2d", tiny=TINY, **_REGISTER
)
def umamba_bot_2d(config: UMambaConfig) -> UMamba:
    """U-Mamba-Bot 2D (slices); overrides are UMambaConfig fields."""
    return UMamba(config)


@register_model(
    defaults=dict(spatial_dims=2, mamba_placement="encoder"), input_kind="image_2d", tiny=TINY, **_REGISTER
)
def umamba_enc_2d(config: UMambaConfig) -> UMamba:
    """U-Mamba-Enc 2D (slices); overrides are UMambaConfig fields."""
    return UMamba(config)
