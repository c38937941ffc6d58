"""Seed derivation and its salts: every stream of randomness in a run is (seed, keys..., SALT).

The salts only keep streams apart; their values are part of every stored result, so they never
change.
"""

from __future__ import annotations

import numpy as np

SALT_ADAPTER_INIT = 77  # the global adapter's initial A ~ N(0, 0.01)
SALT_CLIENT_SAMPLING = 101  # which clients a round selects
SALT_ROUND_RNG = 999  # torch RNG state stored after every round
SALT_FISHER_ROUND = 1 << 20  # stands in for the round of EWC's stage-end Fisher pass
SALT_UNIT_SHUFFLE = 3  # order of a data unit's samples before partitioning
SALT_PARTITION = 7  # Dirichlet partition: permutation of the sample indices
SALT_HET_ASSIGN = 11  # Het-FCIT: the task unit of a client slot
SALT_PRETRAIN_DATA = 1_000_003  # embedded pre-training: its sample stream
EVAL_DEAL_STRIDE = 100_003  # test sample (t, i) goes to rank (t·stride + i) mod P


def derive_seed(*keys: int) -> int:
    """One 32-bit seed from integer keys (numpy SeedSequence)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def client_seed(seed: int, stage: int, round_: int, client: int) -> int:
    """All randomness of a client's local work derives from (seed, stage, round, client id)."""
    return derive_seed(seed, stage, round_, client)
