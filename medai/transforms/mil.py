"""Bag-level augmentation for multiple-instance learning."""

from __future__ import annotations

import numpy as np


def subsample_instances(
    num_instances: int, max_instances: int | None, rng: np.random.Generator, min_fraction: float = 1.0
) -> np.ndarray:
    """Return sorted indices of a random instance subset: up to `max_instances`, at least `min_fraction` of N.

    Training on a random subset of a bag's patches is the usual MIL augmentation (and caps the
    cost of huge bags); indices stay sorted so coordinates and features keep their pairing.
    """
    if num_instances < 1:
        raise ValueError("a bag needs at least one instance")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    keep = num_instances
    if min_fraction < 1.0:
        keep = int(rng.integers(max(1, int(np.ceil(min_fraction * num_instances))), num_instances + 1))
    if max_instances is not None:
        keep = min(keep, max_instances)
    if keep >= num_instances:
        return np.arange(num_instances)
    return np.sort(rng.choice(num_instances, size=keep, replace=False))
