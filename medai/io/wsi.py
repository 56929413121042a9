"""Whole-slide images behind one reader: OpenSlide, tiffslide or wsidicom, chosen automatically.

`open_slide(path)` tries OpenSlide (C, fastest; Aperio, Hamamatsu, MIRAX, generic TIFF, DICOM),
then tiffslide (pure Python over tifffile: SVS and TIFF variants OpenSlide refuses), then
wsidicom (DICOM VL Whole Slide Microscopy files or folders). When none opens the file the
WSIOpenError lists every backend's reason.

Physical scale is explicit and never guessed: `WholeSlide.mpp` is the level-0 resolution in
µm/px from the vendor's metadata, or the value the user passed, or None. A resolution that is
present but not physical (a TIFF's default 72 dpi, or a value no microscope produces) is treated
as absent, with a warning. Code that needs a physical scale calls `require_mpp()`, which raises
MppUnknownError naming the file and the flag that overrides it.

Regions come back as RGB uint8 arrays (H, W, 3); transparent pixels (outside scanned areas)
are composited on white, as glass looks. A tile that fails to decode raises WSIReadError. OpenSlide
reports truncated JPEG tiles ('Corrupt JPEG data'); tiffslide (imagecodecs) decodes them silently
into wrong pixels, one more reason OpenSlide comes first.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medai.errors import InputFileError, MedaiError
from medai.utils import optional_import

log = logging.getLogger(__name__)

BACKENDS = ("openslide", "tiffslide", "wsidicom")
# Level-0 mpp a real scanner can produce: 0.05 µm/px (oil immersion, 200x) to 50 µm/px (macro-only scans).
PLAUSIBLE_MPP = (0.05, 50.0)
# Resolution a TIFF writer puts in by default, with no optics behind it.
_DEFAULT_DPI = (72.0, 96.0, 150.0, 300.0, 600.0)
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
    ".dicom",
)


class WSIError(InputFileError):
    """A whole-slide image problem; names the file and what is wrong."""


class WSIOpenError(WSIError):
    """No backend could open the file (missing, unsupported vendor, or corrupt header)."""


class MppUnknownError(WSIError):
    """The slide has no usable microns-per-pixel and the user gave none."""

    def __init__(self, path: str | Path, detail: str = ""):
        reason = "microns per pixel unknown" + (f" ({detail})" if detail else "")
        reason += (
            "; pass the slide's level-0 resolution with --mpp (or an 'mpp' column in the slide CSV)"
        )
        super().__init__(path, reason)


class WSIReadError(WSIError):
    """A region could not be read: corrupt or truncated tiles, missing level, out of bounds."""


class NoTissueError(WSIError):
    """Tissue detection found no tissue (blank slide, wrong stain, or a failed scan)."""


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is: backend, vendor, pyramid, physical scale and associated images."""

    path: str
    backend: str
    vendor: str
    dimensions: tuple[int, int]  # level 0 (width, height) in px
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None  # level-0 µm/px, None when unknown
    mpp_source: str | None  # "vendor", "user" or None
    objective_power: float | None
    associated_images: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe mapping."""
        return asdict(self)


def _to_rgb(image: Any) -> np.ndarray:
    """Return a PIL image or array as RGB uint8, compositing any alpha channel on white."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:
        if array[..., 3].min() == 255:  # fully opaque (the usual case): no compositing needed
            return np.ascontiguousarray(array[..., :3])
        alpha = array[..., 3:4].astype(np.uint16)
        rgb = array[..., :3].astype(np.uint16)
        # OpenSlide returns premultiplied RGBA: colour + (255 - alpha) is the white composite.
        array = np.minimum(rgb + (255 - alpha), 255).astype(np.uint8)
    return np.ascontiguousarray(array[..., :3], dtype=np.uint8)


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


