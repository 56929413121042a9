"""Small synthetic tiled TIFFs for edge cases the real slides lack (corrupt tiles, blank glass)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiled_tiff(path: Path, image: np.ndarray, mpp: float = 0.5, tile: int = 256) -> Path:
    """Write a single-level JPEG-tiled TIFF whose resolution tags give `mpp` µm/px."""
    import tifffile

    px_per_cm = 10_000 / mpp
    tifffile.imwrite(
        path,
        image,
        tile=(tile, tile),
        compression="jpeg",
        photometric="rgb",
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
    )
    return path


def corrupt_tiles(path: Path, tiles: tuple[int, ...] = (5, 6)) -> Path:
    """Overwrite the middle of some JPEG tiles with zeros (libjpeg: 'Corrupt JPEG data')."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    with open(path, "r+b") as handle:
        for i in tiles:
            handle.seek(offsets[i] + counts[i] // 3)
            handle.write(b"\x00" * (counts[i] // 2))
    return path


def crop_of_real_slide(slide_path: Path, size: int = 1024) -> np.ndarray:
    """Return the top-left size x size RGB crop of a real slide (level 0)."""
    from medai.io.wsi import open_slide

    with open_slide(slide_path) as slide:
        return slide.read_region((0, 0), 0, (size, size))
