"""Validation of the clients' updates and their aggregation: per subspace, the sample-weighted mean
delta in client-id order, then the strategy's server update; the side vectors (LLaVA projector, a
method's mixer) by the sample-weighted mean delta of every accepted client (plain FedAvg).

An update is the deltas of the subspaces the client trained (``subspaces_of(k)`` for its
assigned subspace k: k alone, or every expert for MoELoRA / M-LoRA), each ``numel`` values, then
each side's delta in :meth:`RunState.sides` order."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from functools import cached_property

import numpy as np

from fcit_hpc.errors import WireError
from fcit_hpc.fed.strategies import Strategy, weighted_average
from fcit_hpc.fed.wire import Update
from fcit_hpc.methods.base import DkoDecision
from fcit_hpc.state.schema import CLIENT_DTYPE, ROUND_DTYPE, ClientStatus, RunState

log = logging.getLogger("fcit.server")


@dataclass
class RoundInfo:
    """What the server knows of a round besides the updates."""

    stage: int
    round: int
    plan: np.ndarray  # int64 [n, 3]: (client, unit, rank)
    decisions: dict[int, DkoDecision]  # DKO's decision per client (empty without DKO)
    _: KW_ONLY
    token_bytes: dict[int, int]  # client -> bytes of its identity-token upload
    bytes_down: int  # every buffer broadcast in the round (each client received all of it)
    seconds: float = 0.0
    # client -> bytes of its other uploads (secure aggregation's keys, shares, masked vectors)
    extra_bytes: dict[int, int] = field(default_factory=dict)
    # (client, subspace) of the clients that trained and did not upload (federation.dropout)
    dropped: tuple[tuple[int, int], ...] = ()

    @cached_property
    def placement(self) -> dict[int, tuple[int, int]]:
        """client -> (data unit, rank), from the plan."""
        return {int(c): (int(u), int(r)) for c, u, r in self.plan}


@dataclass
class Accepted:
    """The accepted updates, split: (delta, samples) per subspace and per side vector."""

    subspaces: dict[int, list[tuple[np.ndarray, int]]] = field(default_factory=dict)
    sides: dict[str, list[tuple[np.ndarray, int]]] = field(default_factory=dict)


def single(k: int) -> tuple[int, ...]:
    """A client assigned subspace k trains k alone."""
    return (k,)


class Combine:
    """How accepted updates become one mean per subspace and side vector: the default is the
    sample-weighted mean of the deltas (plain FedAvg aggregation). Privacy settings replace it
    (:class:`fcit_hpc.fed.server.private.PrivateCombine`): equal weights and noise under DP, the
    unmasked group sums under secure aggregation."""

    deltas = True  # updates carry their deltas (False: only their headers travel in the clear)

    def weight(self, u: Update) -> float:
        return float(u.samples)

    def mean(self, key: int | str, got: list[tuple[np.ndarray, float]]) -> np.ndarray:
        """The mean delta of subspace ``key`` (int) or side vector ``key`` (str), float32."""
        return weighted_average([v for v, _ in got], [w for _, w in got])


@dataclass
class Aggregation:
    """The metrics of an aggregated round: ROUND_DTYPE [1] and CLIENT_DTYPE [n] (client order)."""

    round_row: np.ndarray
    client_rows: np.ndarray


# An update value beyond 2^50 is rejected: its square, FedOpt's second moment accumulated over the
# rounds, would leave float32 (3.4e38) within a few rounds and freeze the subspace's server
# optimizer at inf without a word. A LoRA delta is many orders of magnitude smaller.
MAX_ABS_UPDATE = 2.0**50


def update_status(u: Update, numel: int) -> ClientStatus:
    """Accepted, or why the update is rejected (logged)."""
    if u.delta.size != numel:
        log.warning(
            "client %d: update rejected, %d values, expected %d", u.client, u.delta.size, numel
        )
        return ClientStatus.WRONG_SHAPE
    if not np.isfinite(u.delta).all():
        log.warning("client %d: update rejected, contains NaN/Inf", u.client)
        return ClientStatus.NON_FINITE
    if u.delta.size and np.abs(u.delta).max() > MAX_ABS_UPDATE:
        log.warning("client %d: update rejected, a value beyond %g", u.client, MAX_ABS_UPDATE)
        return ClientStatus.OUT_OF_RANGE
    return ClientStatus.ACCEPTED


def check_subspace(u: Update, info: RoundInfo, subspaces_of, s_max: int) -> tuple[int, ...]:
    """The subspaces an update carries: the one DKO assigned its client (when DKO ran), each one
    of the ``s_max`` slots; WireError naming the client otherwise."""
    d = info.decisions.get(u.client)
    if d is not None and d.subspace != u.subspace:
        raise WireError(
            f"update of client {u.client}: subspace = {u.subspace}, DKO assigned {d.subspace}"
        )
    ks = subspaces_of(u.subspace) if 0 <= u.subspace < s_max else (u.subspace,)
    if not all(0 <= k < s_max for k in ks):
        raise WireError(
            f"update of client {u.client}: subspace = {u.subspace} is not one of the {s_max} slots"
        )
    return ks


def _client_row(info: RoundInfo, client: int, subspace, samples, *, loss, seconds, sent, status):
    """One CLIENT_DTYPE record. Bytes received = everything broadcast in the round; bytes sent =
    the client's uploads as they travelled (``fcit_hpc.fed.wire.wire_nbytes``)."""
    unit, rank = info.placement[client]
    d = info.decisions.get(client)
    sim, action = (
        (d.similarity, d.action) if d and status != ClientStatus.BAD_TOKEN else (np.nan, 0)
    )
    sent += info.token_bytes.get(client, 0) + info.extra_bytes.get(client, 0)
    row = (info.stage, info.round, client, rank, unit, subspace, samples, loss, seconds)
    return (*row, sent, info.bytes_down, int(status), sim, action)


