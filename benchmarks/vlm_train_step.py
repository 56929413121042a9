"""Training-step time of medai's VLM head: answer-span logits (what `forward` does) vs full-sequence logits.

The loss reads logits only on the answer tokens; computing the vocabulary projection on every
prompt position (what passing `labels` to a Hugging Face causal LM does) is the baseline. Both run
in one process on the same real VQA-RAD training batch, LoRA stage (instruct), interleaved, and
the script prints the median step time of each, their ratio, and the two losses (which must agree).

    python benchmarks/vlm_train_step.py [--batch 8] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def full_sequence_loss(model, pixels, questions, answers) -> torch.Tensor:
    """The baseline: right-padded inputs, labels to the LM, logits on every position."""
    return model.language_model(**model.build_inputs(pixels, questions, answers, padding_side="right")).loss


def main() -> None:
    """Parse arguments, time both steps interleaved, print a table and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    from medai.io.data import dataset_path
    from medai.io.vqa_rad import load_vqa_rad
    from medai.models import create_model

    items = load_vqa_rad(dataset_path("vqa_rad"), "train")[: args.batch]
    model = create_model("vlm_lite0_smollm2", num_image_tokens=16)
    model.apply_lora()
    model.train()
    pixels = model.preprocess([Image.open(it.image_path) for it in items])
    questions, answers = [it.question for it in items], [it.answer for it in items]
    steps = {"answer-span logits": lambda: model(pixels, questions, answers).loss,
             "full-sequence logits": lambda: full_sequence_loss(model, pixels, questions, answers)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, float] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, step in steps.items():
            start = time.perf_counter()
            loss = step()
            loss.backward()
            seconds = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            losses[name] = float(loss)
            if repeat:
                times[name].append(seconds)
    n_tokens = int(model.build_inputs(pixels, questions, answers)["attention_mask"].sum())
    print(f"VLM training step (forward + backward, LoRA stage), batch {args.batch} real VQA-RAD train items "
          f"({n_tokens} tokens), {args.threads} thread(s), median of {args.repeats}")
    print(f"{'logits on':<24}{'s/step':>9}{'loss':>10}")
    for name in steps:
        print(f"{name:<24}{statistics.median(times[name]):>9.2f}{losses[name]:>10.4f}")
    base, new = (statistics.median(times[n]) for n in ("full-sequence logits", "answer-span logits"))
    print(f"speed-up: {base / new:.2f}x; loss difference {abs(losses['answer-span logits'] - losses['full-sequence logits']):.2e}")


if __name__ == "__main__":
    main()
