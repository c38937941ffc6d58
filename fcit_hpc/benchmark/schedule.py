"""Stage schedules: which task(s) a stage brings and which task each selected client learns."""

from __future__ import annotations

import numpy as np

from fcit_hpc.seeds import SALT_HET_ASSIGN

# Published Het-FCIT assignment tables (0-based task ids, one list per stage, 5 clients per round).
HET_TABLE_TASK = [
    [1, 2, 4, 5, 6],
    [3, 4, 5, 7, 7],
    [0, 2, 3, 4, 5],
    [0, 0, 1, 3, 7],
    [1, 2, 4, 4, 5],
    [0, 3, 5, 7, 7],
    [2, 2, 5, 7, 7],
    [5, 5, 5, 6, 6],
]
HET_TABLE_CAPABILITY = [[0, 1, 1, 3, 3], [0, 2, 2, 2, 3], [1, 2, 2, 3, 3], [0, 0, 0, 1, 1]]


class Schedule:
    """Answers: which tasks make stage t, and which task does the j-th selected client learn.

    In the task-related setting a stage is one task; in the capability-related setting a stage is a
    group of tasks (their data concatenated). Het-FCIT assigns each selected client a stage id from
    the published table (cycled when more than 5 clients are selected) or at random, seeded.
    """

    def __init__(
        self,
        setting: str,
        scenario: str,
        num_tasks: int,
        het: str,
        *,
        seed: int,
        stages: list[list[int]] | None = None,
    ):
        if stages is not None:
            self.stages = stages
        elif setting == "task":
            self.stages = [[t] for t in range(num_tasks)]
        elif setting.startswith("joint"):
            self.stages = [list(range(num_tasks))]
        else:
            groups = max(1, min(4, num_tasks // 2))
            self.stages = [list(g) for g in np.array_split(np.arange(num_tasks), groups)]
            self.stages = [[int(t) for t in g] for g in self.stages]
        table = HET_TABLE_TASK if setting == "task" else HET_TABLE_CAPABILITY
        self.scenario = scenario
        self.het = het
        self.seed = seed
        n = len(self.stages)
        self.table = [[u for u in row if u < n] or [i] for i, row in enumerate(table[:n])]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def unit_of(self, stage: int, round_: int, slot: int) -> int:
        """Index of the data unit (a stage's data) the ``slot``-th selected client trains on."""
        if self.scenario == "hom":
            return stage
        if self.het == "table":
            row = self.table[stage]
            return row[slot % len(row)]
        rng = np.random.default_rng([self.seed, stage, round_, slot, SALT_HET_ASSIGN])
        return int(rng.integers(0, self.num_stages))
