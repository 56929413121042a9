"""The engine's batch order: a function of (seed, epoch), resumable mid-epoch, sharded, class-balanced."""

import numpy as np

from medai.pipelines.batching import EpochSampler


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a = EpochSampler(100, 8, seed=3)
    a.set_epoch(2)
    b = EpochSampler(100, 8, seed=3)
    b.set_epoch(2, start_batch=5)
    assert list(b) == list(a)[5:]
    shards = [EpochSampler(100, 8, 3, rank=r, world_size=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(2)
    seen = [i for s in shards for batch in s for i in batch]
    assert len(seen) == len(set(seen)) == 96  # 12 full batches split across 2 ranks, no overlap
    weighted = EpochSampler(1000, 100, 0, weights=np.r_[np.full(900, 1 / 900), np.full(100, 1 / 100)])
    draws = np.array([i for batch in weighted for i in batch])
    assert 0.4 < (draws >= 900).mean() < 0.6  # balanced classes despite a 9:1 ratio