def client_rows(
    info: RoundInfo,
    updates: list[Update],
    numel: int,
    sides: dict[str, int] | None = None,
    *,
    subspaces_of: Callable[[int], tuple[int, ...]] = single,
    s_max: int | None = None,
    combine: Combine | None = None,
) -> tuple[np.ndarray, Accepted]:
    """(CLIENT_DTYPE rows sorted by client, the accepted updates split per subspace and side).
    ``sides``: the size of each side vector, in upload order (module docstring); ``s_max``: the
    slots an update's subspace must be one of (None: not checked); ``combine``: the updates'
    weights and whether they carry their deltas (not under secure aggregation)."""
    sides = sides or {}
    combine = combine or Combine()
    acc = Accepted()
    rows = []
    for u in updates:
        if u.client not in info.placement:
            raise WireError(f"update of client {u.client}: not a client of this round's plan")
        ks = check_subspace(u, info, subspaces_of, s_max) if s_max else subspaces_of(u.subspace)
        w = combine.weight(u)
        size = len(ks) * numel + sum(sides.values())
        status = update_status(u, size if combine.deltas else 0)
        if status == ClientStatus.ACCEPTED:
            for j, k in enumerate(ks):
                acc.subspaces.setdefault(k, []).append((u.delta[j * numel : (j + 1) * numel], w))
            off = len(ks) * numel
            for name, size in sides.items():
                acc.sides.setdefault(name, []).append((u.delta[off : off + size], w))
                off += size
        rows.append(
            _client_row(
                info,
                u.client,
                u.subspace,
                u.samples,
                loss=u.loss,
                seconds=u.seconds,
                sent=u.nbytes,
                status=status,
            )
        )
    for c, d in info.decisions.items():  # rejected at the token stage: trained nothing
        if d.subspace < 0:
            rows.append(
                _client_row(
                    info, c, -1, 0, loss=np.nan, seconds=0.0, sent=0, status=ClientStatus.BAD_TOKEN
                )
            )
    for c, k in info.dropped:  # trained, never uploaded: the server knows its assignment
        rows.append(
            _client_row(
                info, c, k, 0, loss=np.nan, seconds=0.0, sent=0, status=ClientStatus.DROPPED
            )
        )
    return np.array(sorted(rows, key=lambda r: r[2]), dtype=CLIENT_DTYPE), acc


def round_row(info: RoundInfo, rows: np.ndarray, num_subspaces: int) -> np.ndarray:
    """ROUND_DTYPE [1]: sample-weighted loss of the accepted clients, sums of bytes, counts."""
    ok = rows[rows["status"] == ClientStatus.ACCEPTED]
    n = int(ok["samples"].sum())
    loss = float((ok["loss"] * ok["samples"]).sum() / n) if n else float("nan")
    sent, recv = int(rows["bytes_sent"].sum()), int(rows["bytes_recv"].sum())
    rec = (info.stage, info.round, loss, n, info.seconds, sent, recv, len(ok), len(rows) - len(ok))
    return np.array([(*rec, num_subspaces)], dtype=ROUND_DTYPE)


def aggregate_round(
    st: RunState,
    updates: list[Update],
    strategy: Strategy,
    info: RoundInfo,
    *,
    subspaces_of: Callable[[int], tuple[int, ...]] = single,
    combine: Combine | None = None,
) -> Aggregation:
    """Validate updates, average per subspace (sample-weighted, client-id order), apply the
    strategy's server update to ``st.adapter`` (and ``st.server_opt``); each side vector (the
    projector, when clients train it; a method's mixer) moves by the sample-weighted mean of
    every accepted client's delta — plain FedAvg, as the reference code averages the projector.
    ``subspaces_of``: the subspaces an update carries, from its assigned subspace; ``combine``:
    the weights and means (:class:`Combine`). Mutates ``st``."""
    numel = st.adapter.shape[1]
    sizes = {name: v.size for name, v in st.sides().items()}
    combine = combine or Combine()
    rows, acc = client_rows(
        info,
        updates,
        numel,
        sizes,
        subspaces_of=subspaces_of,
        s_max=st.adapter.shape[0],
        combine=combine,
    )
    for k in sorted(acc.subspaces):
        mean_delta = combine.mean(k, acc.subspaces[k])
        view = {name: arr[k] for name, arr in st.server_opt.items()}
        st.adapter[k] = strategy.update(st.adapter[k], mean_delta, view)
    for name, got in acc.sides.items():
        mean = combine.mean(name, got)
        setattr(st, name, (getattr(st, name) + mean).astype(np.float32))
    return Aggregation(round_row(info, rows, st.num_subspaces), rows)
