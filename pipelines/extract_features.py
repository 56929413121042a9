"""Batch patch-feature extraction over many slides: resumable, locked per slide, one bad slide never stops it.

For each slide: open (any backend) -> tissue mask -> patch grid at the target µm/px -> encoder
features, written to `<out>/features/<slide_id>.h5` (`features` + `coords`, layout in
medai.io.patch_h5) through a temporary file renamed into place, so a file with the final name is
always complete. Stages and their files:

    <out>/tissue/<id>_{mask,overlay}.png, <id>.geojson     tissue (pipelines.slides)
    <out>/patches/<id>.h5, <id>_patches.png                 coordinates (reused when they match)
    <out>/features/<id>.h5                                  features + coords
    <out>/status/<id>.json                                  per-slide state: done / failed, error, timings
    <out>/locks/<id>.lock                                   held (flock) while a worker works on the slide
    <out>/run_summary.json                                  this run's tally and per-slide outcome

Concurrency: any number of workers (processes, machines sharing a POSIX file system) can run the
same command. A slide is taken with an exclusive, non-blocking `flock` on its lock file; the
kernel drops the lock when its holder dies (SIGKILL, OOM, power), so stale locks are reclaimed
by construction, and there is no check-then-create window (TRIDENT's lock has one). Finished
slides (complete feature file present) are skipped unless `overwrite`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from medai.errors import MedaiError
from medai.io.patch_h5 import (
    PatchFileError,
    PatchGrid,
    is_complete_feature_file,
    read_coords_h5,
)
from medai.io.wsi import WholeSlide, list_slides, open_slide
from medai.transforms.tissue import TissueConfig
from medai.utils import atomic_write, file_identity, optional_import
from medai.pipelines.slides import PatchConfig, patch_slide

log = logging.getLogger(__name__)


@dataclass
class EncoderConfig:
    """Patch encoder: a registered medai model or `timm:<name>`, with weights by tag or safetensors path."""

    name: str = "efficientnet_lite0"
    # "auto": the model's ImageNet weights when it has them, else its random initialisation (said in a warning)
    pretrained: str | None = "auto"
    mean: tuple[float, float, float] | None = None  # default: the model's pretrained_cfg
    std: tuple[float, float, float] | None = None


@dataclass
class ExtractConfig:
    """Everything one extraction run needs; YAML-loadable with medai.config.load_config."""

    out_dir: Path
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    overwrite: bool = False
    backend: str | None = None
    progress: bool = True


@dataclass
class SlideEntry:
    """One slide to process, with optional per-slide overrides from the slide CSV."""

    path: Path
    slide_id: str
    mpp: float | None = None  # level-0 µm/px override
    target_mpp: float | None = None  # patch resolution override


def slide_id_for(path: Path) -> str:
    """Return a slide's id: the file name without its extension; a DICOM folder's name; folder_file for a DICOM file."""
    if path.is_dir():
        return path.name
    stem = path.name.rsplit(".", 1)[0]
    if path.suffix.lower() in (".dcm", ".dicom", ""):
        return (
            f"{path.parent.name}_{stem}"  # DICOM file names (1.dcm, jpeg.dicom) mean little alone
        )
    return stem


def _optional_float(value: str | None, where: str) -> float | None:
    if value is None or str(value).strip() in ("", "nan", "NA", "None"):
        return None
    try:
        return float(value)
    except ValueError as exc:
        raise MedaiError(f"{where}: not a number: {value!r}") from exc


def read_slide_list(
    items: Sequence[str | Path] = (), csv_path: str | Path | None = None, default_mpp: float | None = None
) -> list[SlideEntry]:
    """Return slides from paths/folders and/or a CSV (`path`[, `slide_id`, `mpp`, `target_mpp`]).

    `default_mpp` (level-0 µm/px) applies to every slide without a CSV value; no slides at all is an error.
    """
    entries: list[SlideEntry] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            entries.extend(SlideEntry(p, slide_id_for(p)) for p in list_slides(path))
        else:
            entries.append(SlideEntry(path, slide_id_for(path)))
    if csv_path is not None:
        csv_path = Path(csv_path)
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise MedaiError(f"{csv_path}: needs a 'path' column (has: {reader.fieldnames})")
            for lineno, row in enumerate(reader, 2):
                path = Path(row["path"])
                if not path.is_absolute():
                    path = csv_path.parent / path
                where = f"{csv_path}:{lineno}"
                entries.append(
                    SlideEntry(
                        path,
                        (row.get("slide_id") or "").strip() or slide_id_for(path),
                        _optional_float(row.get("mpp"), where),
                        _optional_float(row.get("target_mpp"), where),
                    )
                )
    seen: dict[str, Path] = {}
    for entry in entries:
        if entry.slide_id in seen and seen[entry.slide_id] != entry.path:
            raise MedaiError(
                f"two slides share the id '{entry.slide_id}': {seen[entry.slide_id]} and {entry.path}; "
                "give them distinct slide_id values in a CSV"
            )
        seen[entry.slide_id] = entry.path
        if entry.mpp is None:
            entry.mpp = default_mpp
    unique = list({e.slide_id: e for e in entries}.values())
    if not unique:
        raise MedaiError("no slides given (pass slide files, folders of slides or a CSV)")
    return unique


# --- encoder --------------------------------------------------------------------------------
@dataclass
class Encoder:
    """A patch encoder ready to run: module, normalisation, output width, and its description."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    feature_dim: int
    name: str
    pretrained: str

    @functools.cached_property
    def weights_sha256(self) -> str:
        """Digest of the encoder's parameters and buffers: the same tag can hold other weights."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """Build the patch encoder (classifier removed) in eval mode; normalisation from its pretrained config."""
    if cfg.name.startswith("timm:"):
        import timm

        from medai.models.registry import load_weights

        model = timm.create_model(cfg.name[len("timm:") :], pretrained=False, num_classes=0)
        if cfg.pretrained:
            load_weights(
                model, cfg.pretrained
            )  # a local pathology encoder checkpoint (safetensors)
    else:
        from medai.models.registry import create_feature_extractor, model_entry

        if cfg.pretrained == "auto":
            tags = model_entry(cfg.name).pretrained
            cfg = dataclasses.replace(cfg, pretrained="imagenet" if "imagenet" in tags else None)
            if cfg.pretrained is None:
                log.warning("%s has no ImageNet weights (tags: %s): its features come from random weights, "
                            "useful for testing the pipeline only", cfg.name, ", ".join(tags) or "none")
        model = create_feature_extractor(cfg.name, pretrained=cfg.pretrained)
        model.reset_classifier(0)
    pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.mean or pretrained_cfg.get("mean") or (0.485, 0.456, 0.406))
    std = tuple(cfg.std or pretrained_cfg.get("std") or (0.229, 0.224, 0.225))
    feature_dim = int(getattr(model, "num_features", 0))
    model.eval()
    if not feature_dim:
        with torch.inference_mode():
            feature_dim = int(model(torch.zeros(1, 3, 64, 64)).shape[-1])
    return Encoder(model, mean, std, feature_dim, cfg.name, str(cfg.pretrained))


# --- tiles ----------------------------------------------------------------------------------
class PatchDataset(torch.utils.data.Dataset):
    """Patches of one slide as uint8 CHW tensors; each DataLoader worker opens its own slide handle."""

    def __init__(
        self,
        path: Path,
        coords: np.ndarray,
        level: int,
        read_size: int,
        patch_size: int,
        mpp: float | None = None,
        backend: str | None = None,
    ):
        self.path, self.coords, self.level = path, coords, level
        self.read_size, self.patch_size, self.mpp, self.backend = (
            read_size,
            patch_size,
            mpp,
            backend,
        )
        self._slide: WholeSlide | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        import cv2

        if self._slide is None:
            self._slide = open_slide(self.path, mpp=self.mpp, backend=self.backend)
        x, y = self.coords[index]
        tile = self._slide.read_region(
            (int(x), int(y)), self.level, (self.read_size, self.read_size)
        )
        if self.read_size != self.patch_size:
            shrink = self.read_size > self.patch_size
            tile = cv2.resize(
                tile,
                (self.patch_size, self.patch_size),
                interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
            )
        return torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1), index

    def close(self) -> None:
        """Close this process's slide handle (workers' handles close with the workers)."""
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slide"] = None  # never share an open handle across processes
        return state


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _tqdm(**kwargs: Any):
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


def encode_patches(
    dataset: PatchDataset,
    encoder: Encoder,
    sink: Any,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | None = None,
    precision: str = "auto",
    progress: bool = True,
    desc: str = "",
) -> int:
    """Encode every patch of `dataset` and write rows into `sink[start:stop]`; return patches encoded."""
    device = device or torch.device("cpu")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context="fork" if num_workers > 0 and os.name == "posix" else None,
    )
    mean = torch.tensor(encoder.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(encoder.std, device=device).view(1, 3, 1, 1) * 255
    done = 0
    bar = _tqdm(total=len(dataset), desc=desc, unit="patch", leave=False, disable=not progress)
    buffer: torch.Tensor | None = None
    with torch.inference_mode():
        for tiles, index in loader:
            # Normalise into one reused float buffer: a fresh 25 MB tensor per batch makes glibc's
            # heap creep upwards over thousands of batches (its mmap threshold adapts upwards).
            if (
                buffer is None
                or buffer.shape[1:] != tiles.shape[1:]
                or buffer.shape[0] < len(tiles)
            ):
                buffer = torch.empty(tiles.shape, dtype=torch.float32, device=device)
            batch = buffer[: len(tiles)]
            batch.copy_(tiles.to(device, non_blocking=True)).sub_(mean).div_(std)
            with _autocast(device, precision):
                features = encoder.model(batch)
            start, stop = int(index[0]), int(index[-1]) + 1
            sink[start:stop] = features.float().cpu().numpy()
            done += len(tiles)
            bar.update(len(tiles))
    bar.close()
    dataset.close()
    return done


# --- locking and status -------------------------------------------------------------------
class SlideLock:
    """An exclusive, non-blocking flock on `<lock_dir>/<slide_id>.lock`; released by the kernel if we die."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when a live worker holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # A finishing worker unlinks the file it held; if ours was unlinked meanwhile, retry on the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
            ).encode()
            os.ftruncate(fd, 0)
            os.write(fd, info)
            self._fd = fd
            return True

    def release(self) -> None:
        """Remove the lock file and drop the lock."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # unlink while still holding it: see acquire()
        os.close(self._fd)
        self._fd = None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and rename."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def _remove_stale_temporaries(folder: Path, slide_id: str) -> int:
    """Delete temporaries of `slide_id` left by a killed worker (we hold the slide's lock).

    `medai.utils.atomic_write` names them `.<slide_id>.h5.<pid>.<random>.tmp`.
    """
    removed = 0
    if folder.is_dir():
        for tmp in folder.glob(f".{slide_id}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


# --- one slide ----------------------------------------------------------------------------
def _load_matching_coords(
    path: Path, patch_cfg: PatchConfig, slide: WholeSlide
) -> PatchGrid | None:
    """Reuse an existing coordinates file when it was made at the same patch size and resolution."""
    if not path.is_file():
        return None
    try:
        coords, attrs = read_coords_h5(path)
    except PatchFileError as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    if (
        int(attrs.get("patch_size", -1)) != patch_cfg.patch_size
        or abs(float(attrs.get("mpp", -1)) - patch_cfg.target_mpp) > 1e-6
    ):
        return None
    if "patch_size_level0" not in attrs:
        return None
    level = int(attrs["patch_level"])
    if level >= slide.level_count:
        return None
    size0 = int(attrs["patch_size_level0"])
    read_size = int(round(size0 / slide.level_downsamples[level]))
    return PatchGrid(
        coords=coords,
        patch_size=patch_cfg.patch_size,
        patch_level=level,
        patch_size_level0=size0,
        level0_mpp=float(attrs.get("level0_mpp", slide.mpp or 0)),
        mpp=patch_cfg.target_mpp,
        level_dim=tuple(slide.dimensions),
        name=str(attrs.get("name", path.stem)),
        mpp_source=str(attrs.get("mpp_source", slide.mpp_source)),
        extra={"read_size": read_size},
    )


def extract_slide(
    entry: SlideEntry, cfg: ExtractConfig, encoder: Encoder, device: torch.device,
    identity: dict[str, Any] | None = None, reuse_patches: bool = True,
) -> dict[str, Any]:
    """Segment, patch and encode one slide into features/<slide_id>.h5 (its work identity stored); return its status."""
    identity = identity if identity is not None else work_identity(entry, cfg, encoder)
    h5py = optional_import("h5py", "feature extraction", "wsi")
    out = Path(cfg.out_dir)
    final = out / "features" / f"{entry.slide_id}.h5"
    patch_cfg = PatchConfig(**cfg.patch.__dict__)
    if entry.target_mpp is not None:
        patch_cfg.target_mpp = entry.target_mpp
    started = time.perf_counter()
    record: dict[str, Any] = {"slide_id": entry.slide_id, "path": str(entry.path)}
    with open_slide(entry.path, mpp=entry.mpp, backend=cfg.backend) as slide:
        record.update(
            backend=slide.backend,
            vendor=slide.vendor,
            level0_mpp=slide.mpp,
            mpp_source=slide.mpp_source,
        )
        slide.require_mpp()
        grid = (
            None
            if cfg.overwrite or not reuse_patches
            else _load_matching_coords(out / "patches" / f"{entry.slide_id}.h5", patch_cfg, slide)
        )
        if grid is None:
            grid, _ = patch_slide(slide, out, entry.slide_id, cfg.tissue, patch_cfg)
        else:
            log.info("%s: reusing %d coordinates from patches/", entry.slide_id, len(grid.coords))
    record.update(
        n_patches=len(grid.coords),
        patch_level=grid.patch_level,
        patch_size_level0=grid.patch_size_level0,
    )
    t_patch = time.perf_counter()
    dataset = PatchDataset(
        entry.path,
        grid.coords,
        grid.patch_level,
        grid.read_size,
        grid.patch_size,
        mpp=entry.mpp,
        backend=cfg.backend,
    )
    with atomic_write(final) as tmp, h5py.File(tmp, "w") as handle:
        coords = handle.create_dataset("coords", data=grid.coords.astype(np.int64))
        for key, value in grid.attrs().items():
            coords.attrs[key] = value
            handle.attrs[key] = value
        # Rows are written batch by batch: memory stays flat whatever the slide's size.
        features = handle.create_dataset(
            "features",
            shape=(len(grid.coords), encoder.feature_dim),
            dtype=np.float32,
            chunks=(min(len(grid.coords), 256), encoder.feature_dim),
        )
        features.attrs.update(
            encoder=encoder.name, pretrained=encoder.pretrained, feature_dim=encoder.feature_dim
        )
        encode_patches(
            dataset,
            encoder,
            features,
            cfg.batch_size,
            cfg.num_workers,
            device,
            cfg.precision,
            cfg.progress,
            desc=entry.slide_id,
        )
        handle.attrs["work_identity"] = json.dumps(identity, sort_keys=True)
        handle.attrs["complete"] = True
    elapsed = time.perf_counter() - started
    record.update(
        state="done",
        features=str(final),
        feature_dim=encoder.feature_dim,
        seconds=round(elapsed, 2),
        encode_patches_per_s=round(len(grid.coords) / max(time.perf_counter() - t_patch, 1e-9), 2),
    )
    return record


def work_identity(entry: SlideEntry, cfg: ExtractConfig, encoder: Encoder) -> dict[str, Any]:
    """What shapes a slide's features: its file(s) (name, size, mtime) and every setting that changes the output."""
    patch = dataclasses.asdict(cfg.patch)
    if entry.target_mpp is not None:
        patch["target_mpp"] = entry.target_mpp
    return {
        "source": file_identity(entry.path),
        "mpp_override": entry.mpp,
        "tissue": dataclasses.asdict(cfg.tissue),
        "patch": patch,
        "backend": cfg.backend,
        "encoder": encoder.name,
        "pretrained": encoder.pretrained,
        "weights_sha256": encoder.weights_sha256,
        "normalisation": [list(encoder.mean), list(encoder.std)],
        "precision": cfg.precision,
    }


def finished_identity(path: Path) -> dict[str, Any] | None:
    """The work identity stored in a complete feature file; None when unfinished or written without one."""
    if not is_complete_feature_file(path):
        return None
    h5py = optional_import("h5py", "feature extraction", "wsi")
    with h5py.File(path, "r") as handle:
        stored = handle.attrs.get("work_identity")
    return json.loads(stored) if stored else {}


def _changed(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))


