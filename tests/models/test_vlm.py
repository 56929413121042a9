"""medai's VLM head and the bring-your-own HF path, on tiny random models and real VQA-RAD images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from medai.errors import ModelContractError
from medai.io.vqa_rad import load_vqa_rad
from medai.models.vlm import (
    HFImageTextToText,
    MissingImageError,
    NonMedicalImageError,
    PromptTooLongError,
    UnsupportedLanguageError,
    VLMConfig,
    VLMInputError,
    VisionLanguageModel,
    VisualContrastiveDecoding,
    check_language,
    colourfulness,
)
from tests.models.tiny_vlms import smollm2_path, tiny_hf_vlm_paths, tiny_lm_path, tiny_vlm  # noqa: F401


@pytest.fixture(scope="module")
def vqa_items(vqa_rad_path):
    """Four real VQA-RAD test questions with their images."""
    items = load_vqa_rad(vqa_rad_path, "test")[:4]
    return items, [Image.open(it.image_path) for it in items]


def test_image_tokens_are_spliced_and_only_answers_are_supervised(tiny_vlm, vqa_items):
    items, images = vqa_items
    pixels = tiny_vlm.preprocess(images[:2])
    assert pixels.shape == (2, 3, 64, 64)
    tokens = tiny_vlm.encode_images(pixels)
    assert tokens.shape == (2, 4, tiny_vlm.language_model.config.hidden_size)
    batch = tiny_vlm.build_inputs(pixels, [it.question for it in items[:2]], ["yes", "no"])
    blind = tiny_vlm.build_inputs(None, [it.question for it in items[:2]], ["yes", "no"])
    assert batch["inputs_embeds"].shape[1] == blind["inputs_embeds"].shape[1] + 4  # the 4 image tokens
    supervised = (batch["labels"] != -100).sum(dim=1)
    assert supervised.tolist() == [2, 2]  # the answer word + end-of-turn, nothing of the prompt


def test_answer_span_loss_equals_the_full_sequence_loss(tiny_vlm, vqa_items):
    """The training loss reads logits only on the answer span; value and gradients must not change."""
    items, images = vqa_items
    pixels = tiny_vlm.preprocess(images[:3])
    questions = [it.question for it in items[:3]]
    answers = ["yes", "left lung upper lobe", "no"]  # answers of different lengths: rows end unevenly
    tiny_vlm.freeze_for_stage("align")
    tiny_vlm.language_model.float()
    reference = tiny_vlm.language_model(**tiny_vlm.build_inputs(pixels, questions, answers, padding_side="right"))
    reference.loss.backward()
    expected = {n: p.grad.clone() for n, p in tiny_vlm.named_parameters() if p.grad is not None}
    tiny_vlm.zero_grad(set_to_none=True)
    out = tiny_vlm(pixels, questions, answers)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in tiny_vlm.named_parameters() if p.grad is not None}
    tiny_vlm.zero_grad(set_to_none=True)
    assert out.logits.shape[1] < reference.logits.shape[1] // 2
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_align_stage_trains_only_the_projector(tiny_vlm, vqa_items):
    items, images = vqa_items
    tiny_vlm.freeze_for_stage("align")
    out = tiny_vlm(tiny_vlm.preprocess(images[:2]), [it.question for it in items[:2]], [it.answer for it in items[:2]])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n for n, p in tiny_vlm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("projector.") for n in grads)
    tiny_vlm.zero_grad(set_to_none=True)


def test_lora_stage_adds_trainable_adapters_only(tiny_lm_path):
    cfg = VLMConfig(backbone_pretrained=None, image_size=64, num_image_tokens=4, language_model=str(tiny_lm_path))
    model = VisionLanguageModel.from_config(cfg)
    model.apply_lora(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith("projector.") for n in trainable)
    saved = set(model.trainable_state_dict())
    assert {f"projector.{k}" for k in model.projector.state_dict()} <= saved
    lora_keys = saved - {f"projector.{k}" for k in model.projector.state_dict()}
    assert lora_keys and all("lora_" in k for k in lora_keys)


def test_a_training_backbone_keeps_its_batchnorm_statistics(tiny_lm_path, vqa_items):
    from torch import nn

    _, images = vqa_items
    cfg = VLMConfig(backbone_pretrained=None, image_size=64, num_image_tokens=4, language_model=str(tiny_lm_path))
    model = VisionLanguageModel.from_config(cfg)
    model.freeze_for_stage("instruct")
    model.train()
    assert not model.backbone.training  # frozen: all in eval
    model.backbone.requires_grad_(True)
    model.train()
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert model.backbone.training and norms and not any(m.training for m in norms)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running_" in k}
    tokens = model.encode_images(model.preprocess(images[:2]))
    tokens.sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items() if "running_" in k)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_generation_is_bounded_and_streams(tiny_vlm, vqa_items):
    items, images = vqa_items
    gens = tiny_vlm.generate_answers(images, [it.question for it in items], max_new_tokens=3)
    assert len(gens) == 4 and all(g.num_tokens <= 3 for g in gens)
    assert all(g.stopped_by in ("eos", "max_new_tokens") for g in gens)
    huge = tiny_vlm.answer(images[0], items[0].question, max_new_tokens=10**6, max_time_s=0.0)
    assert huge.stopped_by == "max_time" and huge.num_tokens <= 1
    pieces = list(tiny_vlm.stream(images[0], items[0].question, max_new_tokens=4))
    assert "".join(pieces).strip() == tiny_vlm.answer(images[0], items[0].question, max_new_tokens=4).text


def test_blank_noise_and_blind_modes_change_what_the_lm_sees(tiny_vlm, vqa_items):
    _, images = vqa_items
    pixels = tiny_vlm.preprocess(images[:1])
    blank, noise = tiny_vlm.substitute_images(pixels, "blank"), tiny_vlm.substitute_images(pixels, "noise")
    assert not torch.equal(blank, pixels) and not torch.equal(noise, pixels)
    assert torch.allclose(tiny_vlm.substitute_images(pixels, "blank"), blank)  # deterministic
    with pytest.raises(MissingImageError):
        tiny_vlm.generate_answers(None, ["is there a mass ?"])
    blind = tiny_vlm.generate_answers(None, ["is there a mass ?"], image_mode="none")
    assert blind[0].num_tokens <= tiny_vlm.config.max_new_tokens


def test_visual_contrastive_decoding_contrasts_and_cuts():
    scores = torch.tensor([[4.0, 3.9, -5.0]])
    contrast = torch.tensor([[4.0, 0.0, 10.0]])  # the noised image strongly prefers token 2
    vcd = VisualContrastiveDecoding(lambda new: contrast, alpha=1.0, beta=0.1)
    out = vcd(torch.zeros(1, 0, dtype=torch.long), scores)
    assert out.argmax().item() == 1  # token 1 is what the real image adds over the noised one
    assert out[0, 2] == float("-inf")  # implausible under the real image: never chosen


def test_vcd_generation_runs_on_the_head(tiny_vlm, vqa_items):
    items, images = vqa_items
    g = tiny_vlm.answer(images[0], items[0].question, mitigation="vcd", max_new_tokens=3)
    assert g.num_tokens <= 3


def test_bad_inputs_get_clear_messages(tiny_vlm, vqa_items):
    items, images = vqa_items
    with pytest.raises(MissingImageError, match="no image"):
        tiny_vlm.answer(None, items[0].question)
    rng = np.random.default_rng(0)
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[..., 0], photo[:32, :, 1], photo[:, 32:, 2] = 220, 180, 200  # saturated colour blocks
    photo += rng.integers(0, 30, photo.shape, dtype=np.uint8)
    assert colourfulness(Image.fromarray(photo)) > 25 > colourfulness(images[0].convert("RGB"))
    with pytest.raises(NonMedicalImageError, match="colour photograph"):
        tiny_vlm.answer(photo, items[0].question)
    with pytest.raises(PromptTooLongError, match="limit 128"):
        tiny_vlm.answer(images[0], "is there a mass " * 100)
    with pytest.raises(UnsupportedLanguageError):
        tiny_vlm.answer(images[0], "这张图片中有肿块吗？")
    with pytest.raises(UnsupportedLanguageError):
        tiny_vlm.answer(images[0], "¿Hay una masa en la imagen?")
    check_language("Is there a mass in the left lung?")
    with pytest.raises(VLMInputError, match="empty"):
        tiny_vlm.answer(images[0], "   ")


def test_a_token_sequence_backbone_keeps_the_contract(tiny_lm_path, vqa_items):
    """A ViT (B, N, C) backbone with a class token works like a CNN feature map."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    cfg = VLMConfig(backbone="vit_tiny_patch16_224", backbone_pretrained=None, image_size=64, num_image_tokens=4,
                    language_model=str(tiny_lm_path))
    model = VisionLanguageModel(cfg, vit, lm, AutoTokenizer.from_pretrained(tiny_lm_path)).eval()
    tokens = model.encode_images(model.preprocess(vqa_items[1][:1]))
    assert tokens.shape == (1, 4, 32)
    with pytest.raises(ModelContractError, match="lacks forward_features, num_features, reset_classifier"):
        VisionLanguageModel(cfg, torch.nn.Linear(2, 2), lm, AutoTokenizer.from_pretrained(tiny_lm_path))
    # a registered model that is no feature extractor is refused by name, before anything is built
    seg = VLMConfig(backbone="umamba_bot_2d", backbone_pretrained=None, language_model=str(tiny_lm_path))
    with pytest.raises(ModelContractError, match="'umamba_bot_2d': not a feature extractor"):
        VisionLanguageModel.from_config(seg)


