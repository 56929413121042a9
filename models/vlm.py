"""medai's vision-language head (LLaVA-style) and the bring-your-own Hugging Face VLM path.

Own head: image -> any registered vision backbone -> pooled feature grid -> projector (MLP)
-> `num_image_tokens` embeddings spliced into a causal LM's input embeddings where the chat
prompt holds the `<image>` placeholder. The LM is any `AutoModelForCausalLM` folder with its
tokenizer (default: SmolLM2-135M-Instruct, unpacked by `medai.models.pretrained`).

Backbone feature-extraction contract (timm's, `registry.FEATURE_CONTRACT`): the module has
`forward_features(x)` returning either a feature map (B, C, H, W) or a token sequence (B, N, C)
(`num_prefix_tokens` class tokens first, as timm ViTs say), `num_features` = C and
`reset_classifier`. Any registered model whose entry declares the contract (EfficientNet-Lite0,
the ResNets, MedViT-V2 variants; `registry.list_feature_extractors()`) can be the backbone.

Bring your own: `HFImageTextToText` runs any local `AutoModelForImageTextToText` checkpoint
(MedGemma, LLaVA-Med conversions, ...) with its `AutoProcessor`, 4/8-bit when bitsandbytes and
CUDA are present. Both answer through `answer()` / `stream()` and return `Generation`s.

Generation is always bounded by `max_new_tokens` (capped at `MAX_NEW_TOKENS_LIMIT`) and by
wall-clock `max_time_s`. Visual contrastive decoding (Leng et al., CVPR 2024, "VCD") is the
switchable, training-free hallucination mitigation: next-token logits are contrasted with
those given a diffusion-noised image, under an adaptive plausibility cut-off.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from medai.errors import MedaiError, OptionalDependencyError
from medai.models.registry import check_feature_extractor, create_feature_extractor, create_model, register_model

if TYPE_CHECKING:
    from PIL import Image as PILImage

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
MAX_NEW_TOKENS_LIMIT = 1024  # hard ceiling whatever a caller asks for
ImageMode = Literal["image", "blank", "noise", "none"]
DEFAULT_SYSTEM_PROMPT = (
    "You are a radiology assistant. Answer the question about the image briefly. "
    "Answer yes/no questions with yes or no."
)


# ---------------------------------------------------------------------------------------------
# Errors: raised where a request enters, so the demo and batch jobs can show or record them.


class VLMInputError(MedaiError, ValueError):
    """A request to a vision-language model cannot be answered as given; says why."""


class MissingImageError(VLMInputError):
    """No image was given to a question that needs one."""


class NonMedicalImageError(VLMInputError):
    """The image does not look like a radiology image (heuristic; see `check_medical_image`)."""


class PromptTooLongError(VLMInputError):
    """The prompt has more tokens than the model accepts."""


class UnsupportedLanguageError(VLMInputError):
    """The question is not in a language the language model was trained on (English)."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ProjectorConfig:
    """Vision-to-text projector: 'mlp' is LLaVA-1.5's mlp2x_gelu at depth 2; 'linear' is LLaVA-1."""

    kind: Literal["mlp", "linear"] = "mlp"
    depth: int = 2
    hidden_dim: int | None = None  # None: the LM's hidden size
    dropout: float = 0.0


@dataclass
class VLMConfig:
    """medai VLM head: backbone name, projector, language model folder and generation bounds."""

    backbone: str = "efficientnet_lite0"
    backbone_pretrained: str | None = "imagenet"  # tag or safetensors path; None = random
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    num_image_tokens: int = 16  # feature grid pooled to sqrt(n) x sqrt(n) tokens
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language_model: str = "smollm2-135m-instruct"  # packaged key (medai.models.pretrained) or a local folder
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_prompt_tokens: int = 384
    max_new_tokens: int = 64
    max_time_s: float = 30.0
    check_image: bool = True  # refuse colour photographs (see check_medical_image)
    check_language: bool = True


@dataclass
class Generation:
    """One generated answer: text, token count, seconds, and why it stopped."""

    text: str
    num_tokens: int
    seconds: float
    stopped_by: Literal["eos", "max_new_tokens", "max_time"]
    time_to_first_token_s: float | None = None


# ---------------------------------------------------------------------------------------------
# Input checks (shared by the own head and the BYO path)


