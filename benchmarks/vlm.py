"""Generation speed of medai's VLM head: tokens/s and time-to-first-token, with vs without KV cache.

Runs both settings in one process on the same image and question and prints the ratio, so the
numbers compare like with like on whatever machine runs it (no absolute thresholds).

    python benchmarks/vlm.py                     # default head: Lite0 + SmolLM2-135M-Instruct
    python benchmarks/vlm.py --tokens 64 --repeats 3
    python benchmarks/vlm.py --language-model /path/to/hf/causal-lm
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


def measure(model, image, question: str, tokens: int, use_cache: bool, repeats: int) -> dict[str, float]:
    """Return median tokens/s and time-to-first-token (s) over `repeats` generations."""
    rates, ttfts = [], []
    for _ in range(repeats):
        # min_new_tokens keeps both settings generating exactly `tokens` tokens.
        start = time.perf_counter()
        g = _generate(model, image, question, tokens, use_cache)
        seconds = time.perf_counter() - start
        rates.append(g.num_tokens / seconds)
        ttfts.append(g.time_to_first_token_s or float("nan"))
    return {"tokens_per_s": statistics.median(rates), "ttft_s": statistics.median(ttfts), "tokens": g.num_tokens}


def _generate(model, image, question, tokens, use_cache):
    from medai.models.vlm import _NoCacheGenerate, _run_generate

    inputs = model.build_inputs(model.preprocess([image]), [question], padding_side="left")
    # Both settings ignore end-of-sequence so they generate exactly `tokens` tokens.
    if use_cache:
        generate = lambda **kw: model.language_model.generate(**kw, min_new_tokens=tokens)  # noqa: E731
    else:
        generate = _NoCacheGenerate(model.language_model)
    return _run_generate(generate, inputs, prompt_len=0, max_new_tokens=tokens, max_time_s=600,
                         eos_ids=[-1] if not use_cache else model.eos_ids,
                         decode=lambda ids: model.tokenizer.decode(ids), use_cache=use_cache)[0]


def main() -> None:
    """Parse arguments, run both settings, print a table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--language-model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    from medai.io.data import dataset_path
    from medai.io.vqa_rad import load_vqa_rad
    from medai.models import create_model

    item = load_vqa_rad(dataset_path("vqa_rad"), "test")[0]
    image = Image.open(item.image_path).convert("RGB")
    model = create_model("vlm_lite0_smollm2", language_model=args.language_model).eval()
    _generate(model, image, item.question, 4, True)  # warm-up
    with_cache = measure(model, image, item.question, args.tokens, True, args.repeats)
    without = measure(model, image, item.question, args.tokens, False, args.repeats)
    print(f"VLM generation, {args.tokens} new tokens, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'setting':<16}{'tokens/s':>10}{'TTFT (s)':>10}")
    for name, r in (("KV cache", with_cache), ("no KV cache", without)):
        print(f"{name:<16}{r['tokens_per_s']:>10.2f}{r['ttft_s']:>10.3f}")
    print(f"speed-up from the KV cache: {with_cache['tokens_per_s'] / without['tokens_per_s']:.2f}x tokens/s; "
          f"TTFT ratio (no cache / cache): {without['ttft_s'] / with_cache['ttft_s']:.2f}")


if __name__ == "__main__":
    main()
