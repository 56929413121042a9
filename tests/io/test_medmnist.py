import numpy as np
import pytest

from medai.errors import DatasetNotFoundError
from medai.io.medmnist import DatasetFormatError, infer_task, load_medmnist


def test_breastmnist_is_read_as_binary_grayscale(breastmnist_path):
    data = load_medmnist(breastmnist_path)
    assert (data.task, data.num_classes, data.channels, data.spatial_dims) == ("binary", 2, 1, 2)
    assert {s: len(v.labels) for s, v in data.splits.items()} == {"train": 546, "val": 78, "test": 156}
    assert data.class_counts("train").tolist() == [147, 399]


def _write(path, images, labels):
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "name,labels,shape,expected",
    [
        ("pathmnist.npz", np.arange(12)[:, None] % 9, (12, 8, 8, 3), ("multiclass", 9, 3, 2)),
        ("chestmnist.npz", (np.arange(12 * 14).reshape(12, 14) % 3 == 0).astype(int), (12, 8, 8), ("multilabel", 14, 1, 2)),
        ("retinamnist.npz", np.arange(12)[:, None] % 5, (12, 8, 8, 3), ("ordinal", 5, 3, 2)),
        ("organmnist3d.npz", np.arange(12)[:, None] % 11, (12, 6, 6, 6), ("multiclass", 11, 1, 3)),
    ],
)
def test_task_classes_channels_are_read_from_the_file(tmp_path, name, labels, shape, expected):
    path = tmp_path / name
    _write(path, np.zeros(shape, np.uint8), labels)
    data = load_medmnist(path)
    assert (data.task, data.num_classes, data.channels, data.spatial_dims) == expected


def test_missing_arrays_and_files_are_named(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4)), train_labels=np.zeros((2, 1)))
    with pytest.raises(DatasetFormatError, match="val_images") as err:
        load_medmnist(path)
    assert str(path) in str(err.value)
    with pytest.raises(DatasetNotFoundError):
        load_medmnist(tmp_path / "absent.npz")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DatasetFormatError, match="not a readable"):
        load_medmnist(broken)


def test_explicit_task_overrides_inference():
    assert infer_task(np.array([[0], [1], [2]]))[0] == "multiclass"
    assert infer_task(np.array([[0], [1]]))[0] == "binary"
