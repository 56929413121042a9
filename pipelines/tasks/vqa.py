"""Visual question answering on VQA-RAD for medai's VLM head (stage 1 align, stage 2 LoRA).

Stage `align` trains the projector only (vision and LM frozen) on image-question-answer text;
stage `instruct` adds LoRA adapters to the LM through the engine's `model.lora` section (with
`modules_to_save: [projector]`), starting from the stage-1 checkpoint via `model.pretrained`.
`image_mode: none` trains the question-only (blind) baseline of the same LM.

Splits (`medai.io.datasets.vqa`): VQA-RAD's official test split is never trained on (see
medai.io.vqa_rad); a validation split is drawn from the training questions (seeded by the run),
grouped by image so a validation image's questions are all held out together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from medai.io.datasets import load_dataset
from medai.io.vqa_rad import VQAItem
from medai.pipelines.tasks import Task, TaskData, item_generator, register_task
from medai.pipelines.metrics import closed_correct, token_scores


@dataclass
class VQAOptions:
    """`data.options` of the VQA task."""

    stage: Literal["align", "instruct"] = "align"
    image_mode: Literal["image", "none"] = "image"  # "none": the blind (question-only) baseline
    val_fraction: float = 0.1  # of training images, held out with all their questions
    image_size: int = 224
    max_new_tokens: int = 8  # answers in VQA-RAD are short; bounded generation at evaluation
    max_time_s: float = 900.0  # per batch; a safety net, far above what a batch needs
    # Train split only: a random zoom-crop (85-100% of the side) and +-10% contrast / +-5% brightness.
    # No flips or rotations: VQA-RAD asks about left and right, and about orientation.
    augment: bool = False


def augment_pixels(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Zoom-crop to 85-100% of the side at a random place, resize back; jitter contrast and brightness."""
    size = x.shape[-1]
    side = max(1, round(size * (0.85 + 0.15 * float(torch.rand(1, generator=g)))))
    top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
    x = x[:, top:top + side, left:left + side]
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    contrast, shift = torch.rand(2, generator=g) * torch.tensor([0.2, 0.1]) + torch.tensor([0.9, -0.05])
    mean = x.mean()
    return ((x - mean) * contrast + mean + shift).clamp_(0.0, 1.0)


class VQADataset(Dataset):
    """VQA items -> (pixels in [0, 1] (3, S, S), question, answer, closed flag, normalised answer, qid)."""

    def __init__(self, items: list[VQAItem], image_size: int, with_images: bool = True, augment: bool = False,
                 seed: int = 0):
        self.items, self.image_size, self.with_images = items, image_size, with_images
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of an epoch (called by the engine)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        from medai.models.vlm import square_image_tensor

        item = self.items[index]
        pixels = torch.zeros(0)
        if self.with_images:
            with Image.open(item.image_path) as image:
                pixels = square_image_tensor(image, self.image_size, check=False, source=str(item.image_path))
            if self.augment:
                pixels = augment_pixels(pixels, item_generator(self.seed, self.epoch, index))
        return {"pixels": pixels, "question": item.question, "answer": item.answer, "answer_norm": item.answer_norm,
                "closed": item.is_closed, "qid": item.qid}


def collate_vqa(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixels; keep strings as lists."""
    out: dict[str, Any] = {k: [r[k] for r in rows] for k in ("question", "answer", "answer_norm", "qid")}
    out["closed"] = torch.tensor([r["closed"] for r in rows])
    out["pixels"] = torch.stack([r["pixels"] for r in rows]) if rows[0]["pixels"].numel() else None
    return out


def vqa_metrics(predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """Closed accuracy and open exact/recall/F1 (fractions) of concatenated predictions."""
    closed = predictions["closed"].astype(bool)
    texts, refs, norms = predictions["prediction"], predictions["answer"], predictions["answer_norm"]
    out: dict[str, float] = {}
    if closed.any():
        out["closed_acc"] = float(np.mean([closed_correct(p, r) for p, r in zip(texts[closed], norms[closed])]))
    if (~closed).any():
        scores = [token_scores(p, r) for p, r in zip(texts[~closed], refs[~closed])]
        for key in ("exact", "recall", "f1"):
            out[f"open_{key}"] = float(np.mean([s[key] for s in scores]))
    return out


@register_task("vqa")
class VQATask(Task):
    """VQA-RAD question answering for `VisionLanguageModel` (models/vlm.py)."""

    default_monitor = "val_loss"
    default_monitor_mode = "min"
    options_cls = VQAOptions

    def _opts(self) -> VQAOptions:
        from medai.config import from_dict

        return self.options if isinstance(self.options, VQAOptions) else from_dict(VQAOptions, self.options)

    def setup(self, data_cfg: Any, seed: int) -> TaskData:
        """Official train/test split of VQA-RAD; validation images drawn from train."""
        opts = self._opts()
        data = load_dataset(data_cfg.path, kind="vqa", seed=seed, **vars(opts))
        train, val, test = (data.split(name) for name in ("train", "val", "test"))
        with_images = opts.image_mode == "image"
        datasets = {name: VQADataset(items, opts.image_size, with_images, opts.augment and name == "train", seed)
                    for name, items in (("train", train), ("val", val), ("test", test))}
        info = {"n_train": len(train), "n_val": len(val), "n_test": len(test),
                "model_kwargs": {"image_size": opts.image_size}}
        return TaskData(datasets, info, None, collate_vqa)

    def build_model(self, model_cfg: Any, info: dict[str, Any]) -> nn.Module:
        """Build the VLM through the registry and freeze what the stage keeps fixed."""
        model = super().build_model(model_cfg, info)
        model.freeze_for_stage(self._opts().stage)
        return model

    def _pixels(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor | None:
        return None if batch["pixels"] is None else model.normalise(batch["pixels"])

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy on answer tokens only."""
        out = model(pixel_values=self._pixels(model, batch), questions=batch["question"], answers=batch["answer"])
        return out.loss, {}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Any) -> dict[str, np.ndarray]:
        """Greedy, bounded answers with the references they are scored against."""
        opts = self._opts()
        pixels = self._pixels(model, batch)
        gens = model.generate_answers(None, batch["question"], pixel_values=pixels,
                                      image_mode="image" if pixels is not None else "none",
                                      max_new_tokens=opts.max_new_tokens, max_time_s=opts.max_time_s,
                                      validate=False)
        obj = lambda values: np.array(list(values), dtype=object)  # noqa: E731
        return {"qid": obj(batch["qid"]), "prediction": obj(g.text for g in gens), "answer": obj(batch["answer"]),
                "answer_norm": obj(batch["answer_norm"]), "closed": batch["closed"].cpu().numpy()}

    def metrics(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """Closed accuracy, open exact match / token recall / token F1."""
        return vqa_metrics(predictions)
