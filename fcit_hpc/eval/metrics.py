"""Continual-learning metrics from the accuracy matrix R[t][i] (after stage t, on task i).

With T stages and ``first_stage[i]`` the first stage in which any client trained task i (T when
no client ever trained it):

- Last       = mean_i R[T-1][i]                                   (every task, after the end)
- Avg        = mean_t mean_{i seen by t} R[t][i]                  (seen = first_stage[i] <= t)
- Forgetting = mean_i (max_{t < T-1, t >= first_stage[i]} R[t][i] − R[T-1][i]) over tasks
               trained before the final stage
- BWT        = mean_i (R[T-1][i] − R[first_stage[i]][i]) over the same tasks
- FWT / zero-shot = mean_i R[first_stage[i] − 1][i] over tasks with first_stage[i] > 0 (accuracy
               on a task just before it is trained)
"""

from __future__ import annotations

import numpy as np


def cl_metrics(R: np.ndarray, first_stage: list[int]) -> dict[str, float]:
    R = np.asarray(R, dtype=np.float64)
    T, n = R.shape
    fs = np.asarray(first_stage)
    if fs.shape != (n,):
        raise ValueError(f"first_stage has {fs.size} entries for {n} tasks")
    last = float(np.mean(R[T - 1]))
    avg = float(np.mean([np.mean(R[t, fs <= t]) for t in range(T) if (fs <= t).any()]))
    old = [i for i in range(n) if fs[i] < T - 1]
    forgetting = [max(R[fs[i] : T - 1, i]) - R[T - 1, i] for i in old]
    bwt = [R[T - 1, i] - R[fs[i], i] for i in old]
    fwt = [R[fs[i] - 1, i] for i in range(n) if 0 < fs[i] < T]
    nan = float("nan")
    return {
        "last": last,
        "avg": avg,
        "forgetting": float(np.mean(forgetting)) if forgetting else nan,
        "bwt": float(np.mean(bwt)) if bwt else nan,
        "fwt": float(np.mean(fwt)) if fwt else nan,
    }


def first_stages(stages: list[list[int]], num_tasks: int, trained) -> list[int]:
    """First stage in which any client trained each task; ``len(stages)`` (never) for a task no
    client trained, so it counts in Last only.

    ``trained`` lists (stage, data unit) for every client that trained (the run's own client
    records, or for a method that trains nothing the plan the schedule gives every round), and
    ``stages[unit]`` the tasks of a data unit. Het-FCIT trains tasks both early and late (in the
    published task-related table ImageNet-R, task 0, is first trained in stage 2).
    """
    never = len(stages)
    first = [never] * num_tasks
    for stage, unit in trained:
        for i in stages[unit]:
            first[i] = min(first[i], int(stage))
    return first
