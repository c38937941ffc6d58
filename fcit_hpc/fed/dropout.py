"""The client drop-out knob (``federation.dropout``): clients that train but fail to upload. Which
ones is decided from the seed per round, so every rank knows them without a message and a run is
world-size invariant; the server only sees that their uploads are missing."""

from __future__ import annotations

import numpy as np

from fcit_hpc.seeds import derive_seed

SALT_DROPOUT = 5_003


def dropped_clients(
    seed: int, stage: int, round_: int, trainers: list[int], *, share: float
) -> set:
    """round(share · n) of the round's n training clients (sorted ids), drawn without
    replacement."""
    n = round(share * len(trainers))
    if n == 0:
        return set()
    rng = np.random.default_rng(derive_seed(seed, stage, round_, SALT_DROPOUT))
    return {int(c) for c in rng.choice(sorted(trainers), size=n, replace=False)}
