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
from fcit_hpc.config import Config
from fcit_hpc.data.sample import Sample
from fcit_hpc.seeds import SALT_UNIT_SHUFFLE


def mini_root(cfg: Config) -> Path:
    """Cache folder of fcit-mini for this config's sizes and seed."""
    from fcit_hpc.benchmark.mini import recipe_hash

    b = cfg.benchmark
    if b.data_root:
        return Path(b.data_root)
    return cache_root() / f"fcit-mini-{recipe_hash(b.train_per_task, b.test_per_task, cfg.seed)}"


def ensure_data(cfg: Config) -> None:
    """Generate fcit-mini and partition it for this config if the cache lacks that partition (call
    on one rank, then barrier)."""
    b, f = cfg.benchmark, cfg.federation
    if b.suite != "fcit-mini":
        return
    from fcit_hpc.benchmark.mini import write_raw

    root = mini_root(cfg)
    write_raw(root / "raw", b.train_per_task, b.test_per_task, cfg.seed)
    stages = stage_datasets(b.setting, b.capability_order)
    want = partition_record(stages, f.num_clients, b.min_client_samples, cfg.seed)
    if prepared_as(root, b.setting, b.dirichlet_beta) != want:
        prepare(
            root / "raw",
            root,
            stages,
            b.setting,
            b.dirichlet_beta,
            f.num_clients,
            b.min_client_samples,
            cfg.seed,
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

    def __init__(self, cfg: Config):
        b = cfg.benchmark
        if b.suite == "synthetic":
            self._synthetic(cfg)
            return
        root = mini_root(cfg) if b.suite == "fcit-mini" else Path(b.data_root)
        names = stage_datasets(b.setting, b.capability_order)
        self._layout = LayoutData(
            root,
            names,
            b.setting,
            b.dirichlet_beta,
            cfg.federation.num_clients,
            b.image_root or None,
        )
        self.task_names = self._layout.task_names
        stages = [[self._layout.task_of[n] for n in st] for st in names]
        self.schedule = Schedule(
            b.setting, b.scenario, len(self.task_names), b.het_assignment, cfg.seed, stages
        )
        self.test = self._layout.test
        self.scorers = [DATASETS[n].scorer for n in self.task_names]

    def _synthetic(self, cfg: Config) -> None:
        b = cfg.benchmark
        self._layout = None
        self.schedule = Schedule(b.setting, b.scenario, b.num_tasks, b.het_assignment, cfg.seed)
        self.task_names = list(TASK_NAMES[: b.num_tasks])
        self.scorers = ["exact"] * b.num_tasks
        self.test = {
            t: make_split(t, b.test_per_task, cfg.seed, "test") for t in range(b.num_tasks)
        }
        self.units: list[list[Sample]] = []
        self.shards: list[DirichletShards] = []  # per unit: sizes + permutation, cut per client
        for u, tasks in enumerate(self.schedule.stages):
            data = [s for t in tasks for s in make_split(t, b.train_per_task, cfg.seed, "train")]
            perm = np.random.default_rng([cfg.seed, u, SALT_UNIT_SHUFFLE]).permutation(len(data))
            self.units.append([data[i] for i in perm])
            self.shards.append(
                DirichletShards(
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
        if self._layout is not None:
            return self._layout.client_samples(unit, client)
        return [self.units[unit][i] for i in self.shards[unit].shard(client)]
