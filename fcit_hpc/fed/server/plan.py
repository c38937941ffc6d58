"""Round plans: which clients train this round, on which data unit and which rank."""

from __future__ import annotations

import numpy as np

from fcit_hpc.config import Config
from fcit_hpc.seeds import SALT_CLIENT_SAMPLING


def sample_clients(seed: int, stage: int, round_: int, num_clients: int, k: int) -> np.ndarray:
    """k distinct client ids, without replacement, seeded by (seed, stage, round); sorted."""
    rng = np.random.default_rng([seed, stage, round_, SALT_CLIENT_SAMPLING])
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def worker_ranks(world: int, server_hosts_clients: bool) -> list[int]:
    """Ranks that host clients: all of them, or all but rank 0 (never none)."""
    return list(range(world)) if (server_hosts_clients or world == 1) else list(range(1, world))


def plan_round(cfg: Config, schedule, stage: int, round_: int, world: int) -> np.ndarray:
    """int64 [n, 3]: (client id, data unit, rank) for the clients selected this round.

    Clients are dealt round-robin over the worker ranks (rank 0 too when
    ``federation.server_hosts_clients``), so 50 clients run on any number of ranks.
    """
    f = cfg.federation
    clients = sample_clients(cfg.seed, stage, round_, f.num_clients, cfg.clients_per_round)
    workers = worker_ranks(world, f.server_hosts_clients)
    rows = [
        (c, schedule.unit_of(stage, round_, j), workers[j % len(workers)])
        for j, c in enumerate(clients)
    ]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def planned_units(cfg: Config, schedule) -> list[tuple[int, int]]:
    """(stage, data unit) of every client the schedule plans over the whole run: what clients
    would train, for a method that trains nothing (Zero-shot) and so has no client records."""
    return [
        (stage, int(unit))
        for stage in range(schedule.num_stages)
        for rnd in range(cfg.federation.num_rounds)
        for _, unit, _ in plan_round(cfg, schedule, stage, rnd, 1)
    ]
