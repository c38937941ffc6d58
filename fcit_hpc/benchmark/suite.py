"""The federated data of a run: per-stage data units partitioned over clients, and test sets."""

from __future__ import annotations

import numpy as np

from fcit_hpc.benchmark.partition import dirichlet_partition
from fcit_hpc.benchmark.schedule import Schedule
from fcit_hpc.benchmark.synthetic import TASK_NAMES, Sample, make_split
from fcit_hpc.config import Config


class FederatedData:
    """Unit u is the training data of stage u (its tasks concatenated and shuffled), split over all
    clients with a Dirichlet quantity skew. A selected client trains on its shard of the unit the
    schedule gives it (Hom: the current stage; Het: the table entry)."""

    def __init__(self, cfg: Config):
        b = cfg.benchmark
        self.schedule = Schedule(b.setting, b.scenario, b.num_tasks, b.het_assignment, cfg.seed)
        self.task_names = list(TASK_NAMES[: b.num_tasks])
        self.test = {
            t: make_split(t, b.test_per_task, cfg.seed, "test") for t in range(b.num_tasks)
        }
        self.units: list[list[Sample]] = []
        self.shards: list[list[np.ndarray]] = []
        for u, tasks in enumerate(self.schedule.stages):
            data = [s for t in tasks for s in make_split(t, b.train_per_task, cfg.seed, "train")]
            perm = np.random.default_rng([cfg.seed, u, 3]).permutation(len(data))
            data = [data[i] for i in perm]
            self.units.append(data)
            self.shards.append(
                dirichlet_partition(
                    len(data),
                    cfg.federation.num_clients,
                    b.dirichlet_beta,
                    b.min_client_samples,
                    [cfg.seed, u],
                )
            )

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def client_samples(self, unit: int, client: int) -> list[Sample]:
        return [self.units[unit][i] for i in self.shards[unit][client]]
