"""MIL bag readers on the shared real files, plus malformed-input errors."""

from __future__ import annotations

import numpy as np
import pytest

from medai.io.mil_bags import (
    MILDataError,
    read_bag_csv,
    read_clam_bags,
    read_clam_h5,
    read_mil_toolbox_mat,
    read_sicapv2_bags,
    read_splits,
)

# Bags / instances / positive bags / feature width, from the data README (UCI and Andrews et al.).
CLASSIC = {"musk1": (92, 476, 47, 166), "musk2": (102, 6598, 39, 166), "fox": (200, 1320, 100, 230), "tiger": (200, 1220, 100, 230)}


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_classic_mil_sets_read_with_published_counts(name, mil_classic_path):
    bags = read_mil_toolbox_mat(mil_classic_path / name / f"{name}.mat")
    n_bags, n_inst, n_pos, width = CLASSIC[name]
    assert len(bags) == n_bags
    assert sum(b.num_instances for b in bags) == n_inst
    assert sum(b.label for b in bags) == n_pos
    assert {b.features.shape[1] for b in bags} == {width}
    assert all(b.features.dtype == np.float32 for b in bags)


def test_musk1_mat_matches_the_raw_uci_file(mil_classic_path):
    bags = {b.bag_id: b for b in read_mil_toolbox_mat(mil_classic_path / "musk1" / "musk1.mat")}
    rows = [line.rstrip(".\n").split(",") for line in open(mil_classic_path / "musk1" / "clean1.data")]
    first = rows[0]
    bag = bags[first[0]]
    np.testing.assert_allclose(bag.features[0], np.array(first[2:-1], dtype=np.float32))
    assert bag.label == int(float(first[-1]))


def test_sicapv2_bags(mil_sicapv2_128d_path):
    bags = read_sicapv2_bags(mil_sicapv2_128d_path)
    assert len(bags) == 30 and sum(b.label for b in bags) == 21
    assert sum(b.num_instances for b in bags) == 2713
    assert min(b.num_instances for b in bags) == 22 and max(b.num_instances for b in bags) == 214
    for b in bags:
        assert b.features.shape == (b.num_instances, 128) and b.coords.shape == (b.num_instances, 2)
        # benign slides hold only non-cancer patches (instance label 0), cancerous ones none
        assert (b.instance_labels == 0).all() == (b.label == 0)
        assert len({tuple(c) for c in b.coords}) == b.num_instances  # one patch per position


def test_bag_csv_round_trip_and_errors(tmp_path):
    path = tmp_path / "bags.csv"
    path.write_text("bag_id,label,f0,f1\nA,1,0.5,1.5\nA,1,2,3\nB,0,1,1\n")
    bags = read_bag_csv(path)
    assert [(b.bag_id, b.label, b.num_instances) for b in bags] == [("A", 1, 2), ("B", 0, 1)]
    np.testing.assert_array_equal(bags[0].features, [[0.5, 1.5], [2, 3]])
    bad = tmp_path / "bad.csv"
    bad.write_text("bag_id,label,f0\nA,1,0.5\nA,0,2\n")
    with pytest.raises(MILDataError, match="different labels"):
        read_bag_csv(bad)
    bad.write_text("id,y,f0\nA,1,0.5\n")
    with pytest.raises(MILDataError, match="header"):
        read_bag_csv(bad)


def test_clam_h5_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    features = np.random.rand(7, 16).astype(np.float32)
    coords = np.arange(14).reshape(7, 2) * 256
    with h5py.File(tmp_path / "s1.h5", "w") as f:
        f["features"], f["coords"] = features, coords
    with h5py.File(tmp_path / "s2.h5", "w") as f:
        f["coords"] = coords
    (tmp_path / "labels.csv").write_text("slide_id,label\ns1,1\nmissing,0\n")
    got, got_coords = read_clam_h5(tmp_path / "s1.h5")
    np.testing.assert_array_equal(got, features)
    np.testing.assert_array_equal(got_coords, coords)
    bags = read_clam_bags(tmp_path, tmp_path / "labels.csv")
    assert [b.bag_id for b in bags] == ["s1"] and bags[0].label == 1
    with pytest.raises(MILDataError, match="features"):
        read_clam_h5(tmp_path / "s2.h5")


def test_splits_file(tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("slide_id,split\na,train\nb,val\nc,test\nd,train\n")
    assert read_splits(path) == {"train": ["a", "d"], "val": ["b"], "test": ["c"]}
    path.write_text("slide_id,split\na,train\na,test\n")
    with pytest.raises(MILDataError, match="more than one split"):
        read_splits(path)


def test_medmnist_bags_follow_the_mnist_bags_rule(breastmnist_path):
    from medai.io.medmnist import load_medmnist
    from medai.io.mil_bags import build_medmnist_bags

    train = load_medmnist(breastmnist_path).splits["train"]
    bags = build_medmnist_bags(train.images, train.labels, n_bags=300, bag_size=8, prevalence=0.3, positive_class=0, seed=1)  # 0 = malignant
    assert len(bags) == 300
    for bag in bags:
        assert bag.label == int(bag.instance_labels.any())  # positive iff it holds a positive image
        assert bag.features.shape[1] == 28 * 28 and 0.0 <= bag.features.min() and bag.features.max() <= 1.0
        np.testing.assert_allclose(bag.features[0], train.images[bag.meta["image_indices"][0]].reshape(-1) / 255.0, rtol=1e-6)
        assert (bag.instance_labels == (train.labels[bag.meta["image_indices"], 0] == 0)).all()
    assert 0.22 < np.mean([b.label for b in bags]) < 0.38
    assert 6 < np.mean([b.num_instances for b in bags]) < 10


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_a_cut_mat_file_is_a_mil_data_error_naming_it(mil_classic_path, tmp_path, cut):
    """Found by the hostile-input harness: scipy's MatReadError, OSError('could not read bytes') and the zlib.error
    of a compressed variable escaped as tracebacks from `medai mil benchmark`."""
    data = (mil_classic_path / "fox" / "fox.mat").read_bytes()
    path = tmp_path / "fox.mat"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(MILDataError, match="unreadable .mat file") as info:
        read_mil_toolbox_mat(path)
    assert str(path) in str(info.value)
