"""`medai models convert FAMILY SRC DST`: one command over the converters registered in the model files."""

import torch
from typer.testing import CliRunner

from medai.cli import app
from medai.models import create_model
from medai.models.pretrained import checkpoint_converters


def test_every_authors_format_has_a_registered_converter():
    assert {"medvit", "acmil", "efficientnet_lite0"} <= set(checkpoint_converters())


def test_convert_acmil_writes_safetensors_and_says_how_to_load_them(acmil_bracs_checkpoints_path, tmp_path):
    src = acmil_bracs_checkpoints_path / "acmil_bracs_384d" / "checkpoint-best.pth"
    dest = tmp_path / "acmil_384d.safetensors"
    result = CliRunner().invoke(app, ["models", "convert", "acmil", str(src), str(dest)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert dest.is_file() and "create_model('acmil'" in result.output and "num_branches=5" in result.output
    model = create_model("acmil", pretrained=dest, in_features=384, hidden_features=128, attention_features=128,
                         num_branches=5, num_classes=3).eval()
    reference = create_model("acmil_bracs_384d", pretrained=dest).eval()
    x = torch.rand(31, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], reference(x)["logits"])


def test_unknown_family_is_a_usage_error_naming_the_known_ones(tmp_path):
    source = tmp_path / "a.pth"
    torch.save({"w": torch.zeros(1)}, source)
    result = CliRunner().invoke(app, ["models", "convert", "vgg", str(source), str(tmp_path / "b.safetensors")],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "medvit" in result.output and "acmil" in result.output
