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


_REGISTER = dict(family="dynunet", config=DynUNetConfig, card="data_cards/checkpoints/umamba_hippocampus.md")
TINY = dict(features=(4, 8, 8))  # the fewest stages MONAI allows; inputs divisible by 4


@register_model(defaults=dict(spatial_dims=3), input_kind="volume_3d", tiny=TINY, **_REGISTER)
def dynunet_3d(config: DynUNetConfig) -> nn.Module:
    """MONAI DynUNet 3D baseline; overrides are DynUNetConfig fields."""
    return build_dynunet(config)


@register_model(defaults=dict(spatial_dims=2), input_kind="image_2d", tiny=TINY, **_REGISTER)
def dynunet_2d(config: DynUNetConfig) -> nn.Module:
    """MONAI DynUNet 2D baseline; overrides are DynUNetConfig fields."""
    return build_dynunet(config)
