"""Round plans: which clients train this round, on which data unit and which rank."""

from __future__ import annotations

import numpy as np

from fcit_hpc.config import FederationConfig
from fcit_hpc.runtime import client_groups
from fcit_hpc.seeds import SALT_CLIENT_SAMPLING


def sample_clients(seed: int, stage: int, round_: int, num_clients: int, *, k: int) -> np.ndarray:
    """k distinct client ids, without replacement, seeded by (seed, stage, round); sorted."""
    rng = np.random.default_rng([seed, stage, round_, SALT_CLIENT_SAMPLING])
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def plan_round(
    f: FederationConfig,
    schedule,
    *,
    seed: int,
    stage: int,
    round_: int,
    world: int,
    gpus_per_client: int = 1,
) -> np.ndarray:
    """int64 [n, 3]: (client id, data unit, rank) for the clients selected this round.

    Clients are dealt round-robin over the worker ranks (rank 0 too when
    ``federation.server_hosts_clients``), so 50 clients run on any number of ranks; with client
    groups (``gpus_per_client`` > 1, train.gpus_per_client) over the groups' leaders, the rank
    in the plan.
    """
    groups = client_groups(world, gpus_per_client, f.server_hosts_clients)
    workers = [g.leader for g in groups]
    chosen = selected_units(f, schedule, seed=seed, stage=stage, round_=round_)
    rows = [(c, unit, workers[j % len(workers)]) for j, (c, unit) in enumerate(chosen)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def selected_units(
    f: FederationConfig, schedule, *, seed: int, stage: int, round_: int
) -> list[tuple[int, int]]:
    """(client id, data unit) of the clients selected in a round, in client-id order."""
    clients = sample_clients(seed, stage, round_, f.num_clients, k=f.clients_per_round)
    return [(int(c), schedule.unit_of(stage, round_, j)) for j, c in enumerate(clients)]


def planned_units(f: FederationConfig, schedule, seed: int) -> list[tuple[int, int]]:
    """(stage, data unit) of every client the schedule plans over the whole run: what clients
    would train, for a method that trains nothing (Zero-shot) and so has no client records."""
    return [
        (stage, int(unit))
        for stage in range(schedule.num_stages)
        for rnd in range(f.num_rounds)
        for _, unit in selected_units(f, schedule, seed=seed, stage=stage, round_=rnd)
    ]
