"""Series loading speed: medai.load_series vs plain pydicom dcmread + numpy stack vs MONAI LoadImage.

Prints slices/s for each on the same TCIA series (all files read from disk each repeat) and the
ratio against the plain pydicom baseline measured in the same run. Run:
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/dicom_load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def plain_pydicom(folder: Path) -> np.ndarray:
    """The baseline everyone writes: read every file, sort by InstanceNumber, stack, rescale."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
    datasets.sort(key=lambda d: int(d.InstanceNumber))
    stack = np.stack([d.pixel_array for d in datasets]).astype(np.float32)
    slope = float(datasets[0].get("RescaleSlope", 1))
    intercept = float(datasets[0].get("RescaleIntercept", 0))
    return stack * slope + intercept


def medai_load(folder: Path) -> np.ndarray:
    """medai: sort along the normal, geometry checks, per-slice rescale, affine."""
    from medai.io.dicom import load_series

    return load_series(folder).array


def monai_load(folder: Path) -> np.ndarray:
    """MONAI LoadImage with its PydicomReader on the series folder."""
    from monai.transforms import LoadImage

    return np.asarray(LoadImage(reader="PydicomReader", image_only=True)(str(folder)))


def time_method(fn, folders: list[Path], repeats: int) -> tuple[float, list[np.ndarray]]:
    """Median seconds over repeats to load all folders, and the arrays of the last repeat."""
    times, arrays = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        arrays = [fn(f) for f in folders]
        times.append(time.perf_counter() - start)
    return statistics.median(times), arrays


def main() -> None:
    """Run the comparison and print slices/s and ratios."""
    from medai.io.data import dataset_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    root = dataset_path("dicom_brain_tumor_progression")
    folders = sorted(p for p in root.glob("*/*") if p.is_dir())
    n_slices = sum(len(list(f.iterdir())) for f in folders)
    for fn in (plain_pydicom, medai_load, monai_load):  # warm imports and the page cache
        fn(folders[0])
    results = {}
    for name, fn in (("pydicom dcmread+stack", plain_pydicom), ("medai load_series", medai_load), ("MONAI LoadImage(PydicomReader)", monai_load)):
        seconds, arrays = time_method(fn, folders, args.repeats)
        results[name] = (seconds, arrays)
    base = results["pydicom dcmread+stack"][0]
    print(f"{len(folders)} series, {n_slices} slices (TCIA Brain-Tumor-Progression), median of {args.repeats} repeats")
    for name, (seconds, _) in results.items():
        print(f"{name:34s} {n_slices / seconds:8.1f} slices/s   {base / seconds:5.2f}x pydicom baseline")
    ours = results["medai load_series"][1]
    theirs = results["MONAI LoadImage(PydicomReader)"][1]
    same = sum(a.shape == b.shape and np.allclose(np.sort(a, axis=None), np.sort(b, axis=None)) for a, b in zip(ours, theirs))
    print(f"medai and MONAI hold the same voxel values in {same}/{len(folders)} series")


if __name__ == "__main__":
    main()
