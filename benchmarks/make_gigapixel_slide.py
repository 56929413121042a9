"""Write a realistic multi-level Aperio-style pyramidal TIFF (default 50,000 x 50,000 px) for scale tests.

    python benchmarks/make_gigapixel_slide.py [OUT.svs] --size 50000   # default OUT: <tmp>/medai_giga_50000.svs

Layout as Aperio writes it, so OpenSlide reports vendor 'aperio' with mpp and objective:
page 0 level 0 (JPEG tiles 256 x 256, ImageDescription 'Aperio Image Library ...|AppMag = 20|MPP = 0.5'),
page 1 a stripped thumbnail, pages 2.. levels at downsample 4, 16, 64 (each a top-level page).

Content: tissue fragments (smooth random blobs covering about 40% of the slide) tiled with real
H&E tiles from CMU-1-Small-Region.svs (flipped and rotated into 8 variants each) on near-white
glass. Level-0 tiles are JPEG-encoded once per pool entry and written as pre-compressed bytes, so a
50k x 50k slide is written in minutes on 2 cores; the lower levels are true downsamples of level 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

log = logging.getLogger("make_gigapixel_slide")
TILE = 256


def _encode(cv2, rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def tile_pool(
    source: Path, rng: np.random.Generator, n_source: int = 48
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return (tissue tiles, glass tiles) as RGB arrays: real H&E tiles with flips/rotations, and noisy glass."""
    from medai.io.wsi import open_slide
    from medai.transforms.tissue import TissueConfig, detect_tissue

    with open_slide(source) as slide:
        width, height = slide.dimensions
        thumb = slide.read_downsampled(16)
        mask = detect_tissue(
            thumb, (width / thumb.shape[1], height / thumb.shape[0]), slide.mpp, TissueConfig()
        ).mask
        tiles = []
        for _ in range(n_source * 20):
            x, y = int(rng.integers(0, width - TILE)), int(rng.integers(0, height - TILE))
            if mask[y // 16 : (y + TILE) // 16, x // 16 : (x + TILE) // 16].mean() > 0.9:
                tiles.append(slide.read_region((x, y), 0, (TILE, TILE)))
            if len(tiles) == n_source:
                break
    tissue = [
        np.ascontiguousarray(np.rot90(t[:, ::-1] if f else t, k))
        for t in tiles
        for f in (0, 1)
        for k in range(4)
    ]
    glass = [
        np.clip(rng.normal(243, 2.5, (TILE, TILE, 3)), 0, 255).astype(np.uint8) for _ in range(8)
    ]
    return tissue, glass


def tissue_layout(
    n_tiles_y: int, n_tiles_x: int, rng: np.random.Generator, fraction: float = 0.4
) -> np.ndarray:
    """Return a boolean tile map with a few smooth tissue fragments covering about `fraction`."""
    import cv2

    noise = rng.normal(size=(n_tiles_y, n_tiles_x)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), max(n_tiles_x, n_tiles_y) / 25)
    return smooth > np.quantile(smooth, 1 - fraction)


def write_slide(
    out: Path, size: int = 50_000, mpp: float = 0.5, quality: int = 80, seed: int = 0
) -> Path:
    """Write the pyramidal TIFF to `out`; return it."""
    import cv2
    import tifffile

    from medai.io.data import dataset_path

    rng = np.random.default_rng(seed)
    tissue_tiles, glass_tiles = tile_pool(dataset_path("wsi_cmu1_small_region"), rng)
    pool = tissue_tiles + glass_tiles
    encoded = [_encode(cv2, t, quality) for t in pool]
    ny = nx = -(-size // TILE)
    tissue = tissue_layout(ny, nx, rng)
    choice = np.where(
        tissue,
        rng.integers(0, len(tissue_tiles), (ny, nx)),
        len(tissue_tiles) + rng.integers(0, len(glass_tiles), (ny, nx)),
    )
    log.info("%d x %d px, %d x %d tiles, %.0f%% tissue", size, size, nx, ny, 100 * tissue.mean())
    appmag = round(10 / mpp)
    head = f"Aperio Image Library v12.0.15 \r\n{size}x{size} [0,0 {size}x{size}] ({TILE}x{TILE}) JPEG/RGB Q={quality}"
    tail = f"|AppMag = {appmag}|MPP = {mpp}|Filename = medai-synthetic|ScanScope ID = SYNTHETIC"

    def level0_tiles():
        for ty in range(ny):
            for tx in range(nx):
                yield encoded[choice[ty, tx]]

    def downsampled_level(factor: int) -> np.ndarray:
        # true downsample of level 0: each pool tile shrunk once, placed into the level's canvas
        small = [
            cv2.resize(t, (TILE // factor, TILE // factor), interpolation=cv2.INTER_AREA)
            for t in pool
        ]
        s = TILE // factor
        canvas = np.empty((ny * s, nx * s, 3), np.uint8)
        for ty in range(ny):
            for tx in range(nx):
                canvas[ty * s : (ty + 1) * s, tx * s : (tx + 1) * s] = small[choice[ty, tx]]
        return canvas[: size // factor, : size // factor]

    start = time.perf_counter()
    with tifffile.TiffWriter(out, bigtiff=True) as tif:
        tif.write(
            level0_tiles(),
            shape=(size, size, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            compression="jpeg",
            photometric="rgb",
            description=head + tail,
            metadata=None,
        )
        level4 = downsampled_level(4)
        thumb_side = 1024
        thumb = cv2.resize(level4, (thumb_side, thumb_side), interpolation=cv2.INTER_AREA)
        tif.write(
            thumb,
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            rowsperstrip=16,
            description=f"Aperio Image Library v12.0.15 \r\n{size}x{size} -> {thumb_side}x{thumb_side} - "
            + tail,
        )
        for factor, level in ((4, level4), (16, None), (64, None)):
            if level is None:
                level = cv2.resize(
                    level4, (size // factor, size // factor), interpolation=cv2.INTER_AREA
                )
            tif.write(
                level,
                tile=(TILE, TILE),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                metadata=None,
                description=head
                + f" -> {level.shape[1]}x{level.shape[0]} JPEG/RGB Q={quality}"
                + tail,
            )
    log.info(
        "wrote %s (%.2f GB) in %.0f s", out, out.stat().st_size / 1e9, time.perf_counter() - start
    )
    return out


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out",
        type=Path,
        nargs="?",
        default=None,
        help="default: <tmp>/medai_giga_<size>.svs (kept if present)",
    )
    parser.add_argument("--force", action="store_true", help="rewrite the file even if it exists")
    parser.add_argument(
        "--size", type=int, default=50_000, help="level-0 side in px (>= 50000 for the scale test)"
    )
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or Path(tempfile.gettempdir()) / f"medai_giga_{args.size}.svs"
    if out.exists() and not args.force:
        log.info("%s exists (pass --force to rewrite it)", out)
        return
    write_slide(out, args.size, args.mpp, args.quality, args.seed)


if __name__ == "__main__":
    main()
