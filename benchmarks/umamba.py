"""Sliding-window inference speed (volumes/s) of U-Mamba-Bot, U-Mamba-Enc and the DynUNet baseline.

Runs on real MSD Task04 validation volumes (the committed split), Gaussian blending, ROI
32x48x32, overlap 0.5, the training widths. Weights do not change speed, so untrained models
are used unless --weights-dir holds <dir>/hippocampus_<model>/checkpoints/best/model.safetensors
(the engine runs of configs/hippocampus_<model>.yaml). Prints each
model's volumes/s and its ratio to DynUNet measured in this same run.

    OMP_NUM_THREADS=1 python benchmarks/umamba.py [--volumes 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from medai.io.data import dataset_path
from medai.models import create_model
from medai.io.datasets.volumes import case_records, read_split
from medai.pipelines.segmentation import sliding_window_logits
from medai.transforms.volume import segmentation_transforms

MODELS = ("dynunet_3d", "umamba_bot_3d", "umamba_enc_3d")
ROI = (32, 48, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--weights-dir", type=Path, default=Path("runs/seg_engine"))
    args = parser.parse_args()
    split = read_split("configs/splits/msd_task04_hippocampus.json")
    records = case_records(dataset_path("msd_hippocampus"), split["val"][: args.volumes])
    transform = segmentation_transforms("val", ROI)
    images = [transform(r)["image"][None].float() for r in records]
    print(f"{len(images)} real volumes, ROI {ROI}, overlap 0.5, Gaussian, features {args.features}, "
          f"{torch.get_num_threads()} thread(s)")
    rates = {}
    for name in MODELS:
        weights = args.weights_dir / f"hippocampus_{name}" / "checkpoints" / "best" / "model.safetensors"
        model = create_model(name, pretrained=weights if weights.is_file() else None, features=tuple(args.features))
        model.eval()
        sliding_window_logits(model, images[0], ROI)  # warm-up
        started = time.perf_counter()
        for image in images:
            sliding_window_logits(model, image, ROI)
        rates[name] = len(images) / (time.perf_counter() - started)
        print(f"{name:15} {rates[name]:7.3f} volumes/s   x{rates[name] / rates[MODELS[0]]:.2f} of DynUNet", flush=True)


if __name__ == "__main__":
    main()
