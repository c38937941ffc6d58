"""DKO diagnostics, DISCO's own (``Disco``'s diagnostics hooks call these): which data each
subspace received, how pure it is, and how much of the SSA gate lands on the right subspaces at
test time. Stored as DISCO's own state (``/method/disco`` in ``state.h5``, :func:`fresh`).

Labels are data units: unit u is the data of stage u (``Schedule.stages[u]``), so in the task
setting a unit is one task; in the capability setting a capability group. Every accepted update
adds its samples to ``counts[subspace, unit]`` (the subspace is the DKO decision, the unit the
plan's).

- majority unit of subspace k: argmax_u counts[k, u] (lowest u on ties; -1 without samples);
- purity_k = max_u counts[k, u] / sum_u counts[k, u] (subspaces with samples);
- purity (sample-weighted) = sum_k max_u counts[k, u] / sum_{k,u} counts[k, u]: the share of all
  accepted samples that went to a subspace whose majority they are; plain = mean_k purity_k;
- gate mass of a test sample of task t = sum of its SSA α over the live subspaces whose majority
  unit is t's unit (0 when there is none); per task the mean over its test samples; overall the
  mean over the tasks trained so far (some accepted sample in their unit) that have tests.
"""

from __future__ import annotations

import json

import numpy as np

from fcit_hpc.errors import StateError
from fcit_hpc.state.schema import ClientStatus, MethodState, RunState


def fresh(name: str) -> MethodState:
    """The diagnostics before :func:`init` sizes them: ``samples`` int64 [S_max, U] accepted
    samples per subspace (the DKO decision) x data unit, ``task_unit`` int64 [tasks] each test
    task's unit (-1: none), ``gate_mass`` float64 [stages, tasks] (NaN: not evaluated)."""
    arrays = {
        "samples": np.zeros((0, 0), np.int64),
        "task_unit": np.zeros(0, np.int64),
        "gate_mass": np.zeros((0, 0)),
    }
    return MethodState(name, arrays)


