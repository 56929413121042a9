"""ResNets from timm (random init), the usual small-CNN baseline for MedMNIST-sized images.

For 28x28 inputs the stem's stride and max-pool would leave a 1x1 map after two stages, so
`small_input=True` swaps in a 3x3 stride-1 stem without pooling, as MedMNIST's ResNet baselines
do at 28 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
from torch import nn

from medai.models.registry import register_model


@dataclass
class ResNetConfig:
    """ResNet options; small_input swaps in the 28-64 px stem (3x3 stride-2 conv, no max-pool)."""

    num_classes: int = 2
    in_chans: int = 3
    small_input: bool = True
    drop_rate: float = 0.0


def _resnet(arch: str, config: ResNetConfig) -> nn.Module:
    model = timm.create_model(
        arch, pretrained=False, num_classes=config.num_classes, in_chans=config.in_chans, drop_rate=config.drop_rate
    )
    if config.small_input:
        out = model.conv1.out_channels if isinstance(model.conv1, nn.Conv2d) else model.bn1.num_features
        model.conv1 = nn.Conv2d(config.in_chans, out, kernel_size=3, stride=2, padding=1, bias=False)
        model.bn1 = nn.BatchNorm2d(out)
        model.maxpool = nn.Identity()
    return model


_REGISTER = dict(
    family="resnet", config=ResNetConfig, input_kind="image_2d", tiny={}, feature_extractor=True,
    card="data_cards/checkpoints/resnet_random_init.md",
)


@register_model(**_REGISTER)
def resnet18(config: ResNetConfig) -> nn.Module:
    """ResNet-18 (11M params), random init; small_input adapts the stem to 28-64 px images."""
    return _resnet("resnet18", config)


@register_model(**_REGISTER)
def resnet10t(config: ResNetConfig) -> nn.Module:
    """ResNet-10-T (4.9M params), random init; a fast CNN for CPU runs and tests."""
    return _resnet("resnet10t", config)