@pytest.mark.parametrize("arch,image_tokens", [("llava", 16), ("gemma3", 4)])
def test_byo_hf_vlm_loads_offline_and_answers(tiny_hf_vlm_paths, vqa_items, monkeypatch, arch, image_tokens):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items, images = vqa_items
    model = HFImageTextToText.from_pretrained(tiny_hf_vlm_paths[arch], max_new_tokens=4)
    assert type(model.model).__name__.lower().startswith(arch)
    inputs = model._inputs(images[0], items[0].question)
    image_token_id = model.model.config.image_token_id
    assert (inputs["input_ids"] == image_token_id).sum().item() == image_tokens
    assert "pixel_values" in inputs
    answer = model.answer(images[0], items[0].question)
    assert 1 <= answer.num_tokens <= 4 and isinstance(answer.text, str)
    assert model.answer(images[0], items[0].question, mitigation="vcd").num_tokens <= 4
    assert "".join(model.stream(images[0], items[0].question)).strip() == answer.text
    with pytest.raises(MissingImageError):
        model.answer(None, items[0].question)


def test_byo_refuses_quantisation_without_cuda(tiny_hf_vlm_paths):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: 4-bit would load")
    with pytest.raises(VLMInputError, match="CUDA"):
        HFImageTextToText.from_pretrained(tiny_hf_vlm_paths["llava"], quantization="4bit")


