"""Continual-learning metrics from the accuracy matrix R[t][i] (after stage t, on task i).

With T stages and ``first_stage[i]`` the stage at which task i is first trained:

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


def first_stages(stages: list[list[int]], num_tasks: int, assigned=None) -> list[int]:
    """Stage at which each task is first trained: from the schedule, or from the units clients
    actually trained (Het-FCIT trains tasks early). Never-trained tasks get the last stage."""
    first = [len(stages) - 1] * num_tasks
    for t, tasks in enumerate(stages):
        for i in tasks:
            first[i] = min(first[i], t)
    if assigned is not None:
        for stage, unit in assigned:
            for i in stages[unit]:
                first[i] = min(first[i], stage)
    return first
