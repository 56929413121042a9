"""Multiple-instance bags from files: MIL-toolbox .mat sets, bag CSVs, SICAPv2 feature CSVs, CLAM HDF5.

Every reader returns `MILBag` records (features (N, D) float32, a bag label, optional patch
coordinates in level-0 pixels and optional instance labels), one per bag, N varying per bag.
Malformed files raise `MILDataError` naming the file and what is wrong.

On-disk layouts read here:
- MIL-toolbox struct (`x['data']`, `x['ident']['milbag']`, `x['nlab']` 1 = negative, 2 = positive),
  as in the classic Musk / Fox / Tiger sets;
- a bag CSV: one row per instance, columns `bag_id`, `label` and numeric feature columns;
- SICAPv2 feature CSVs (arneschmidt/attention_gp layout): `feature_*`, `instance_name`
  (patch file name carrying `xini_X_yini_Y`), `instance_label`, `bag_name`, `bag_label_primary`;
- CLAM/TRIDENT HDF5 per slide: `features` (N, D), `coords` (N, 2) level-0 (x, y) of each patch;
- slide labels CSV: `slide_id,label`; splits CSV: `slide_id,split` (train / val / test).
"""

from __future__ import annotations

import csv
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medai.errors import DatasetNotFoundError, InputFileError
from medai.utils import optional_import

log = logging.getLogger(__name__)


class MILDataError(InputFileError, ValueError):
    """A MIL bag file is malformed; names the file and the problem."""


@dataclass
class MILBag:
    """One bag: instance features (N, D) float32, its label, optional coords (N, 2) and instance labels."""

    bag_id: str
    features: np.ndarray
    label: int
    coords: np.ndarray | None = None  # level-0 (x, y) pixels of each patch's top-left corner
    instance_labels: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_instances(self) -> int:
        """Number of instances N."""
        return int(self.features.shape[0])


def _require(path: Path) -> Path:
    if not path.exists():
        raise DatasetNotFoundError(path)
    return path


def read_mil_toolbox_mat(path: str | Path) -> list[MILBag]:
    """Read a MIL-toolbox `.mat` dataset (Musk, Fox, Tiger, ...) into bags, label 1 = positive (nlab 2), 0 = negative."""
    path = _require(Path(path))
    scipy_io = optional_import("scipy.io", "reading MIL-toolbox .mat files", "train")
    try:
        struct = scipy_io.loadmat(str(path))["x"]
        data = np.asarray(struct["data"][0, 0], dtype=np.float32)
        bag_ids = struct["ident"][0, 0]["milbag"][0, 0]
        nlab = np.asarray(struct["nlab"][0, 0]).ravel()
    except (scipy_io.matlab.MatReadError, OSError, EOFError, zlib.error) as exc:
        # a cut or corrupt file: loadmat says 'could not read bytes' or the zlib of a compressed variable fails
        raise MILDataError(path, f"unreadable .mat file ({type(exc).__name__}: {exc})") from exc
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise MILDataError(path, f"not a MIL-toolbox struct 'x' with data/ident.milbag/nlab ({exc})") from exc
    bag_ids = np.array([str(np.asarray(b).ravel()[0]).strip() for b in bag_ids.reshape(-1, *bag_ids.shape[2:])])
    if not (len(bag_ids) == len(nlab) == len(data)):
        raise MILDataError(path, f"{len(data)} instances but {len(bag_ids)} bag ids and {len(nlab)} labels")
    if not set(np.unique(nlab)) <= {1, 2}:
        raise MILDataError(path, f"labels must be 1 (negative) / 2 (positive), found {sorted(set(np.unique(nlab)))}")
    order = list(dict.fromkeys(bag_ids))
    bags = []
    for bag in order:
        rows = np.flatnonzero(bag_ids == bag)
        labels = set(nlab[rows])
        if len(labels) != 1:
            raise MILDataError(path, f"bag {bag} has instances with different labels {sorted(labels)}")
        bags.append(MILBag(bag, data[rows], int(labels.pop()) - 1))
    return bags


