"""End of a run on the server: continual-learning metrics, the SSA activation map and, for
identity methods, the DKO diagnostics' summary (``purity``, ``gate_mass``)."""

from __future__ import annotations

import numpy as np

from fcit_hpc.eval.metrics import cl_metrics, first_stages
from fcit_hpc.fed.context import RunContext
from fcit_hpc.fed.server.plan import planned_units
from fcit_hpc.state.schema import ClientStatus, RunState


def trained_units(ctx: RunContext, st: RunState) -> list[tuple[int, int]]:
    """(stage, unit) of every client that trained: the run's own accepted client records, or,
    for a method that trains nothing, the schedule's plan (Het-FCIT's table for Zero-shot too)."""
    if ctx.method.trains:
        return [
            (int(c["stage"]), int(c["unit"]))
            for c in st.clients
            if c["status"] == ClientStatus.ACCEPTED
        ]
    return planned_units(ctx.federation, ctx.data.schedule, ctx.seed)


def activation_map(st: RunState, data, encoder, method) -> np.ndarray:
    """Mean SSA activation α per test task and live subspace [tasks, S] (NaN rows: no tests);
    ``method``: an identity method (its ``activation``, DISCO's SSA gate)."""
    live = st.num_subspaces
    rows = []
    for t in range(data.num_tasks):
        ins = data.test[t]
        if not ins:
            rows.append(np.full(live, np.nan))
            continue
        a = method.activation(encoder.encode_samples(ins), st.tokens[:live])
        rows.append(a.mean(0))
    return np.stack(rows)


def finalize(ctx: RunContext, st: RunState) -> None:
    """Fill the summary, first stages, task names and activation map of ``st``."""
    data, method, encoder = ctx.data, ctx.method, ctx.encoder
    st.task_names = list(data.task_names)
    trained = trained_units(ctx, st)
    st.first_stage = np.asarray(first_stages(data.schedule.stages, data.num_tasks, trained))
    if ctx.eval.enabled and not np.isnan(st.accuracy).any():
        st.summary = cl_metrics(st.accuracy, list(st.first_stage))
    else:
        st.summary = {"last": float("nan")}
    if method.uses_identity and st.num_subspaces and encoder is not None:
        st.activation = activation_map(st, data, encoder, method)
    st.summary.update(method.summary(st))  # DISCO: purity, the gate's mass on the right subspaces