@pytest.mark.slow  # loads the 135M LM (about 10 s idle, far more on a busy 2-core box)
def test_real_smollm2_head_answers_a_real_question(smollm2_path, vqa_items):
    """The default head (ImageNet Lite0 + SmolLM2-135M-Instruct, untrained projector) answers, bounded."""
    from medai.models import create_model

    items, images = vqa_items
    model = create_model("vlm_lite0_smollm2", max_new_tokens=8).eval()
    g = model.answer(images[0], items[0].question)
    assert 1 <= g.num_tokens <= 8 and g.text
    assert os.path.samefile(model.language_model.name_or_path, smollm2_path)


@pytest.mark.slow  # real 135M LM, two generations
def test_no_cache_reference_matches_cached_generation(smollm2_path, vqa_items):
    """The no-KV-cache loop (benchmark baseline) produces exactly the cached greedy answers, left-padded batch."""
    from medai.models import create_model

    items, images = vqa_items
    model = create_model("vlm_lite0_smollm2").eval()
    questions = [it.question for it in items[:2]]
    # A generous time bound: on a loaded 2-core box the default 30 s can end a generation early.
    cached = model.generate_answers(images[:2], questions, max_new_tokens=6, use_cache=True, max_time_s=600)
    uncached = model.generate_answers(images[:2], questions, max_new_tokens=6, use_cache=False, max_time_s=600)
    assert all(g.stopped_by != "max_time" for g in cached + uncached)
    assert [g.text for g in cached] == [g.text for g in uncached]