class WholeSlide(ABC):
    """A whole-slide image opened by one backend; use `open_slide` to get one."""

    backend = "base"

    def __init__(self, path: str | Path, mpp: float | None = None):
        self.path = Path(path)
        self._user_mpp = mpp
        self.notes: list[str] = []

    # --- backend hooks -------------------------------------------------------------------
    vendor: str = "unknown"
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]

    @abstractmethod
    def _read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read RGBA/RGB pixels of `size` at `location` (level-0 coordinates) from `level`."""

    @abstractmethod
    def _vendor_mpp(self) -> tuple[float | None, float | None]:
        """Return (mpp_x, mpp_y) in µm/px as the scanner recorded it, or None where absent."""

    def _associated(self) -> dict[str, Callable[[], Any]]:
        return {}

    def close(self) -> None:
        """Release the backend's file handles."""

    # --- common API ----------------------------------------------------------------------
    def __enter__(self) -> WholeSlide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def objective_power(self) -> float | None:
        """Scanning objective magnification from the vendor metadata, if given."""
        for key in ("openslide.objective-power", "aperio.AppMag"):
            value = _float_or_none(self.properties.get(key))
            if value:
                return value
        return None

    def _resolve_mpp(self) -> None:
        mpp_x, mpp_y = self._vendor_mpp()
        vendor_mpp = None
        if mpp_x and mpp_y:
            if abs(mpp_x - mpp_y) / max(mpp_x, mpp_y) > 0.02:
                self.notes.append(
                    f"anisotropic pixels: mpp-x {mpp_x:.4f}, mpp-y {mpp_y:.4f}; using their mean"
                )
            vendor_mpp = (mpp_x + mpp_y) / 2
        elif mpp_x or mpp_y:
            vendor_mpp = mpp_x or mpp_y
        if vendor_mpp is not None:
            reason = self._implausible_mpp_reason(vendor_mpp)
            if reason:
                self.notes.append(f"ignored metadata mpp {vendor_mpp:.4g} µm/px: {reason}")
                log.warning(
                    "%s: ignoring mpp %.4g µm/px from metadata (%s)",
                    self.path.name,
                    vendor_mpp,
                    reason,
                )
                vendor_mpp = None
        self.vendor_mpp = vendor_mpp
        if self._user_mpp is not None:
            if not (PLAUSIBLE_MPP[0] <= self._user_mpp <= PLAUSIBLE_MPP[1]):
                raise WSIError(
                    self.path, f"--mpp {self._user_mpp} is outside {PLAUSIBLE_MPP} µm/px"
                )
            if vendor_mpp and abs(vendor_mpp - self._user_mpp) / vendor_mpp > 0.05:
                log.warning(
                    "%s: user mpp %.4f overrides the slide's %.4f µm/px",
                    self.path.name,
                    self._user_mpp,
                    vendor_mpp,
                )
            self.mpp, self.mpp_source = float(self._user_mpp), "user"
        elif vendor_mpp is not None:
            self.mpp, self.mpp_source = float(vendor_mpp), "vendor"
        else:
            self.mpp, self.mpp_source = None, None

    def _implausible_mpp_reason(self, mpp: float) -> str | None:
        if not (PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]):
            return (
                f"outside the range scanners produce, {PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} µm/px"
            )
        unit = str(self.properties.get("tiff.ResolutionUnit", "")).lower()
        if self.vendor in ("generic-tiff", "unknown", "") and unit:
            dpi = 25400.0 / mpp
            if any(abs(dpi - d) < 0.5 for d in _DEFAULT_DPI):
                return f"a default {dpi:.0f} dpi TIFF resolution, not a scanner's"
        return None

    def require_mpp(self) -> float:
        """Return level-0 µm/px, or raise MppUnknownError naming the file and the override flag."""
        if self.mpp is None:
            raise MppUnknownError(
                self.path, "; ".join(self.notes) or "no resolution in the slide's metadata"
            )
        return self.mpp

    @property
    def associated_images(self) -> tuple[str, ...]:
        """Names of associated images (thumbnail, label, macro) the file carries."""
        return tuple(sorted(self._associated()))

    def associated_image(self, name: str) -> np.ndarray:
        """Return an associated image as RGB uint8; WSIReadError when the file has none by that name."""
        images = self._associated()
        if name not in images:
            raise WSIReadError(
                self.path,
                f"no associated image '{name}' (has: {', '.join(sorted(images)) or 'none'})",
            )
        return _to_rgb(images[name]())

    def info(self) -> SlideInfo:
        """Return a SlideInfo summary."""
        return SlideInfo(
            path=str(self.path),
            backend=self.backend,
            vendor=self.vendor,
            dimensions=tuple(self.dimensions),
            level_count=self.level_count,
            level_dimensions=tuple(tuple(d) for d in self.level_dimensions),
            level_downsamples=tuple(float(d) for d in self.level_downsamples),
            mpp=self.mpp,
            mpp_source=self.mpp_source,
            objective_power=self.objective_power,
            associated_images=self.associated_images,
            notes=tuple(self.notes),
        )

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Return RGB uint8 (h, w, 3) of `size` (w, h) at `level`, top-left `location` in level-0 px."""
        if not 0 <= level < self.level_count:
            raise WSIReadError(
                self.path, f"level {level} does not exist (levels 0-{self.level_count - 1})"
            )
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise WSIReadError(self.path, f"empty region size {size}")
        try:
            with warnings.catch_warnings():
                # libjpeg reports truncated tiles as warnings ('Corrupt JPEG data'): a wrong
                # patch must fail the slide, not be silently embedded as grey.
                warnings.simplefilter("error")
                region = self._read_region((int(location[0]), int(location[1])), level, (w, h))
        except WSIError:
            raise
        except Exception as exc:  # every backend has its own error types
            raise WSIReadError(
                self.path,
                f"cannot read {w}x{h} at {tuple(location)} level {level}: {type(exc).__name__}: {exc}",
            ) from exc
        if region.shape[:2] != (h, w):
            raise WSIReadError(self.path, f"backend returned {region.shape[:2]} for a {h}x{w} read")
        return region

    def best_level_for_downsample(self, downsample: float) -> int:
        """Return the coarsest level whose downsample is <= `downsample` (1% tolerance)."""
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= downsample * 1.01:
                best = level
        return best

    def read_downsampled(self, downsample: float, chunk_px: int = 2048) -> np.ndarray:
        """Return the whole slide at `downsample` x level 0 as RGB uint8, read in chunks (bounded memory)."""
        import cv2

        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        level = self.best_level_for_downsample(downsample)
        level_ds = float(self.level_downsamples[level])
        level_w, level_h = self.level_dimensions[level]
        out_w = max(1, round(self.dimensions[0] / downsample))
        out_h = max(1, round(self.dimensions[1] / downsample))
        scale_x, scale_y = out_w / level_w, out_h / level_h
        out = np.full((out_h, out_w, 3), 255, np.uint8)
        for y in range(0, level_h, chunk_px):
            for x in range(0, level_w, chunk_px):
                cw, ch = min(chunk_px, level_w - x), min(chunk_px, level_h - y)
                x0, x1 = round(x * scale_x), round((x + cw) * scale_x)
                y0, y1 = round(y * scale_y), round((y + ch) * scale_y)
                if x1 <= x0 or y1 <= y0:
                    continue
                region = self.read_region(
                    (round(x * level_ds), round(y * level_ds)), level, (cw, ch)
                )
                out[y0:y1, x0:x1] = cv2.resize(
                    region, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA
                )
        return out

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """Return an RGB thumbnail whose longer side is at most `max_side` px (from the pyramid, not the file's)."""
        downsample = max(1.0, max(self.dimensions) / max_side)
        return self.read_downsampled(downsample)


class _OpenSlideFamily(WholeSlide):
    """OpenSlide and tiffslide share one API."""

    module_name = "openslide"

    def __init__(self, path: str | Path, mpp: float | None = None):
        super().__init__(path, mpp)
        module = optional_import(self.module_name, "reading whole-slide images", "wsi")
        self._module = module
        self._slide = self._open(module, str(self.path))
        self.properties = {
            str(k): str(v) for k, v in dict(self._slide.properties).items() if v is not None
        }
        self.dimensions = tuple(int(v) for v in self._slide.dimensions)
        self.level_dimensions = tuple(
            tuple(int(v) for v in d) for d in self._slide.level_dimensions
        )
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.vendor = self.properties.get(module.PROPERTY_NAME_VENDOR) or "unknown"
        self._resolve_mpp()

    def _open(self, module: Any, path: str) -> Any:
        return module.OpenSlide(path)

    def _vendor_mpp(self) -> tuple[float | None, float | None]:
        return (
            _float_or_none(self.properties.get(self._module.PROPERTY_NAME_MPP_X)),
            _float_or_none(self.properties.get(self._module.PROPERTY_NAME_MPP_Y)),
        )

    def _associated(self) -> dict[str, Callable[[], Any]]:
        images = self._slide.associated_images
        return {name: (lambda n=name: images[n]) for name in images}

    def _read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        return _to_rgb(self._slide.read_region(location, level, size))

    def close(self) -> None:
        """Release the backend's file handles."""
        self._slide.close()


class OpenSlideSlide(_OpenSlideFamily):
    """A slide read by OpenSlide (openslide-python with openslide-bin)."""

    backend = "openslide"
    module_name = "openslide"


class TiffSlideSlide(_OpenSlideFamily):
    """A slide read by tiffslide (tifffile + imagecodecs)."""

    backend = "tiffslide"
    module_name = "tiffslide"

    def __init__(self, path: str | Path, mpp: float | None = None):
        super().__init__(path, mpp)
        if self.vendor == "unknown" and "tiff.ResolutionUnit" in self.properties:
            self.vendor = "generic-tiff"
            self._resolve_mpp()

    def _open(self, module: Any, path: str) -> Any:
        return module.TiffSlide(path)

    def _read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        # tiffslide pads reads past the edge with black; clip and pad with white as OpenSlide does.
        ds = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        lx, ly = math.floor(location[0] / ds), math.floor(location[1] / ds)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + size[0], level_w), min(ly + size[1], level_h)
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            loc0 = (round(x0 * ds), round(y0 * ds)) if (x0, y0) != (lx, ly) else location
            inner = self._slide.read_region(loc0, level, (x1 - x0, y1 - y0), as_array=True)
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = _to_rgb(inner)
        return out


