"""MONAI DynUNet (nnU-Net's residual U-Net) as the baseline for the Mamba U-Nets.

Same stages, widths, strides, residual blocks and norm as `models/umamba.py` with no Mamba
layer, so a comparison under one training recipe isolates what Mamba adds.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from medai.models.registry import register_model


@dataclass
class DynUNetConfig:
    """DynUNet hyper-parameters matching UMambaConfig's defaults (4 stages, stride 2 after the first)."""

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 3
    features: tuple[int, ...] = (32, 64, 128, 256)
    norm: str = "instance"

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"DynUNetConfig.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.features) < 3:  # MONAI's DynUNet needs >= 3 stages
            raise ValueError(f"DynUNetConfig.features needs at least 3 stages, got {self.features}")


def build_dynunet(config: DynUNetConfig) -> nn.Module:
    """Return MONAI's DynUNet (residual blocks, no deep supervision) for `config`."""
    from monai.networks.nets import DynUNet

    stages = len(config.features)
    strides = [1] + [2] * (stages - 1)
    return DynUNet(
        spatial_dims=config.spatial_dims,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        kernel_size=[3] * stages,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(config.features),
        norm_name=config.norm,
        res_block=True,
    )


def _build(spatial_dims: int, overrides: dict) -> nn.Module:
    known = set(DynUNetConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown DynUNet option(s) {unknown} (known: {', '.join(sorted(known))})")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return build_dynunet(DynUNetConfig(**{"spatial_dims": spatial_dims, **values}))


@register_model(family="dynunet", card="data_cards/checkpoints/umamba_hippocampus.md")
def dynunet_3d(**overrides) -> nn.Module:
    """MONAI DynUNet 3D baseline; overrides are DynUNetConfig fields."""
    return _build(3, overrides)


@register_model(family="dynunet", card="data_cards/checkpoints/umamba_hippocampus.md")
def dynunet_2d(**overrides) -> nn.Module:
    """MONAI DynUNet 2D baseline; overrides are DynUNetConfig fields."""
    return _build(2, overrides)