def test_no_cache_loop_sees_the_whole_prompt(tiny_vlm, vqa_items):
    """Every step of the no-cache loop re-reads the full prefix (transformers' own path drops it)."""
    items, images = vqa_items
    lengths = []
    original = tiny_vlm.language_model.forward

    def spy(*args, **kwargs):
        lengths.append(kwargs["inputs_embeds"].shape[1])
        return original(*args, **kwargs)

    tiny_vlm.language_model.forward = spy
    try:
        tiny_vlm.answer(images[0], items[0].question, max_new_tokens=3, use_cache=False)
    finally:
        del tiny_vlm.language_model.forward
    assert len(lengths) >= 2 and lengths == list(range(lengths[0], lengths[0] + len(lengths)))


def test_medvit_backbone_by_registry_name(tiny_lm_path, vqa_items):
    """MedViT-V2 (issue 7) plugs in by name through the same forward_features contract."""
    cfg = VLMConfig(backbone="medvit_tiny", backbone_pretrained=None, image_size=64, num_image_tokens=4,
                    language_model=str(tiny_lm_path), max_new_tokens=2)
    model = VisionLanguageModel.from_config(cfg).eval()
    tokens = model.encode_images(model.preprocess(vqa_items[1][:1]))
    assert tokens.shape == (1, 4, 32)
    assert model.answer(vqa_items[1][0], vqa_items[0][0].question).num_tokens <= 2


def test_untrained_head_knows_it_until_trained_weights_are_loaded(tiny_lm_path, tmp_path):
    from medai.models.registry import load_weights, save_weights
    from medai.models.vlm import VLMConfig, VisionLanguageModel

    cfg = VLMConfig(backbone_pretrained=None, image_size=64, num_image_tokens=4, language_model=str(tiny_lm_path),
                    max_new_tokens=6, max_prompt_tokens=128)
    head = VisionLanguageModel.from_config(cfg)
    assert head.untrained_parts == ["projector"]
    path = save_weights(head, tmp_path / "head.safetensors")
    fresh = load_weights(VisionLanguageModel.from_config(cfg), path)
    assert fresh.untrained_parts == [] and fresh.weights_source == str(path)


def test_vlm_ask_refuses_an_untrained_head_and_bad_images_before_answering(vqa_rad_path, tmp_path):
    """A first try with the registry's head: refused, naming the untrained projector; tiny/blank images refused first."""
    from typer.testing import CliRunner

    from medai.cli import app

    image = next((vqa_rad_path / "images").glob("*.jpg"))
    runner = CliRunner()
    refused = runner.invoke(app, ["vlm", "ask", str(image), "Is there a pneumothorax?"], env={"COLUMNS": "300"})
    assert refused.exit_code == 2 and "projector was never trained" in refused.output, refused.output
    assert "pneumothorax" not in refused.output.lower().split("never trained")[0]
    Image.new("L", (1, 1)).save(tmp_path / "dot.png")
    Image.new("L", (64, 64)).save(tmp_path / "black.png")
    (tmp_path / "notes.png").write_text("not an image")
    for bad, reason in (("dot.png", "too small"), ("black.png", "uniform"), ("notes.png", "not an image")):
        out = runner.invoke(app, ["vlm", "ask", str(tmp_path / bad), "Is there a mass?"], env={"COLUMNS": "300"})
        assert out.exit_code == 2 and reason in out.output, (bad, out.output)
