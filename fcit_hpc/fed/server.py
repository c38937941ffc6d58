"""Rank-0 logic: round plans, update validation, aggregation in client-id order."""

from __future__ import annotations

import logging

import numpy as np

from fcit_hpc.config import Config
from fcit_hpc.fed.client import (
    H_CLIENT,
    H_LOSS,
    H_NUMEL,
    H_SAMPLES,
    H_SECONDS,
    H_SUBSPACE,
    HEADER_WIDTH,
)
from fcit_hpc.fed.comm import wire_nbytes
from fcit_hpc.fed.strategies import ServerOptConfig, server_update, weighted_average
from fcit_hpc.state.schema import CLIENT_DTYPE, ROUND_DTYPE, RunState

log = logging.getLogger("fcit.server")


def sample_clients(seed: int, stage: int, round_: int, num_clients: int, k: int) -> np.ndarray:
    """k distinct client ids, without replacement, seeded by (seed, stage, round); sorted."""
    rng = np.random.default_rng([seed, stage, round_, 101])
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def plan_round(cfg: Config, schedule, stage: int, round_: int, world: int) -> np.ndarray:
    """int64 [n, 3]: (client id, data unit, rank) for the clients selected this round.

    Clients are dealt round-robin over the worker ranks (rank 0 too when
    ``federation.server_hosts_clients``), so 50 clients run on any number of ranks.
    """
    f = cfg.federation
    clients = sample_clients(cfg.seed, stage, round_, f.num_clients, cfg.clients_per_round)
    workers = (
        list(range(world)) if (f.server_hosts_clients or world == 1) else list(range(1, world))
    )
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


def opt_config(cfg: Config) -> ServerOptConfig:
    f = cfg.federation
    return ServerOptConfig(
        f.fed_alg, f.fedopt_eta, f.fedopt_tau, f.fedopt_beta1, f.fedopt_beta2, f.server_momentum
    )


def parse_updates(heads: list[np.ndarray], values: list[np.ndarray]):
    """Per-rank (header, values) → list of (header row, delta) sorted by client id."""
    out = []
    for h, v in zip(heads, values, strict=True):
        h = h.reshape(-1, HEADER_WIDTH)
        off = 0
        for row in h:
            n = int(row[H_NUMEL])
            out.append((row, v[off : off + n]))
            off += n
    out.sort(key=lambda item: int(item[0][H_CLIENT]))
    return out


def aggregate_round(
    cfg: Config,
    st: RunState,
    updates,
    numel: int,
    stage: int,
    round_: int,
    plan: np.ndarray,
    decisions: dict,
    seconds: float,
    bytes_down: int,
    token_bytes: dict[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Validate updates, average per subspace (sample-weighted, client-id order), apply the server
    optimizer. Mutates ``st``. Returns (round row, client rows) for the metrics.

    Per client, bytes received = ``bytes_down`` (every buffer broadcast in the round) and bytes
    sent = its update header and delta plus its identity-token upload (``token_bytes``), as they
    travelled (:func:`fcit_hpc.fed.comm.wire_nbytes`)."""
    rank_of = {int(c): int(r) for c, _, r in plan}
    unit_of = {int(c): int(u) for c, u, _ in plan}
    by_subspace: dict[int, list[tuple[np.ndarray, int]]] = {}
    rows = []
    for head, delta in updates:
        client, k = int(head[H_CLIENT]), int(head[H_SUBSPACE])
        status = 0
        if delta.size != numel:
            status = 2
            log.warning(
                "client %d: update rejected, %d values, expected %d", client, delta.size, numel
            )
        elif not np.isfinite(delta).all():
            status = 1
            log.warning("client %d: update rejected, contains NaN/Inf", client)
        else:
            by_subspace.setdefault(k, []).append((delta, int(head[H_SAMPLES])))
        d = decisions.get(client)
        rows.append(
            (
                stage,
                round_,
                client,
                rank_of[client],
                unit_of[client],
                k,
                int(head[H_SAMPLES]),
                float(head[H_LOSS]),
                float(head[H_SECONDS]),
                wire_nbytes(head, delta) + token_bytes.get(client, 0),
                bytes_down,
                status,
                d.similarity if d else np.nan,
                d.action if d else 0,
            )
        )
    # clients rejected at the token stage trained nothing
    for c, d in decisions.items():
        if d.subspace < 0:
            rows.append(
                (
                    stage,
                    round_,
                    c,
                    rank_of[c],
                    unit_of[c],
                    -1,
                    0,
                    np.nan,
                    0.0,
                    token_bytes.get(c, 0),
                    bytes_down,
                    3,
                    np.nan,
                    0,
                )
            )
    opt = opt_config(cfg)
    for k in sorted(by_subspace):
        vecs = [v for v, _ in by_subspace[k]]
        weights = [n for _, n in by_subspace[k]]
        mean_delta = weighted_average(vecs, weights)
        view = {name: arr[k] for name, arr in st.server_opt.items()}
        st.adapter[k] = server_update(st.adapter[k], mean_delta, view, opt)
    client_rows = np.array(sorted(rows, key=lambda r: r[2]), dtype=CLIENT_DTYPE)
    ok = client_rows[client_rows["status"] == 0]
    n = int(ok["samples"].sum())
    loss = float((ok["loss"] * ok["samples"]).sum() / n) if n else float("nan")
    round_row = np.array(
        [
            (
                stage,
                round_,
                loss,
                n,
                seconds,
                int(client_rows["bytes_sent"].sum()),
                int(client_rows["bytes_recv"].sum()),
                len(ok),
                len(client_rows) - len(ok),
                st.num_subspaces,
            )
        ],
        dtype=ROUND_DTYPE,
    )
    return round_row, client_rows