class WsiDicomSlide(WholeSlide):
    """A DICOM VL Whole Slide Microscopy image (a file or a folder of instances) read by wsidicom."""

    backend = "wsidicom"

    def __init__(self, path: str | Path, mpp: float | None = None):
        super().__init__(path, mpp)
        wsidicom = optional_import("wsidicom", "reading DICOM whole-slide images", "wsi")
        self._wsi = wsidicom.WsiDicom.open(str(self.path))
        levels = list(self._wsi.levels)
        if not levels:
            raise WSIOpenError(self.path, "DICOM file set has no pyramid levels")
        base = levels[0].size
        self.dimensions = (int(base.width), int(base.height))
        self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in levels)
        self.level_downsamples = tuple(base.width / lv.size.width for lv in levels)
        self._level_index = [lv.level for lv in levels]  # wsidicom addresses levels by 2^n scale
        self.vendor = "dicom"
        self.properties = {}
        try:
            dataset = self._wsi.levels[0].datasets[0]
        except (AttributeError, IndexError):
            dataset = None
        for key in ("Manufacturer", "ManufacturerModelName", "SeriesDescription"):
            value = getattr(dataset, key, None)
            if value:
                self.properties[f"dicom.{key}"] = str(value)
        self._resolve_mpp()

    def _vendor_mpp(self) -> tuple[float | None, float | None]:
        mpp = self._wsi.levels[0].mpp
        if mpp is None:
            return None, None
        return _float_or_none(mpp.width), _float_or_none(mpp.height)

    def _associated(self) -> dict[str, Callable[[], Any]]:
        out: dict[str, Callable[[], Any]] = {}
        if self._wsi.labels:
            out["label"] = lambda: self._wsi.read_label()
        if self._wsi.overviews:
            out["macro"] = lambda: self._wsi.read_overview()
        if getattr(self._wsi, "thumbnails", None):
            out["thumbnail"] = lambda: self._wsi.read_thumbnail()
        return out

    def _read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        # wsidicom takes the location in the requested level's pixels, OpenSlide in level 0's.
        ds = self.level_downsamples[level]
        loc = (math.floor(location[0] / ds), math.floor(location[1] / ds))
        return _to_rgb(self._wsi.read_region(loc, self._level_index[level], size))

    def close(self) -> None:
        """Release the backend's file handles."""
        self._wsi.close()


