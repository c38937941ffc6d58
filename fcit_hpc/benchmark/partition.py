"""Dirichlet quantity-skew partition of a stage's data over clients."""

from __future__ import annotations

import numpy as np

from fcit_hpc.errors import ConfigError
from fcit_hpc.seeds import SALT_PARTITION


def dirichlet_sizes(n: int, num_clients: int, beta: float, min_size: int, *, seed) -> np.ndarray:
    """Client sizes: ``min_size`` each, the rest split by w ~ Dir(β·1) (largest remainders).

    Returns int64 [num_clients] summing to ``n``. Smaller β gives a wider spread of sizes.
    """
    if beta <= 0:
        raise ConfigError(f"benchmark.dirichlet_beta: {beta!r} is out of range (must be > 0)")
    spare = n - num_clients * min_size
    if spare < 0:
        raise ConfigError(
            f"benchmark.min_client_samples: {min_size} x {num_clients} clients needs "
            f"{num_clients * min_size} samples, the stage has {n}"
        )
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(num_clients, beta))
    raw = w * spare
    sizes = np.floor(raw).astype(np.int64)
    rest = spare - int(sizes.sum())
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[:rest]] += 1
    return sizes + min_size


class DirichletShards:
    """The Dirichlet partition of ``n`` items over ``num_clients`` clients, held as the client
    sizes and one permutation (int64 [num_clients] + [n]), not as a list of shards: a client's
    shard is cut on request (:meth:`shard`), so 10,000 clients cost two arrays, not 10,000."""

    def __init__(self, n: int, num_clients: int, beta: float, min_size: int, *, seed):
        self.sizes = dirichlet_sizes(n, num_clients, beta, min_size, seed=seed)
        self.perm = np.random.default_rng([*np.atleast_1d(seed), SALT_PARTITION]).permutation(n)
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes)])

    def __len__(self) -> int:
        return len(self.sizes)

    def shard(self, client: int) -> np.ndarray:
        """Sorted sample indices of ``client`` (int64 [sizes[client]])."""
        return np.sort(self.perm[self.bounds[client] : self.bounds[client + 1]])


def dirichlet_partition(
    n: int, num_clients: int, beta: float, min_size: int, *, seed
) -> list[np.ndarray]:
    """Shuffled sample indices of ``n`` items split into ``num_clients`` shards (sizes above)."""
    part = DirichletShards(n, num_clients, beta, min_size, seed=seed)
    return [part.shard(c) for c in range(num_clients)]