def _error_record(entry: SlideEntry, exc: BaseException) -> dict[str, Any]:
    reason = getattr(exc, "reason", None) or str(exc)
    return {
        "slide_id": entry.slide_id,
        "path": str(entry.path),
        "state": "failed",
        "error_type": type(exc).__name__,
        "error": str(reason).strip().splitlines()[-1]
        if str(reason).strip()
        else type(exc).__name__,
        "error_detail": str(exc)[-2000:],
    }


def run_extraction(
    entries: Iterable[SlideEntry], cfg: ExtractConfig, encoder: Encoder | None = None
) -> dict[str, Any]:
    """Process every slide (skipping finished or locked ones), record each outcome; return the run summary.

    `encoder` reuses an already built encoder (it must match `cfg.encoder`); default: built from `cfg.encoder`.
    """
    entries = list(entries)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _resolve_device(cfg.device)
    encoder = encoder or build_encoder(cfg.encoder)
    encoder.model.to(device)
    started = _now()
    outcomes: list[dict[str, Any]] = []
    bar = _tqdm(total=len(entries), desc="slides", unit="slide", disable=not cfg.progress)
    for entry in entries:
        final = out / "features" / f"{entry.slide_id}.h5"
        status_path = out / "status" / f"{entry.slide_id}.json"
        try:
            identity = work_identity(entry, cfg, encoder)
        except OSError as exc:  # the slide file vanished or can't be read: this slide fails, the others go on
            record = _error_record(entry, exc)
            record["finished_at"] = _now()
            write_json_atomic(status_path, record)
            outcomes.append(record)
            bar.update(1)
            continue
        stored = None if cfg.overwrite else finished_identity(final)
        if stored == identity:
            outcomes.append({"slide_id": entry.slide_id, "state": "skipped",
                             "reason": "already done with this slide file and these settings"})
            bar.update(1)
            continue
        lock = SlideLock(out / "locks" / f"{entry.slide_id}.lock")
        if not lock.acquire():
            outcomes.append(
                {"slide_id": entry.slide_id, "state": "locked", "reason": "another worker holds it"}
            )
            bar.update(1)
            continue
        try:
            # Re-check under the lock: another worker may have finished it since the check above.
            stored = None if cfg.overwrite else finished_identity(final)
            if stored == identity:
                outcomes.append({"slide_id": entry.slide_id, "state": "skipped",
                                 "reason": "already done with this slide file and these settings"})
                continue
            changed = _changed(stored, identity) if stored is not None else []
            if changed:
                log.info("%s: recomputing, the earlier features came from other %s", entry.slide_id, ", ".join(changed))
            for folder in (out / "features", out / "patches", out / "status"):
                if _remove_stale_temporaries(folder, entry.slide_id):
                    log.info("%s: removed temporaries of an interrupted run", entry.slide_id)
            try:
                # patches are reused only when the slide file, tissue and patch settings are the same
                same_grid = stored is not None and not ({"source", "mpp_override", "tissue", "patch", "backend"} & set(changed))
                record = extract_slide(entry, cfg, encoder, device, identity, reuse_patches=same_grid or stored is None)
                if changed:
                    record["recomputed_because"] = changed
            # One bad slide never stops the batch; Ctrl-C and SIGTERM (BaseException) still do.
            except Exception as exc:  # noqa: BLE001
                record = _error_record(entry, exc)
                log.warning(
                    "%s failed: %s: %s", entry.slide_id, record["error_type"], record["error"]
                )
            record["finished_at"] = _now()
            write_json_atomic(status_path, record)
            outcomes.append(record)
        finally:
            lock.release()
            bar.update(1)
    bar.close()
    counts: dict[str, int] = {}
    for item in outcomes:
        counts[item["state"]] = counts.get(item["state"], 0) + 1
    summary = {
        "started": started,
        "finished": _now(),
        "out_dir": str(out),
        "encoder": {
            "name": encoder.name,
            "pretrained": encoder.pretrained,
            "feature_dim": encoder.feature_dim,
        },
        "device": str(device),
        "counts": counts,
        "slides": outcomes,
    }
    write_json_atomic(out / "run_summary.json", summary)
    return summary