_BACKEND_CLASSES: dict[str, type[WholeSlide]] = {
    "openslide": OpenSlideSlide,
    "tiffslide": TiffSlideSlide,
    "wsidicom": WsiDicomSlide,
}


def _is_dicom(path: Path) -> bool:
    if path.is_dir():
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def open_slide(
    path: str | Path,
    mpp: float | None = None,
    backend: str | None = None,
    backends: Sequence[str] = BACKENDS,
) -> WholeSlide:
    """Open a whole-slide image with the first backend that reads it; `mpp` overrides level-0 µm/px."""
    path = Path(path)
    if not path.exists():
        raise WSIOpenError(path, "no such file or folder")
    order = [backend] if backend else list(backends)
    unknown = [b for b in order if b not in _BACKEND_CLASSES]
    if unknown:
        raise ValueError(f"unknown WSI backend(s) {unknown} (known: {', '.join(_BACKEND_CLASSES)})")
    if backend is None and path.is_dir() and "wsidicom" in order:
        order = ["wsidicom"] + [b for b in order if b != "wsidicom"]  # a folder is a DICOM file set
    reasons = []
    for name in order:
        if name != "wsidicom" and path.is_dir():
            reasons.append(f"{name}: needs a file, got a folder")
            continue
        if name == "wsidicom" and not _is_dicom(path):
            reasons.append("wsidicom: not a DICOM file")
            continue
        try:
            slide = _BACKEND_CLASSES[name](path, mpp=mpp)
        except WSIError:
            raise
        except MedaiError as exc:  # missing optional package: try the next backend
            reasons.append(f"{name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001  each backend signals 'not mine' with its own exception type
            reasons.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if slide.level_count == 0 or min(slide.dimensions) <= 0:
            slide.close()
            reasons.append(f"{name}: no image levels")
            continue
        log.debug("%s opened with %s", path.name, name)
        return slide
    raise WSIOpenError(path, "no backend could open it (" + "; ".join(reasons) + ")")


def dicom_slides_in(folder: str | Path) -> list[Path]:
    """Return the slides in a folder of DICOM files: the folder when it holds one series, else each file."""
    pydicom = optional_import("pydicom", "grouping DICOM WSI files", "dicom")
    folder = Path(folder)
    series: dict[tuple[str, str], list[Path]] = {}
    for file in sorted(f for f in folder.iterdir() if f.is_file() and _is_dicom(f)):
        header = pydicom.dcmread(
            file, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"]
        )
        key = (
            str(getattr(header, "StudyInstanceUID", "")),
            str(getattr(header, "SeriesInstanceUID", "")),
        )
        series.setdefault(key, []).append(file)
    if len(series) <= 1:
        return [folder] if series else []
    # Several series (e.g. one slide saved in three encodings) are several slides.
    return [files[0] if len(files) == 1 else folder for files in series.values()]


def list_slides(folder: str | Path) -> list[Path]:
    """Return slide files and DICOM slides directly inside `folder` (and its DICOM subfolders), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WSIOpenError(folder, "not a folder")
    if any(_is_dicom(f) for f in folder.iterdir() if f.is_file()):
        return dicom_slides_in(folder)
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in SLIDE_SUFFIXES:
            found.append(entry)
        elif entry.is_dir() and any(_is_dicom(f) for f in entry.iterdir() if f.is_file()):
            found.extend(dicom_slides_in(entry))
    return found