def to_pil(image: Any, source: str = "image") -> "PILImage.Image":
    """Return an RGB PIL image from a PIL image or a 2-D/3-D array; raise MissingImageError on None."""
    from PIL import Image

    if image is None:
        raise MissingImageError(f"{source}: no image given; this model answers questions about an image")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise VLMInputError(f"{source}: expected a 2-D or 3-channel image array, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32)
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0  # window to full range
            arr = np.nan_to_num(arr).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    raise VLMInputError(f"{source}: unsupported image type {type(image).__name__}")


def colourfulness(image: "PILImage.Image") -> float:
    """Return Hasler & Suesstrunk's colourfulness (0 for grey images, > 40 for vivid photos)."""
    arr = np.asarray(image.convert("RGB").resize((128, 128)), dtype=np.float32)
    rg = arr[..., 0] - arr[..., 1]
    yb = 0.5 * (arr[..., 0] + arr[..., 1]) - arr[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def check_medical_image(image: "PILImage.Image", source: str = "image", max_colourfulness: float = 25.0) -> None:
    """Raise NonMedicalImageError for colour photographs: radiology images are (near) grey.

    A heuristic only: CT/MR/X-ray/ultrasound exports are grey or carry small colour overlays
    (colourfulness well under 25); a natural photograph scores 30-100. H&E pathology is
    colourful too and is not what this head was built for.
    """
    score = colourfulness(image)
    if score > max_colourfulness:
        raise NonMedicalImageError(
            f"{source}: looks like a colour photograph (colourfulness {score:.0f} > {max_colourfulness:.0f}), "
            "not a radiology image; this head answers about CT, MR, X-ray and ultrasound images"
        )


_ENGLISH = set("the is are a an of in on this there what which where how does do was any image show seen".split())
_FOREIGN = set(
    "el la los las es est une des der die das ist und le les del que qué cuál où il y a sind non una una est-ce "
    "imagen image? bild imagem está hay gibt".split()
)


def check_language(text: str, source: str = "question") -> None:
    """Raise UnsupportedLanguageError unless `text` looks like English (script + function words)."""
    letters = [c for c in text if c.isalpha()]
    if letters and sum(c.isascii() for c in letters) / len(letters) < 0.9:
        raise UnsupportedLanguageError(
            f"{source}: non-Latin script detected; the language model was trained on English only, ask in English"
        )
    words = re.findall(r"[\w'?-]+", text.lower())
    english, foreign = sum(w in _ENGLISH for w in words), sum(w in _FOREIGN for w in words)
    if foreign > english:
        raise UnsupportedLanguageError(
            f"{source}: does not look like English ({foreign} non-English function words); ask in English"
        )


def square_image_tensor(image: Any, size: int, check: bool = True, source: str = "image") -> torch.Tensor:
    """Return a (3, size, size) float tensor in [0, 1]: black-padded to square (keeps aspect), resized."""
    from PIL import Image

    pil = to_pil(image, source=source)
    if check:
        check_medical_image(pil, source=source)
    side = max(pil.size)
    square = Image.new("RGB", (side, side))
    square.paste(pil, ((side - pil.width) // 2, (side - pil.height) // 2))
    arr = np.asarray(square.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _bounded_tokens(requested: int | None, default: int) -> int:
    n = default if requested is None else int(requested)
    if n < 1:
        raise VLMInputError(f"max_new_tokens must be at least 1, got {n}")
    return min(n, MAX_NEW_TOKENS_LIMIT)


# ---------------------------------------------------------------------------------------------
# Hallucination mitigation: visual contrastive decoding


def diffusion_noise(pixel_values: torch.Tensor, step: int = 500, num_steps: int = 1000, seed: int = 0) -> torch.Tensor:
    """Return images noised as DDPM's forward process at `step` (linear betas 1e-4..0.02), as VCD does."""
    betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[min(step, num_steps - 1)].item()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(pixel_values.shape, generator=gen, dtype=torch.float32).to(pixel_values)
    return math.sqrt(alpha_bar) * pixel_values + math.sqrt(1 - alpha_bar) * noise


class VisualContrastiveDecoding:
    """Logits processor: (1 + alpha) * l(y | image) - alpha * l(y | noised image), plausibility-cut.

    `contrast_step(new_token_ids)` returns the contrast branch's next-token logits; it keeps its
    own KV cache, fed the tokens the main branch generated. Tokens whose probability under the
    real image is below `beta` times the best token's are never chosen (VCD's adaptive cut-off).
    """

    def __init__(self, contrast_step: Callable[[torch.Tensor], torch.Tensor], alpha: float = 1.0, beta: float = 0.1):
        self.contrast_step, self.alpha, self.beta = contrast_step, alpha, beta
        self._offset: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._offset is None:
            self._offset = input_ids.shape[1]  # the prompt part (0 when generating from embeddings)
            contrast = self.contrast_step(None)
        else:
            contrast = self.contrast_step(input_ids[:, -1:])
        contrast = contrast.to(scores.dtype)
        log_probs = torch.log_softmax(scores, dim=-1)
        cutoff = log_probs.max(dim=-1, keepdim=True).values + math.log(self.beta)
        mixed = (1 + self.alpha) * scores - self.alpha * contrast
        return mixed.masked_fill(log_probs < cutoff, float("-inf"))


def _cache_name(forward: Callable[..., Any]) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` (forward kwarg and output field)."""
    import inspect

    target = getattr(forward, "forward", forward)
    return "cache" if "cache" in inspect.signature(target).parameters else "past_key_values"


class _CachedBranch:
    """Runs a causal LM incrementally: first call on the full prompt inputs, then token by token."""

    def __init__(self, forward: Callable[..., Any], first_inputs: dict[str, torch.Tensor]):
        self.forward, self.first_inputs = forward, first_inputs
        self.past = None
        self.mask = first_inputs.get("attention_mask")
        self.cache_name = _cache_name(forward)

    @torch.no_grad()
    def __call__(self, new_ids: torch.Tensor | None) -> torch.Tensor:
        if new_ids is None:
            out = self.forward(**self.first_inputs, use_cache=True)
        else:
            if self.mask is not None:
                self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], new_ids.shape[1])], dim=1)
            out = self.forward(input_ids=new_ids, attention_mask=self.mask, **{self.cache_name: self.past}, use_cache=True)
        self.past = getattr(out, self.cache_name)
        return out.logits[:, -1, :]


# ---------------------------------------------------------------------------------------------
# Streaming / generation helpers shared by both model kinds


class _FirstTokenTimer:
    """A minimal streamer that notes when the first generated token arrives."""

    def __init__(self, skip_prompt_tokens: bool):
        self.skip = skip_prompt_tokens
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if value.numel() == 0:  # generating from embeddings: an empty "prompt" is put first
            return
        if self.skip:  # generate() first puts the prompt ids when it has them
            self.skip = False
            return
        if self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class _Tee:
    """Forward streamer calls to several streamers."""

    def __init__(self, *streamers: Any):
        self.streamers = [s for s in streamers if s is not None]

    def put(self, value: torch.Tensor) -> None:
        for s in self.streamers:
            s.put(value)

    def end(self) -> None:
        for s in self.streamers:
            s.end()


def _run_generate(
    generate: Callable[..., torch.Tensor],
    inputs: dict[str, Any],
    *,
    prompt_len: int,
    max_new_tokens: int,
    max_time_s: float,
    eos_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    streamer: Any = None,
    logits_processor: Any = None,
    use_cache: bool = True,
) -> list[Generation]:
    """Greedy generation bounded in tokens and seconds; returns one Generation per batch row."""
    from transformers import LogitsProcessorList

    batch = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    timer = _FirstTokenTimer(skip_prompt_tokens="input_ids" in inputs) if batch == 1 else None
    start = time.perf_counter()
    out = generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        max_time=max_time_s,
        do_sample=False,
        use_cache=use_cache,
        streamer=_Tee(timer, streamer) if (timer or streamer) else None,
        logits_processor=LogitsProcessorList([logits_processor]) if logits_processor else None,
        pad_token_id=eos_ids[0],
        eos_token_id=list(eos_ids),
    )
    seconds = time.perf_counter() - start
    new_tokens = out[:, prompt_len:]
    results = []
    for row in new_tokens.tolist():
        ids = []
        stopped = None
        for tok in row:
            if tok in eos_ids:
                stopped = "eos"
                break
            ids.append(tok)
        if stopped is None:
            stopped = "max_new_tokens" if len(row) >= max_new_tokens else "max_time"
        ttft = (timer.first - start) if timer is not None and timer.first is not None else None
        results.append(Generation(decode(ids).strip(), len(ids), seconds, stopped, ttft))
    return results


class _NoCacheGenerate:
    """Greedy decoding that re-runs the whole sequence every step (no KV cache).

    transformers' generate() with inputs_embeds and use_cache=False feeds only the newest token,
    losing the prompt; this reference loop keeps the full embedded prefix, so the with/without
    cache comparison measures the same computation. Same interface as generate().
    """

    def __init__(self, language_model: nn.Module):
        self.lm = language_model

    @torch.no_grad()
    def __call__(self, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 max_time: float, eos_token_id: list[int], streamer: Any = None, logits_processor: Any = None,
                 **_: Any) -> torch.Tensor:
        start = time.perf_counter()
        embed = self.lm.get_input_embeddings()
        embeds, mask = inputs_embeds, attention_mask
        batch = embeds.shape[0]
        out = torch.empty(batch, 0, dtype=torch.long, device=embeds.device)
        done = torch.zeros(batch, dtype=torch.bool, device=embeds.device)
        if streamer is not None:
            streamer.put(out.cpu())
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
            logits = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1, :]
            if logits_processor:
                for proc in logits_processor:
                    logits = proc(out, logits)
            next_ids = logits.argmax(-1)
            next_ids = torch.where(done, torch.full_like(next_ids, eos_token_id[0]), next_ids)
            out = torch.cat([out, next_ids[:, None]], dim=1)
            if streamer is not None:
                streamer.put(next_ids.cpu())
            done |= torch.isin(next_ids, torch.tensor(eos_token_id, device=next_ids.device))
            if done.all() or time.perf_counter() - start > max_time:
                break
            embeds = torch.cat([embeds, embed(next_ids[:, None])], dim=1)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        if streamer is not None:
            streamer.end()
        return out


def stream_in_thread(run: Callable[[Any], Any], skip_prompt: bool, tokenizer: Any, timeout_s: float) -> Iterator[str]:
    """Run `run(streamer)` in a thread and yield decoded text pieces as they arrive."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True, timeout=timeout_s)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(streamer)
        except BaseException as exc:  # surfaced to the consumer below
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------------------------
# medai's own head


def resolve_language_model(name_or_path: str) -> Path:
    """Return a local LM folder: a packaged key from medai.models.pretrained (converted once) or a folder."""
    from medai.models.pretrained import packaged_weights

    packaged = packaged_weights()
    if name_or_path in packaged:
        return packaged[name_or_path].resolve()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise VLMInputError(
            f"language model '{name_or_path}' is neither a packaged key ({', '.join(packaged)}) "
            "nor a local folder with config.json"
        )
    return path


def build_projector(in_dim: int, out_dim: int, cfg: ProjectorConfig) -> nn.Module:
    """Return the vision->text projector: Linear, or Linear-GELU-...-Linear of `cfg.depth` layers."""
    if cfg.kind == "linear" or cfg.depth <= 1:
        return nn.Linear(in_dim, out_dim)
    hidden = cfg.hidden_dim or out_dim
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
    for i in range(cfg.depth - 1):
        layers += [nn.GELU(), nn.Dropout(cfg.dropout)] if cfg.dropout else [nn.GELU()]
        layers.append(nn.Linear(hidden, out_dim if i == cfg.depth - 2 else hidden))
    return nn.Sequential(*layers)


class VisionLanguageModel(nn.Module):
    """Backbone -> projector -> causal LM, with image embeddings spliced at `<image>`."""

    def __init__(self, config: VLMConfig, backbone: nn.Module, language_model: nn.Module, tokenizer: Any):
        super().__init__()
        check_feature_extractor(backbone, config.backbone)
        grid = math.isqrt(config.num_image_tokens)
        if grid * grid != config.num_image_tokens:
            raise VLMInputError(f"num_image_tokens must be a square number, got {config.num_image_tokens}")
        self.config, self.grid = config, grid
        self.backbone = backbone
        self.language_model = language_model
        self.tokenizer = tokenizer
        hidden = language_model.get_input_embeddings().embedding_dim
        self.projector = build_projector(backbone.num_features, hidden, config.projector)
        mean, std = _backbone_normalisation(backbone)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.eos_ids = _eos_ids(tokenizer, language_model)
        # Set by registry.load_state_strict when trained weights are loaded; until then the projector
        # holds its random initialisation and answers are the LM's guesses, not readings of the image.
        self.weights_source: str | None = None

    @property
    def untrained_parts(self) -> list[str]:
        """Modules still at their random initialisation (empty once a trained checkpoint is loaded)."""
        return [] if self.weights_source else ["projector"]

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: VLMConfig) -> "VisionLanguageModel":
        """Build the backbone through the registry and load the LM + tokenizer from a local folder."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        backbone = create_feature_extractor(config.backbone, config.backbone_pretrained, **config.backbone_kwargs)
        lm_path = resolve_language_model(config.language_model)
        tokenizer = AutoTokenizer.from_pretrained(str(lm_path), local_files_only=True)
        language_model = AutoModelForCausalLM.from_pretrained(str(lm_path), local_files_only=True)
        if tokenizer.chat_template is None:
            raise VLMInputError(f"{lm_path}: the tokenizer has no chat template; use an instruction-tuned LM")
        return cls(config, backbone, language_model, tokenizer)

    def freeze_for_stage(self, stage: Literal["align", "instruct"]) -> None:
        """Stage 'align': only the projector trains. 'instruct': projector + LoRA (see apply_lora)."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for name, p in self.language_model.named_parameters():
            p.requires_grad_(stage == "instruct" and "lora_" in name)
        for p in self.projector.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        """Set training mode; the backbone's normalisation statistics stay fixed (eval) whenever it trains."""
        super().train(mode)
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        else:
            # Batches of 8 radiographs would drag ImageNet running statistics about; fine-tune the
            # weights and keep the statistics, as detection and segmentation fine-tuning does.
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def apply_lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> None:
        """Wrap the LM with peft LoRA adapters on `target_modules` (stage 2, instruction tuning)."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise OptionalDependencyError("peft", "LoRA instruction tuning", "train") from exc
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM")
        self.language_model = get_peft_model(self.language_model, lora)
        self.freeze_for_stage("instruct")

    # -- images --------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Any], check: bool | None = None) -> torch.Tensor:
        """Return normalised pixels (B, 3, S, S): pad to square, resize, scale by the backbone's stats."""
        check = self.config.check_image if check is None else check
        batch = [square_image_tensor(image, self.config.image_size, check, f"image {i}") for i, image in enumerate(images)]
        return self.normalise(torch.stack(batch))

    def normalise(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Scale [0, 1] RGB pixels (B, 3, S, S) by the backbone's mean and std."""
        return (pixels01.to(self.pixel_mean.device) - self.pixel_mean) / self.pixel_std

    def substitute_images(self, pixel_values: torch.Tensor, mode: ImageMode, seed: int = 0) -> torch.Tensor:
        """Return pixels for the visual-reliance check: the image, a blank (black) image, or noise."""
        if mode == "image" or mode == "none":
            return pixel_values
        if mode == "blank":
            return ((torch.zeros_like(pixel_values) - self.pixel_mean) / self.pixel_std)
        if mode == "noise":
            gen = torch.Generator(device="cpu").manual_seed(seed)
            noise = torch.rand(pixel_values.shape, generator=gen).to(pixel_values)
            return (noise - self.pixel_mean) / self.pixel_std
        raise VLMInputError(f"unknown image mode '{mode}' (image, blank, noise, none)")

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return image token embeddings (B, num_image_tokens, LM hidden size)."""
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats = self.backbone.forward_features(pixel_values)
        if feats.ndim == 4:  # (B, C, H, W) feature map
            feats = nn.functional.adaptive_avg_pool2d(feats, self.grid).flatten(2).transpose(1, 2)
        elif feats.ndim == 3:  # (B, N, C) tokens; drop class/register tokens, pool the rest
            feats = feats[:, getattr(self.backbone, "num_prefix_tokens", 0):]
            feats = nn.functional.adaptive_avg_pool1d(feats.transpose(1, 2), self.config.num_image_tokens).transpose(1, 2)
        else:
            raise VLMInputError(f"backbone forward_features returned shape {tuple(feats.shape)}; expected 3-D or 4-D")
        embed_dtype = self.language_model.get_input_embeddings().weight.dtype
        return self.projector(feats.to(self.projector_dtype)).to(embed_dtype)

    @property
    def projector_dtype(self) -> torch.dtype:
        """dtype of the projector weights."""
        return next(self.projector.parameters()).dtype

    # -- text ----------------------------------------------------------------------------------

    def prompt_parts(self, question: str, with_image: bool = True) -> tuple[list[int], list[int]]:
        """Return token ids before and after the image slot for a chat-formatted question."""
        content = f"{IMAGE_PLACEHOLDER}\n{question}" if with_image else question
        messages = [{"role": "system", "content": self.config.system_prompt}, {"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        before, _, after = text.partition(IMAGE_PLACEHOLDER) if with_image else ("", "", text)
        # Chat templates write BOS themselves, so the tokenizer must not add special tokens again.
        encode = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        return encode(before), encode(after)

    def validate_question(self, question: str) -> None:
        """Raise VLMInputError for an empty, non-English or overlong question."""
        if not isinstance(question, str) or not question.strip():
            raise VLMInputError("question is empty")
        if self.config.check_language:
            check_language(question)
        n = sum(len(p) for p in self.prompt_parts(question)) + self.config.num_image_tokens
        if n > self.config.max_prompt_tokens:
            raise PromptTooLongError(
                f"question: prompt is {n} tokens (with {self.config.num_image_tokens} image tokens), "
                f"limit {self.config.max_prompt_tokens}; shorten the question"
            )

    def build_inputs(
        self,
        pixel_values: torch.Tensor | None,
        questions: Sequence[str],
        answers: Sequence[str] | None = None,
        padding_side: Literal["left", "right"] = "right",
    ) -> dict[str, torch.Tensor]:
        """Return inputs_embeds, attention_mask (and labels when `answers` given) for the LM.

        `pixel_values` None builds question-only (blind) prompts for the same LM.
        """
        embed = self.language_model.get_input_embeddings()
        device = embed.weight.device
        image_tokens = self.encode_images(pixel_values.to(device)) if pixel_values is not None else None
        rows, labels = [], []
        for i, question in enumerate(questions):
            before, after = self.prompt_parts(question, with_image=image_tokens is not None)
            answer_ids = []
            if answers is not None:
                answer_ids = self.tokenizer(answers[i], add_special_tokens=False)["input_ids"] + [self.eos_ids[0]]
            ids = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
            pieces = [embed(ids(before))]
            if image_tokens is not None:
                pieces.append(image_tokens[i])
            pieces += [embed(ids(after)), embed(ids(answer_ids))]
            rows.append(torch.cat(pieces, dim=0))
            n_prompt = rows[-1].shape[0] - len(answer_ids)
            labels.append(torch.cat([torch.full((n_prompt,), -100, device=device), ids(answer_ids)]))
        longest = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[1]
        embeds = rows[0].new_zeros(len(rows), longest, hidden)
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        label_t = torch.full((len(rows), longest), -100, dtype=torch.long, device=device)
        for i, (row, lab) in enumerate(zip(rows, labels)):
            n = row.shape[0]
            sl = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
            embeds[i, sl], mask[i, sl], label_t[i, sl] = row, 1, lab
        out = {"inputs_embeds": embeds, "attention_mask": mask}
        if answers is not None:
            out["labels"] = label_t
        return out

    def forward(self, pixel_values: torch.Tensor | None, questions: Sequence[str], answers: Sequence[str]) -> Any:
        """Return the LM output with `.loss` = mean token cross-entropy over answer tokens only.

        `.logits` covers only the answer span (the positions the loss reads), not the whole prompt.
        """
        inputs = self.build_inputs(pixel_values, questions, answers, padding_side="left")
        labels = inputs.pop("labels")
        mask = inputs["attention_mask"]
        # Left padding puts every answer at the end of its row, so the last `span + 1` positions
        # hold every logit the loss reads: the vocabulary projection (a fifth of SmolLM2's
        # weights) then runs on a few positions per row instead of on the whole prompt.
        span = int((labels != -100).sum(-1).max())
        out = self.language_model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                  logits_to_keep=span + 1, use_cache=False)
        logits = out.logits[:, :-1]  # position t predicts token t + 1
        out.loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, -span:].flatten(),
                                               ignore_index=-100)
        return out

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate_answers(
        self,
        images: Sequence[Any] | None,
        questions: Sequence[str],
        *,
        pixel_values: torch.Tensor | None = None,
        image_mode: ImageMode = "image",
        max_new_tokens: int | None = None,
        max_time_s: float | None = None,
        mitigation: Literal["none", "vcd"] = "none",
        vcd_alpha: float = 1.0,
        vcd_beta: float = 0.1,
        use_cache: bool = True,
        streamer: Any = None,
        validate: bool = True,
    ) -> list[Generation]:
        """Answer each question about its image (greedy, bounded); `image_mode` feeds blank/noise/none.

        Give raw `images`, or already normalised `pixel_values` (B, 3, S, S) from a data loader.
        """
        if validate:
            for q in questions:
                self.validate_question(q)
        if image_mode != "none":
            if pixel_values is None:
                if images is None or len(images) != len(questions):
                    raise MissingImageError("one image per question is needed (image_mode='none' asks blind)")
                pixel_values = self.preprocess(images, check=validate and image_mode == "image")
            pixel_values = self.substitute_images(pixel_values, image_mode)
        else:
            pixel_values = None
            if mitigation == "vcd":
                raise VLMInputError("visual contrastive decoding needs an image (image_mode != 'none')")
        inputs = self.build_inputs(pixel_values, questions, padding_side="left")
        processor = None
        if mitigation == "vcd":
            contrast = self.build_inputs(diffusion_noise(pixel_values), questions, padding_side="left")
            processor = VisualContrastiveDecoding(_CachedBranch(self.language_model, contrast), vcd_alpha, vcd_beta)
        elif mitigation != "none":
            raise VLMInputError(f"unknown mitigation '{mitigation}' (none, vcd)")
        return _run_generate(
            self.language_model.generate if use_cache else _NoCacheGenerate(self.language_model),
            inputs,
            prompt_len=0,  # generating from embeddings returns only the new tokens
            max_new_tokens=_bounded_tokens(max_new_tokens, self.config.max_new_tokens),
            max_time_s=self.config.max_time_s if max_time_s is None else max_time_s,
            eos_ids=self.eos_ids,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            streamer=streamer,
            logits_processor=processor,
            use_cache=use_cache,
        )

    def answer(self, image: Any, question: str, **kwargs: Any) -> Generation:
        """Answer one question about one image (see generate_answers for options)."""
        return self.generate_answers([image], [question], **kwargs)[0]

    def stream(self, image: Any, question: str, **kwargs: Any) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (TextIteratorStreamer)."""
        self.validate_question(question)
        to_pil(image)  # fail before starting a thread
        timeout = kwargs.get("max_time_s") or self.config.max_time_s
        yield from stream_in_thread(
            lambda s: self.answer(image, question, streamer=s, **kwargs), False, self.tokenizer, timeout + 30
        )

    def draft_text(self, prompt: str, *, max_new_tokens: int | None = None, max_time_s: float | None = None, streamer: Any = None) -> Generation:
        """Generate from a text-only chat prompt (used by report drafting), bounded like answers."""
        messages = [{"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        ids = {k: v.to(self.language_model.device) for k, v in ids.items()}
        return _run_generate(
            self.language_model.generate,
            dict(ids),
            prompt_len=ids["input_ids"].shape[1],
            max_new_tokens=_bounded_tokens(max_new_tokens, self.config.max_new_tokens),
            max_time_s=self.config.max_time_s if max_time_s is None else max_time_s,
            eos_ids=self.eos_ids,
            decode=lambda t: self.tokenizer.decode(t, skip_special_tokens=True),
            streamer=streamer,
        )[0]

    # -- weights -------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the tensors training changes (projector, LoRA): what a medai VLM checkpoint holds."""
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        state.update({f"language_model.{k}": v for k, v in self.language_model.state_dict().items() if "lora_" in k})
        return state


def _backbone_normalisation(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(backbone, "pretrained_cfg", None) or getattr(backbone, "default_cfg", None) or {}
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _eos_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    ids = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v not in ids:
                ids.append(int(v))
    if not ids:
        raise VLMInputError("the tokenizer defines no end-of-sequence token")
    return ids


@register_model(
    family="vlm",
    config=VLMConfig,
    input_kind="image_text",
    # Tests add language_model: a tiny LM folder (tests/models/tiny_vlms.py).
    tiny=dict(backbone_pretrained=None, image_size=32, num_image_tokens=4, max_new_tokens=4),
    card="data_cards/checkpoints/vlm_lite0_smollm2.md",
)
def vlm_lite0_smollm2(config: VLMConfig) -> VisionLanguageModel:
    """ImageNet EfficientNet-Lite0 -> MLP projector -> SmolLM2-135M-Instruct (projector untrained)."""
    return VisionLanguageModel.from_config(config)


# ---------------------------------------------------------------------------------------------
# Bring your own Hugging Face image-text-to-text model


class UntrainedModelError(MedaiError):
    """A model with untrained parts was asked for an answer a user might take as a reading."""


class HFImageTextToText:
    """Any local `AutoModelForImageTextToText` checkpoint behind medai's answer()/stream() interface."""

    def __init__(self, model: Any, processor: Any, *, max_new_tokens: int = 64, max_time_s: float = 60.0,
                 max_prompt_tokens: int = 2048, check_image: bool = True, check_language: bool = True):
        self.model, self.processor = model, processor
        self.max_new_tokens, self.max_time_s, self.max_prompt_tokens = max_new_tokens, max_time_s, max_prompt_tokens
        self.check_image, self.check_language = check_image, check_language
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.eos_ids = _eos_ids(self.tokenizer, model)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, quantization: Literal["none", "4bit", "8bit"] = "none",
                        device: str | None = None, dtype: torch.dtype | None = None, **kwargs: Any) -> "HFImageTextToText":
        """Load model + processor from a local folder only (never the Hub); 4/8-bit needs CUDA + bitsandbytes."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise VLMInputError(f"{path}: not a Hugging Face model folder (no config.json)")
        load: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            load["dtype"] = dtype
        if quantization != "none":
            if not torch.cuda.is_available():
                raise VLMInputError(f"{quantization} loading needs a CUDA GPU (bitsandbytes); load with quantization='none'")
            try:
                import bitsandbytes  # noqa: F401
                from transformers import BitsAndBytesConfig
            except ImportError as exc:
                raise OptionalDependencyError("bitsandbytes", f"{quantization} loading of {path}") from exc
            load["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4",
            )
            load["device_map"] = device or "auto"
        try:
            processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(str(path), **load)
        except (OSError, ValueError, KeyError) as exc:
            raise VLMInputError(f"{path}: cannot load as an image-text-to-text model ({exc})") from exc
        if device and quantization == "none":
            model = model.to(device)
        model.eval()
        return cls(model, processor, **kwargs)

    def _inputs(self, image: Any, question: str, pixel_noise: bool = False) -> dict[str, torch.Tensor]:
        pil = to_pil(image)
        if self.check_image:
            check_medical_image(pil)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(images=[pil], text=[prompt], return_tensors="pt")
        if inputs["input_ids"].shape[1] > self.max_prompt_tokens:
            raise PromptTooLongError(f"question: prompt is {inputs['input_ids'].shape[1]} tokens, limit {self.max_prompt_tokens}")
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        if pixel_noise:
            inputs["pixel_values"] = diffusion_noise(inputs["pixel_values"])
        return inputs

    @torch.no_grad()
    def answer(self, image: Any, question: str, *, max_new_tokens: int | None = None, max_time_s: float | None = None,
               mitigation: Literal["none", "vcd"] = "none", vcd_alpha: float = 1.0, vcd_beta: float = 0.1,
               use_cache: bool = True, streamer: Any = None) -> Generation:
        """Answer one question about one image (greedy, bounded in tokens and seconds)."""
        if not isinstance(question, str) or not question.strip():
            raise VLMInputError("question is empty")
        if self.check_language:
            check_language(question)
        inputs = self._inputs(image, question)
        processor = None
        if mitigation == "vcd":
            processor = VisualContrastiveDecoding(_CachedBranch(self.model, self._inputs(image, question, pixel_noise=True)), vcd_alpha, vcd_beta)
        return _run_generate(
            self.model.generate, inputs, prompt_len=inputs["input_ids"].shape[1],
            max_new_tokens=_bounded_tokens(max_new_tokens, self.max_new_tokens),
            max_time_s=self.max_time_s if max_time_s is None else max_time_s,
            eos_ids=self.eos_ids, decode=lambda t: self.tokenizer.decode(t, skip_special_tokens=True),
            streamer=streamer, logits_processor=processor, use_cache=use_cache,
        )[0]

    def stream(self, image: Any, question: str, **kwargs: Any) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (TextIteratorStreamer)."""
        to_pil(image)
        timeout = kwargs.get("max_time_s") or self.max_time_s
        yield from stream_in_thread(lambda s: self.answer(image, question, streamer=s, **kwargs), True, self.tokenizer, timeout + 30)


def load_vlm(name_or_path: str | Path, **kwargs: Any) -> VisionLanguageModel | HFImageTextToText:
    """Return a VLM: a registered medai VLM name, or a local HF image-text-to-text folder."""
    from medai.models.registry import list_models

    if isinstance(name_or_path, str) and name_or_path in list_models("vlm_*"):
        return create_model(name_or_path, **kwargs)
    return HFImageTextToText.from_pretrained(name_or_path, **kwargs)