def stored(st: RunState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(samples, task_unit, gate_mass) of the state (views: writes go to the state)."""
    a = st.method.arrays
    return a["samples"], a["task_unit"], a["gate_mass"]


def add_samples(counts: np.ndarray, rows: np.ndarray) -> None:
    """Add the accepted client records ``rows`` (CLIENT_DTYPE) to ``counts`` [S_max, U]."""
    ok = rows[(rows["status"] == ClientStatus.ACCEPTED) & (rows["subspace"] >= 0)]
    np.add.at(counts, (ok["subspace"].astype(np.int64), ok["unit"].astype(np.int64)), ok["samples"])


def samples_from_clients(clients: np.ndarray, s_max: int, units: int, stage: int | None = None):
    """counts int64 [S_max, U] of the client records (of stages <= ``stage`` when given)."""
    counts = np.zeros((s_max, units), np.int64)
    add_samples(counts, clients if stage is None else clients[clients["stage"] <= stage])
    return counts


def task_units(stages: list[list[int]], num_tasks: int) -> np.ndarray:
    """int64 [tasks]: the (first) data unit holding each task; -1 for a task in none."""
    out = np.full(num_tasks, -1, np.int64)
    for u in reversed(range(len(stages))):
        out[list(stages[u])] = u
    return out


def majority(counts: np.ndarray) -> np.ndarray:
    """int64 [S]: each subspace's majority unit (-1: no samples)."""
    if counts.shape[1] == 0:
        return np.full(counts.shape[0], -1, np.int64)
    return np.where(counts.sum(1) > 0, counts.argmax(1), -1).astype(np.int64)


def purity(counts: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(purity per subspace [S] (NaN: no samples), sample-weighted purity, plain mean)."""
    n = counts.sum(1).astype(np.float64)
    top = counts.max(1).astype(np.float64) if counts.shape[1] else np.zeros(len(n))
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(n > 0, top / n, np.nan)
    total = float(n.sum())
    weighted = float(top.sum() / total) if total > 0 else float("nan")
    plain = float(np.nanmean(per)) if (n > 0).any() else float("nan")
    return per, weighted, plain


def gate_mass(alpha: np.ndarray, major: np.ndarray, unit: int) -> np.ndarray:
    """float64 [M]: per test sample, the sum of α [M, S_live] over the live subspaces whose
    majority unit (``major`` [S_live]) is ``unit``, the samples' own."""
    right = (np.asarray(major) == unit) & (unit >= 0)
    return np.asarray(alpha, np.float64)[:, right].sum(1)


def trained_tasks(counts: np.ndarray, task_unit: np.ndarray) -> np.ndarray:
    """bool [tasks]: the task's unit has accepted samples."""
    per_unit = counts.sum(0)
    return np.array([u >= 0 and per_unit[u] > 0 for u in task_unit], bool)


def overall_gate_mass(row: np.ndarray, counts: np.ndarray, task_unit: np.ndarray) -> float:
    """Mean of a stage's per-task gate mass over the tasks trained so far with tests."""
    use = trained_tasks(counts, task_unit) & ~np.isnan(row)
    return float(row[use].mean()) if use.any() else float("nan")


def stage_gate_mass(
    features, tokens, counts, task_unit, *, epsilon: float, mode: str
) -> np.ndarray:
    """float64 [tasks]: mean gate mass per test task (NaN: no tests). ``features``: per task the
    test samples' identity features [M_t, D] (None: no tests); ``tokens``: the live G [S, D]."""
    from fcit_hpc.methods.disco import ssa_activation

    live = len(tokens)
    major = majority(counts[:live])
    out = np.full(len(task_unit), np.nan)
    for t, f in enumerate(features):
        if f is None or len(f) == 0:
            continue
        if live == 0:
            out[t] = 0.0
            continue
        out[t] = float(
            gate_mass(ssa_activation(f, tokens, epsilon, mode), major, task_unit[t]).mean()
        )
    return out


def unit_names(task_unit: np.ndarray, task_names: list[str], units: int) -> list[str]:
    """Unit u's name: its tasks' names joined by '+'."""
    return [
        "+".join(n for n, v in zip(task_names, task_unit, strict=True) if v == u) or f"unit{u}"
        for u in range(units)
    ]


def _num(x: float, digits: int = 4):
    return None if x is None or np.isnan(x) else round(float(x), digits)


def dko_record(
    stage: int,
    counts: np.ndarray,
    live: int,
    gate_row: np.ndarray,
    *,
    task_unit: np.ndarray,
    task_names: list[str],
) -> dict:
    """The ``kind: dko`` record of metrics.jsonl after a stage's evaluation."""
    units = unit_names(task_unit, task_names, counts.shape[1])
    per, weighted, plain = purity(counts[:live])
    major = majority(counts[:live])
    return {
        "kind": "dko",
        "stage": int(stage),
        "num_subspaces": int(live),
        "units": units,
        "subspaces": [
            {
                "subspace": k,
                "samples": int(counts[k].sum()),
                "per_unit": [int(x) for x in counts[k]],
                "majority": units[major[k]] if major[k] >= 0 else None,
                "purity": _num(per[k]),
            }
            for k in range(live)
        ],
        "purity": _num(weighted),
        "purity_plain": _num(plain),
        "gate_mass": {n: _num(g) for n, g in zip(task_names, gate_row, strict=True)},
        "gate_mass_mean": _num(overall_gate_mass(gate_row, counts, task_unit)),
    }


def live_after(st: RunState, stage: int) -> int:
    """Live subspaces after the last round of ``stage`` (from the round records)."""
    r = st.rounds[st.rounds["stage"] <= stage]
    return int(r["num_subspaces"].max()) if len(r) else 0


def stage_record(st: RunState, stage: int, task_names: list[str]) -> str:
    """The dko line of an evaluated stage, from the stored state alone (also on resume)."""
    samples, task_unit, gate = stored(st)
    counts = samples_from_clients(st.clients, *samples.shape, stage=stage)
    rec = dko_record(
        stage,
        counts,
        live_after(st, stage),
        gate[stage],
        task_unit=task_unit,
        task_names=list(task_names),
    )
    return json.dumps(rec)


def summary(st: RunState) -> dict[str, float]:
    """The run summary's DKO entries: ``purity`` (sample-weighted, final counts) and
    ``gate_mass`` (overall, at the last evaluated stage; absent without evaluation)."""
    samples, task_unit, gate = stored(st)
    out = {"purity": purity(samples[: st.num_subspaces])[1]}
    done = [s for s in range(len(gate)) if not np.isnan(gate[s]).all()]
    if done:
        s = done[-1]
        counts = samples_from_clients(st.clients, *samples.shape, stage=s)
        out["gate_mass"] = overall_gate_mass(gate[s], counts, task_unit)
    return out


def init(st: RunState, where, stages: list[list[int]], num_tasks: int) -> None:
    """The diagnostics when the state has none (a fresh state, or a file written before them:
    the counts come from its client records, as they would have accumulated)."""
    if stored(st)[0].size:
        return
    _check_client_records(st, where, len(stages))
    st.method.arrays.update(
        samples=samples_from_clients(st.clients, st.adapter.shape[0], len(stages)),
        task_unit=task_units(stages, num_tasks),
        gate_mass=np.full(st.accuracy.shape, np.nan),
    )


def _check_client_records(st: RunState, where, units: int) -> None:
    c = st.clients
    if ((c["unit"] < 0) | (c["unit"] >= units) | (c["subspace"] >= st.adapter.shape[0])).any():
        raise StateError(f"{where}: /metrics/clients holds data units or subspaces out of range")


def check(st: RunState, where, stages: list[list[int]], num_tasks: int) -> None:
    """Stored diagnostics must fit the benchmark and agree with the client records."""
    s_max, units = st.adapter.shape[0], len(stages)
    samples, task_unit, gate = stored(st)
    at = f"/method/{st.method.name}"
    if samples.shape != (s_max, units):
        raise StateError(
            f"{where}: {at}/samples shape {samples.shape} does not fit ({s_max}, {units}) "
            "(subspaces x data units)"
        )
    if not np.array_equal(task_unit, task_units(stages, num_tasks)):
        raise StateError(f"{where}: {at}/task_unit does not fit the benchmark's stages")
    if gate.shape != st.accuracy.shape:
        raise StateError(
            f"{where}: {at}/gate_mass shape {gate.shape}, /eval/accuracy {st.accuracy.shape}"
        )
    _check_client_records(st, where, units)
    if not np.array_equal(samples, samples_from_clients(st.clients, s_max, units)):
        raise StateError(f"{where}: {at}/samples does not agree with /metrics/clients")


def report_lines(st: RunState, fmt) -> list[str]:
    """The report's section (``fmt``: the report's number format); none without diagnostics."""
    counts, task_unit, gate = stored(st)
    if not counts.size:
        return []
    names = st.task_names or [f"task{i}" for i in range(st.accuracy.shape[1])]
    live = st.num_subspaces
    units = unit_names(task_unit, names, counts.shape[1])
    per, weighted, plain = purity(counts[:live])
    major = majority(counts[:live])
    lines = [
        "## DKO diagnostics",
        "",
        f"Subspaces found: {live}. Purity (share of a subspace's accepted samples from its "
        f"majority task): {fmt(weighted)} sample-weighted over subspaces, {fmt(plain)} plain "
        "mean over subspaces.",
        "",
        "| subspace | samples | " + " | ".join(units) + " | majority | purity |",
        "|---" * (len(units) + 4) + "|",
    ]
    for k in range(live):
        lines.append(
            f"| S{k} | {int(counts[k].sum())} | "
            + " | ".join(str(int(x)) for x in counts[k])
            + f" | {units[major[k]] if major[k] >= 0 else '–'} | {fmt(per[k])} |"
        )
    lines += [
        "",
        "Gate mass on the right subspaces after each stage's evaluation: per test sample, the "
        "sum of its SSA α over the subspaces whose majority task is the sample's (0 when none), "
        "averaged per task; mean over the tasks trained so far.",
        "",
        "| after stage | " + " | ".join(names) + " | mean (trained) |",
        "|---" * (len(names) + 2) + "|",
    ]
    for s_ in range(len(gate)):
        if np.isnan(gate[s_]).all():
            continue
        c = samples_from_clients(st.clients, *counts.shape, stage=s_)
        mean = overall_gate_mass(gate[s_], c, task_unit)
        lines.append(f"| {s_} | " + " | ".join(fmt(x) for x in gate[s_]) + f" | {fmt(mean)} |")
    return lines + [""]