def read_bag_csv(path: str | Path) -> list[MILBag]:
    """Read a bag CSV (one instance per row: bag_id, label, feature columns) into bags."""
    path = _require(Path(path))
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or header[:2] != ["bag_id", "label"] or len(header) < 3:
            raise MILDataError(path, f"header must start with bag_id,label then feature columns, got {header}")
        ids, labels, rows = [], [], []
        for lineno, row in enumerate(reader, 2):
            if len(row) != len(header):
                raise MILDataError(path, f"line {lineno}: {len(row)} fields, header has {len(header)}")
            try:
                labels.append(int(row[1]))
                rows.append([float(v) for v in row[2:]])
            except ValueError as exc:
                raise MILDataError(path, f"line {lineno}: {exc}") from exc
            ids.append(row[0])
    if not rows:
        raise MILDataError(path, "no instances")
    features = np.asarray(rows, dtype=np.float32)
    ids_arr, labels_arr = np.asarray(ids), np.asarray(labels)
    bags = []
    for bag in dict.fromkeys(ids):
        idx = np.flatnonzero(ids_arr == bag)
        bag_labels = set(labels_arr[idx].tolist())
        if len(bag_labels) != 1:
            raise MILDataError(path, f"bag {bag} has rows with different labels {sorted(bag_labels)}")
        bags.append(MILBag(bag, features[idx], bag_labels.pop()))
    return bags


_XY = re.compile(r"xini_(\d+)_yini_(\d+)")


def read_sicapv2_bags(folder: str | Path, csv_name: str = "Test.csv") -> list[MILBag]:
    """Read SICAPv2 slide bags (128-d patch features); label 1 = cancerous (Gleason primary > 0), coords from patch names."""
    pd = optional_import("pandas", "reading SICAPv2 feature tables", "train")
    path = _require(Path(folder) / csv_name)
    table = pd.read_csv(path)
    feature_cols = [c for c in table.columns if c.startswith("feature_")]
    needed = {"instance_name", "instance_label", "bag_name", "bag_label_primary", "bag_label_secondary"}
    if not feature_cols or not needed <= set(table.columns):
        raise MILDataError(path, f"expected feature_* and {sorted(needed)} columns")
    xy = table["instance_name"].str.extract(_XY)
    if xy.isna().any().any():
        bad = table.loc[xy.isna().any(axis=1), "instance_name"].iloc[0]
        raise MILDataError(path, f"patch name without xini/yini coordinates: {bad}")
    coords = xy.astype(np.int64).to_numpy()
    bags = []
    for slide, idx in table.groupby("bag_name", sort=False).indices.items():
        rows = table.iloc[idx]
        primary = int(rows["bag_label_primary"].iloc[0])
        bags.append(
            MILBag(
                str(slide),
                rows[feature_cols].to_numpy(np.float32),
                int(primary > 0),
                coords=coords[idx],
                instance_labels=rows["instance_label"].to_numpy(np.int64),
                meta={"gleason_primary": primary, "gleason_secondary": int(rows["bag_label_secondary"].iloc[0])},
            )
        )
    return bags


