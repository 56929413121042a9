"""U-Mamba-Bot/-Enc (2D, 3D) and the DynUNet baseline: every parameter trains, Mamba placement, scans, options."""

from __future__ import annotations

import pytest
import torch

from medai.errors import ConfigError
from medai.models import create_model, list_models
from medai.models.umamba import MambaLayer, UMambaConfig

TINY = dict(features=(4, 8, 8))  # 2 downsamplings: inputs divisible by 4
SEG_MODELS = ["umamba_bot_2d", "umamba_enc_2d", "umamba_bot_3d", "umamba_enc_3d", "dynunet_2d", "dynunet_3d"]


def test_all_variants_are_registered():
    assert set(SEG_MODELS) <= set(list_models("umamba_*") + list_models("dynunet_*"))


@pytest.mark.parametrize("name", SEG_MODELS)
def test_forward_backward_on_cpu(name):
    torch.manual_seed(0)
    model = create_model(name, out_channels=3, **TINY)
    shape = (2, 1, 12, 16) if name.endswith("2d") else (1, 1, 8, 12, 8)
    x = torch.randn(shape)
    out = model(x)
    assert out.shape == (shape[0], 3, *shape[2:])
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    mamba_grads = [p.grad.abs().sum() for n, p in model.named_parameters() if "A_log" in n]
    assert ("umamba" not in name) == (not mamba_grads)
    assert all(g > 0 for g in mamba_grads)  # the Mamba path is in the graph


def test_enc_has_mamba_in_every_stage_and_bot_only_at_the_bottleneck():
    bot = create_model("umamba_bot_3d", **TINY)
    enc = create_model("umamba_enc_3d", **TINY)
    layers = lambda m: [i for i, s in enumerate(m.stages) if any(isinstance(b, MambaLayer) for b in s)]  # noqa: E731
    assert layers(bot) == [2]
    assert layers(enc) == [0, 1, 2]


@pytest.mark.parametrize("directions", [("forward", "reverse"), ("forward", "reverse", "inter_slice")])
def test_multi_direction_scans(directions):
    torch.manual_seed(0)
    model = create_model("umamba_bot_3d", scan_directions=directions, **TINY)
    layer = model.stages[-1][-1]
    assert len(layer.mixers) == len(directions)
    x = torch.randn(1, 8, 2, 3, 2)
    # Reverse / inter-slice scans see tokens a forward causal scan cannot: the first token's
    # output changes when the last token changes, which no forward-only layer allows.
    y1 = layer(x)
    x2 = x.clone()
    x2[..., -1, -1, -1] += torch.randn(8)  # not a constant: LayerNorm over channels would remove it
    assert not torch.allclose(y1[..., 0, 0, 0], layer(x2)[..., 0, 0, 0])
    forward_only = MambaLayer(8, UMambaConfig(features=(4, 8), mamba_stages=(1,)))
    assert torch.allclose(forward_only(x)[..., 0, 0, 0], forward_only(x2)[..., 0, 0, 0])


def test_mamba_layer_stays_fp32_under_autocast():
    layer = MambaLayer(8, UMambaConfig(features=(4, 8), mamba_stages=(1,)))
    x = torch.randn(1, 8, 2, 3, 2)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(
    "kwargs,shape,message",
    [
        (dict(), (1, 1, 9, 12, 8), "divisible by 4"),
        (dict(), (1, 2, 8, 12, 8), "expects"),
        (dict(), (1, 1, 8, 12), "expects"),
    ],
)
def test_bad_input_is_named(kwargs, shape, message):
    model = create_model("umamba_bot_3d", **TINY, **kwargs)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(shape))


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="key 'feature': unknown key"):
        create_model("umamba_bot_3d", feature=(4, 8))
    with pytest.raises(ConfigError, match="mamba_placement"):
        create_model("umamba_bot_3d", mamba_placement="decoder")
    with pytest.raises(ValueError, match="scan_directions"):
        create_model("umamba_bot_3d", scan_directions=("sideways",))
    with pytest.raises(ValueError, match="mamba_stages"):
        create_model("umamba_bot_3d", features=(4, 8), mamba_stages=(5,))


def test_shipped_hippocampus_checkpoint_segments_validation_volumes(msd_hippocampus_path):
    from medai.io.datasets.volumes import case_records, read_split
    from medai.pipelines.segmentation import evaluate_segmentation

    model = create_model("umamba_bot_3d", pretrained="msd_hippocampus", features=(16, 32, 64, 128))
    val = read_split("configs/splits/msd_task04_hippocampus.json")["val"]
    records = case_records(msd_hippocampus_path, val[:2])  # cases the checkpoint never trained on
    result = evaluate_segmentation(model, records, (32, 48, 32), progress=False)
    for label in ("anterior", "posterior"):
        assert result["summary"][f"dice_{label}"]["value"] > 0.75, result["per_case"]
