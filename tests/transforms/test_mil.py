"""Instance subsampling for MIL bags."""

import numpy as np
import pytest

from medai.transforms.mil import subsample_instances


def test_subsample_caps_and_keeps_order():
    rng = np.random.default_rng(0)
    idx = subsample_instances(1000, 64, rng)
    assert len(idx) == 64 and np.all(np.diff(idx) > 0)
    assert len(subsample_instances(10, 64, rng)) == 10


def test_subsample_fraction_range_and_randomness():
    rng = np.random.default_rng(0)
    sizes = {len(subsample_instances(100, None, rng, min_fraction=0.5)) for _ in range(50)}
    assert min(sizes) >= 50 and max(sizes) <= 100 and len(sizes) > 5
    with pytest.raises(ValueError):
        subsample_instances(0, None, rng)
