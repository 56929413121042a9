"""Tissue masks, overlays and patch counts for every shared whole-slide image, as a Markdown table.

    python benchmarks/wsi_shared_report.py            # PNGs -> benchmarks/results/wsi_shared/, table -> benchmarks/results/wsi_shared.md

For each slide in `../shared/data/wsi` (CMU-1-Small-Region.svs, the TCGA JPEG 2000 slide, the
DICOM WSI in its three encodings, small_HE_levels.tiff): open it with the automatic backend, run
`pipelines.slides.segment_slide` (the function behind `medai slides tissue`), write the tissue
mask PNG and a thumbnail overlay PNG (longer side at most `--max-side` px, so the folder stays
small enough to commit), and build the patch grid at 256 px @ 0.5 µm/px with
`pipelines.slides.build_patch_grid`. Two slides carry no usable mpp; the overrides passed here
are the ones the tests use and are marked 'user' in the table. A grid that cannot exist (a slide
scanned coarser than 0.5 µm/px, or smaller than one patch) is reported with its reason, and with
the count at the fallback resolution the tests use for that slide.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# this checkout's medai first, and benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels`
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from medai.io.data import data_root  # noqa: E402
from medai.io.wsi import WSIError, open_slide  # noqa: E402
from medai.transforms.tissue import TissueConfig, tissue_overlay, write_png  # noqa: E402
from medai.pipelines.slides import PatchConfig, build_patch_grid, segment_slide  # noqa: E402

PATCH = PatchConfig(patch_size=256, target_mpp=0.5)
VISUAL_CHECK = "## Visual check"  # hand-written section of the Markdown file, kept when the table is regenerated


@dataclass(frozen=True)
class SharedSlide:
    """One shared slide: its id, path under wsi/, the level-0 mpp override (µm/px) and a fallback grid."""

    slide_id: str
    relpath: str
    mpp_override: float | None = None
    override_reason: str = ""
    fallback: PatchConfig | None = None  # patch grid the tests use when 256 px @ 0.5 µm/px cannot exist
    note: str = ""


SLIDES = (
    SharedSlide("cmu1_small_region", "CMU-1-Small-Region.svs"),
    SharedSlide(
        "tcga_cr_7395",
        "tcga-cr-7395-01a-01-ts1.svs",
        0.25,
        "no mpp in the header; 0.25 µm/px as in tests/io/test_wsi.py and tests/pipelines/test_slides.py",
    ),
    SharedSlide(
        "dicom_raw", "dicom_wsi_google/raw.dicom", fallback=PatchConfig(patch_size=32, target_mpp=32.0)
    ),
    SharedSlide(
        "dicom_jpeg", "dicom_wsi_google/jpeg.dicom", fallback=PatchConfig(patch_size=32, target_mpp=32.0)
    ),
    SharedSlide(
        "dicom_jpeg2000",
        "dicom_wsi_google/jpeg2000.dicom",
        fallback=PatchConfig(patch_size=32, target_mpp=32.0),
    ),
    SharedSlide(
        "small_he_levels",
        "small_HE_levels.tiff",
        4.0,
        "header mpp 352.9 µm/px (about a 72 dpi TIFF default) is rejected as implausible; 4.0 µm/px as in "
        "tests/pipelines/test_extract_features.py",
        fallback=PatchConfig(patch_size=32, target_mpp=8.0),
        note="a 256 px @ 0.5 µm/px patch fits this 300 x 250 px image only for an override between "
        "0.512 and 0.55 µm/px (at most one patch), and any override here is arbitrary",
    ),
)


def _fit(image: np.ndarray, max_side: int, nearest: bool = False) -> np.ndarray:
    """Return `image` resized so its longer side is at most `max_side` px (unchanged when already smaller)."""
    import cv2

    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def _write_palette_png(path: Path, rgb: np.ndarray) -> None:
    """Write RGB uint8 as a 256-colour palette PNG (a third of the bytes of RGB: small enough to commit)."""
    from PIL import Image

    palette = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    palette.save(path, optimize=True)


def report_slide(entry: SharedSlide, wsi_dir: Path, out_dir: Path, max_side: int) -> dict:
    """Segment and grid one slide, write its mask and overlay PNGs; return one table row."""
    import cv2

    path = wsi_dir / entry.relpath
    with open_slide(path, mpp=entry.mpp_override) as slide:
        seg = segment_slide(slide, None, entry.slide_id, TissueConfig())
        tissue = seg.tissue
        # The overlay is drawn on a thumbnail of max_side px (finer than the mask when the mask is
        # small), with the mask resized onto it by nearest neighbour.
        thumbnail = slide.thumbnail(max_side)
        mask_on_thumb = cv2.resize(
            tissue.mask, thumbnail.shape[1::-1], interpolation=cv2.INTER_NEAREST
        )
        overlay = tissue_overlay(thumbnail, replace(tissue, mask=mask_on_thumb))
        mask_png = out_dir / f"{entry.slide_id}_mask.png"
        overlay_png = out_dir / f"{entry.slide_id}_overlay.png"
        write_png(mask_png, _fit(tissue.mask * 255, max_side, nearest=True))
        _write_palette_png(overlay_png, overlay)
        row = {
            "slide_id": entry.slide_id,
            "file": entry.relpath,
            "backend": slide.backend,
            "vendor": slide.vendor,
            "dimensions": slide.dimensions,
            "levels": slide.level_dimensions,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "override_reason": entry.override_reason,
            "note": entry.note,
            "mask_shape": tissue.mask.shape,
            "seg_downsample": tissue.downsample[0],
            "threshold": tissue.threshold,
            "tissue_fraction": tissue.tissue_fraction,
            "regions": len(tissue.polygons),
            "artefact_fraction": tissue.artefact_fraction,
        }
        try:
            grid = build_patch_grid(slide, tissue, entry.slide_id, PATCH)
            row.update(
                patches=len(grid.coords),
                grid_patches=grid.extra["grid_patches"],
                patch_level=grid.patch_level,
                patch_size_level0=grid.patch_size_level0,
                patch_note="",
            )
        except WSIError as exc:
            row.update(patches=0, grid_patches=0, patch_level=None, patch_size_level0=None)
            note = f"no grid at {PATCH.patch_size} px @ {PATCH.target_mpp} µm/px: {exc.reason}"
            if entry.fallback is not None:
                fb = build_patch_grid(slide, tissue, entry.slide_id, entry.fallback)
                note += (
                    f"; at {fb.patch_size} px @ {fb.mpp:g} µm/px (a setting the tests use): "
                    f"{len(fb.coords)} of {fb.extra['grid_patches']} patches"
                )
            row["patch_note"] = note
    return row


def _markdown(rows: list[dict], out_dir: Path, md_path: Path) -> str:
    rel = Path(os.path.relpath(out_dir, md_path.parent)).as_posix()
    lines = [
        "# Shared whole-slide images: tissue masks and patch counts",
        "",
        f"Generated {dt.date.today().isoformat()} by `python benchmarks/wsi_shared_report.py` "
        "(default `TissueConfig`; patch grid 256 px @ 0.5 µm/px, patches kept with >= 25% tissue). "
        f"Mask and overlay PNGs: [`{rel}/`]({rel}/).",
        "",
        "| slide | backend (vendor) | dimensions (w x h) | levels | level-0 mpp (µm/px) | tissue fraction | "
        "patches 256 px @ 0.5 µm/px (of grid) | patch level |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        levels = ", ".join(f"{w}x{h}" for w, h in r["levels"])
        source = "**user override**" if r["mpp_source"] == "user" else r["mpp_source"]
        patches = f"{r['patches']} ({r['grid_patches']})" if r["grid_patches"] else "0 (no grid, see note)"
        lines.append(
            f"| `{r['file']}` | {r['backend']} ({r['vendor']}) | {r['dimensions'][0]} x {r['dimensions'][1]} | "
            f"{len(r['levels'])}: {levels} | {r['mpp']:.4g} ({source}) | {r['tissue_fraction']:.3f} | "
            f"{patches} | {'' if r['patch_level'] is None else r['patch_level']} |"
        )
    lines += ["", "Notes per slide:", ""]
    for r in rows:
        parts = [
            f"mask {r['mask_shape'][1]}x{r['mask_shape'][0]} px at downsample {r['seg_downsample']:.2f}, "
            f"saturation threshold {r['threshold']}, {r['regions']} tissue region(s), "
            f"{100 * r['artefact_fraction']:.2f}% removed as pen/black artefact"
        ]
        if r["override_reason"]:
            parts.append(f"mpp override: {r['override_reason']}")
        if r["patch_note"]:
            parts.append(r["patch_note"])
        if r["note"]:
            parts.append(r["note"])
        lines.append(f"- `{r['file']}`: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wsi-dir", type=Path, default=None, help="default: <shared data>/wsi")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/wsi_shared")
    parser.add_argument("--md", type=Path, default=ROOT / "benchmarks/results/wsi_shared.md")
    parser.add_argument("--max-side", type=int, default=800, help="longest side of the PNGs, px")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wsi_dir = args.wsi_dir or data_root() / "wsi"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [report_slide(entry, wsi_dir, args.out.resolve(), args.max_side) for entry in SLIDES]
    text = _markdown(rows, args.out.resolve(), args.md.resolve())
    args.md.parent.mkdir(parents=True, exist_ok=True)
    if args.md.is_file() and VISUAL_CHECK in args.md.read_text():
        # The visual check is written by a person looking at the PNGs: keep it across re-runs.
        text += "\n" + VISUAL_CHECK + args.md.read_text().split(VISUAL_CHECK, 1)[1]
    args.md.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