def read_clam_h5(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a CLAM-layout slide bag: features (N, D) float32 and coords (N, 2) level-0 (x, y), coords None if absent."""
    h5py = optional_import("h5py", "reading HDF5 feature bags", "wsi")
    path = _require(Path(path))
    try:
        with h5py.File(path, "r") as handle:
            if "features" not in handle:
                raise MILDataError(path, f"no 'features' dataset (has {sorted(handle.keys())})")
            features = np.asarray(handle["features"], dtype=np.float32)
            coords = np.asarray(handle["coords"]) if "coords" in handle else None
    except OSError as exc:
        raise MILDataError(path, f"not a readable HDF5 file ({exc})") from exc
    if features.ndim == 3 and features.shape[0] == 1:  # some extractors store (1, N, D)
        features = features[0]
    if features.ndim != 2 or features.shape[0] == 0:
        raise MILDataError(path, f"'features' must be (N, D) with N >= 1, got {features.shape}")
    if coords is not None and coords.shape != (features.shape[0], 2):
        raise MILDataError(path, f"'coords' must be ({features.shape[0]}, 2), got {coords.shape}")
    return features, coords


def read_slide_labels(path: str | Path) -> dict[str, int]:
    """Read a `slide_id,label` CSV into {slide_id: integer label}."""
    path = _require(Path(path))
    labels = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"slide_id", "label"} <= set(reader.fieldnames):
            raise MILDataError(path, f"header must contain slide_id,label, got {reader.fieldnames}")
        for lineno, row in enumerate(reader, 2):
            try:
                labels[row["slide_id"]] = int(row["label"])
            except (TypeError, ValueError) as exc:
                raise MILDataError(path, f"line {lineno}: label {row['label']!r} is not an integer") from exc
    return labels


def read_splits(path: str | Path) -> dict[str, list[str]]:
    """Read a `slide_id,split` CSV into {split: [slide ids]}; splits must be train / val / test."""
    path = _require(Path(path))
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"slide_id", "split"} <= set(reader.fieldnames):
            raise MILDataError(path, f"header must contain slide_id,split, got {reader.fieldnames}")
        for lineno, row in enumerate(reader, 2):
            if row["split"] not in splits:
                raise MILDataError(path, f"line {lineno}: split {row['split']!r} is not train/val/test")
            splits[row["split"]].append(row["slide_id"])
    seen = [s for ids in splits.values() for s in ids]
    if len(seen) != len(set(seen)):
        raise MILDataError(path, "a slide appears in more than one split")
    return splits


def read_clam_bags(folder: str | Path, labels_csv: str | Path) -> list[MILBag]:
    """Read every `<slide_id>.h5` in a folder that has a label in `labels_csv` (missing files are logged and skipped)."""
    folder = Path(folder)
    bags = []
    for slide_id, label in read_slide_labels(labels_csv).items():
        path = folder / f"{slide_id}.h5"
        if not path.is_file():
            log.warning("no feature file for slide %s at %s; skipped", slide_id, path)
            continue
        features, coords = read_clam_h5(path)
        bags.append(MILBag(slide_id, features, label, coords=coords, meta={"path": str(path)}))
    return bags


def build_medmnist_bags(
    images: np.ndarray,
    labels: np.ndarray,
    n_bags: int,
    bag_size: int = 10,
    bag_size_sd: float = 2.0,
    prevalence: float = 0.5,
    positive_class: int = 1,
    seed: int = 0,
    prefix: str = "bag",
) -> list[MILBag]:
    """MedMNIST-bags in the style of Ilse et al.'s MNIST-bags: bags of real images, positive iff one holds a positive image.

    Bag sizes are drawn from Normal(bag_size, bag_size_sd) (at least 1); a `prevalence` share of
    bags is positive and holds 1..size positive images, the rest only negatives. Instances are the
    flattened images scaled to [0, 1] (features (N, H*W*C)); instance labels mark positive images.
    """
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"prevalence must be in (0, 1), got {prevalence}")
    rng = np.random.default_rng(seed)
    flat_labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
    positives = np.flatnonzero(flat_labels == positive_class)
    negatives = np.flatnonzero(flat_labels != positive_class)
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("building MIL bags needs both positive and negative images")
    features = images.reshape(len(images), -1).astype(np.float32) / 255.0
    bags = []
    for i in range(n_bags):
        size = max(1, int(round(rng.normal(bag_size, bag_size_sd))))
        positive = rng.random() < prevalence
        n_pos = int(rng.integers(1, size + 1)) if positive else 0
        chosen = np.concatenate([rng.choice(positives, n_pos), rng.choice(negatives, size - n_pos)]).astype(int)
        rng.shuffle(chosen)
        instance_labels = (flat_labels[chosen] == positive_class).astype(np.int64)
        bags.append(MILBag(f"{prefix}{i}", features[chosen], int(positive), instance_labels=instance_labels,
                           meta={"image_indices": chosen}))
    return bags
