"""The federated data of a run: per-stage data units partitioned over clients, and test sets.

Sources (``benchmark.suite``): ``synthetic`` (embedded text tasks, in memory), ``fcit-mini``
(embedded image benchmark, generated once into a cache through ``fcit data prepare`` and read as a
release), and ``released`` (the FCIT release tree, the ``FCIT_data`` folder at
``benchmark.data_root``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcit_hpc.benchmark.layout import LayoutData, partition_record, prepare, prepared_as
from fcit_hpc.benchmark.partition import DirichletShards
from fcit_hpc.benchmark.registry import DATASETS, stage_datasets
from fcit_hpc.benchmark.schedule import Schedule
from fcit_hpc.benchmark.synthetic import TASK_NAMES, make_split
from fcit_hpc.cache import cache_root
from fcit_hpc.config import BenchmarkConfig
from fcit_hpc.data.sample import Sample
from fcit_hpc.seeds import SALT_UNIT_SHUFFLE


def mini_root(b: BenchmarkConfig, seed: int) -> Path:
    """Cache folder of fcit-mini for this benchmark's sizes and the run's seed."""
    from fcit_hpc.benchmark.mini import recipe_hash

    if b.data_root:
        return Path(b.data_root)
    return cache_root() / f"fcit-mini-{recipe_hash(b.train_per_task, b.test_per_task, seed)}"


def ensure_data(b: BenchmarkConfig, *, num_clients: int, seed: int) -> None:
    """Generate fcit-mini and partition it over ``num_clients`` (federation.num_clients) if the
    cache lacks that partition (call on one rank, then barrier)."""
    if b.suite != "fcit-mini":
        return
    from fcit_hpc.benchmark.mini import write_raw

    root = mini_root(b, seed)
    write_raw(root / "raw", b.train_per_task, b.test_per_task, seed)
    stages = stage_datasets(b.setting, b.capability_order)
    want = partition_record(stages, num_clients, b.min_client_samples, seed)
    if prepared_as(root, b.setting, b.dirichlet_beta) != want:
        prepare(
            root / "raw",
            root,
            stages,
            b.setting,
            beta=b.dirichlet_beta,
            num_clients=num_clients,
            min_samples=b.min_client_samples,
            seed=seed,
        )


class FederatedData:
    """Unit u is the training data of stage u (its tasks concatenated and shuffled), split over all
    clients with a Dirichlet quantity skew. A selected client trains on its shard of the unit the
    schedule gives it (Hom: the current stage; Het: the table entry)."""

    def check_files(self) -> None:
        """The release tree's client files of every stage parse (nothing to check for the
        generated suites)."""
        if self._layout is not None:
            self._layout.check_client_files()

    def __init__(self, b: BenchmarkConfig, *, num_clients: int, seed: int):
        """The data of benchmark section ``b`` over ``num_clients`` clients
        (federation.num_clients), drawn from the run's ``seed``."""
        if b.suite == "synthetic":
            self._synthetic(b, num_clients, seed)
            return
        root = mini_root(b, seed) if b.suite == "fcit-mini" else Path(b.data_root)
        names = stage_datasets(b.setting, b.capability_order)
        self._layout = LayoutData(
            root,
            names,
            b.setting,
            b.dirichlet_beta,
            num_clients=num_clients,
            image_root=b.image_root or None,
        )
        self.task_names = self._layout.task_names
        stages = [[self._layout.task_of[n] for n in st] for st in names]
        self.schedule = Schedule(
            b.setting, b.scenario, len(self.task_names), b.het_assignment, seed=seed, stages=stages
        )
        self.test = self._layout.test
        self.scorers = [DATASETS[n].scorer for n in self.task_names]

    def _synthetic(self, b: BenchmarkConfig, num_clients: int, seed: int) -> None:
        self._layout = None
        self.schedule = Schedule(b.setting, b.scenario, b.num_tasks, b.het_assignment, seed=seed)
        self.task_names = list(TASK_NAMES[: b.num_tasks])
        self.scorers = ["exact"] * b.num_tasks
        self.test = {t: make_split(t, b.test_per_task, seed, "test") for t in range(b.num_tasks)}
        self.units: list[list[Sample]] = []
        self.shards: list[DirichletShards] = []  # per unit: sizes + permutation, cut per client
        for u, tasks in enumerate(self.schedule.stages):
            data = [s for t in tasks for s in make_split(t, b.train_per_task, seed, "train")]
            perm = np.random.default_rng([seed, u, SALT_UNIT_SHUFFLE]).permutation(len(data))
            self.units.append([data[i] for i in perm])
            self.shards.append(
                DirichletShards(
                    len(data),
                    num_clients,
                    b.dirichlet_beta,
                    b.min_client_samples,
                    seed=[seed, u],
                )
            )

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def client_samples(self, unit: int, client: int) -> list[Sample]:
        if self._layout is not None:
            return self._layout.client_samples(unit, client)
        return [self.units[unit][i] for i in self.shards[unit].shard(client)]
