"""The packaged ImageNet EfficientNet-Lite0 weights, converted and checked on real photos."""

import pytest
import torch
import torch.nn.functional as F

from medai.models import create_model
from medai.models.efficientnet import IMAGENET_LITE_MEAN, IMAGENET_LITE_STD

skimage_data = pytest.importorskip("skimage.data")


def _prepare(image) -> torch.Tensor:
    x = torch.tensor(image).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor(IMAGENET_LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_LITE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def imagenet_lite0():
    return create_model("efficientnet_lite0", pretrained="imagenet").eval()


def test_imagenet_weights_recognise_real_photos(imagenet_lite0):
    with torch.no_grad():
        cat = imagenet_lite0(_prepare(skimage_data.chelsea())).softmax(-1)
        coffee = imagenet_lite0(_prepare(skimage_data.coffee())).softmax(-1)
    # ImageNet classes 281-285 are domestic cats; 967 is espresso.
    assert cat.argmax().item() in range(281, 286)
    assert coffee.argmax().item() == 967


def test_pretrained_adapts_to_new_head_and_grayscale():
    model = create_model("efficientnet_lite0", pretrained="imagenet", num_classes=2, in_chans=1)
    reference = create_model("efficientnet_lite0", pretrained="imagenet")
    own, ref = model.state_dict(), reference.state_dict()
    assert torch.equal(own["blocks.0.0.conv_dw.weight"], ref["blocks.0.0.conv_dw.weight"])
    # Grayscale stem = sum over RGB filters (timm's adapt_input_conv).
    assert torch.allclose(own["conv_stem.weight"], ref["conv_stem.weight"].sum(1, keepdim=True))
    assert own["classifier.weight"].shape == (2, 1280)
