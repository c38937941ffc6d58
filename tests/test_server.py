"""The server room on hand-made inputs (planning, DKO, aggregation), the in-process multi-rank
ThreadComm, and whole runs on it: P = 3 with uneven client counts and rank 0 hosting no clients."""

import numpy as np
import pytest

from fcit_hpc.config import load_config
from fcit_hpc.fed.comm import LocalComm, ThreadComm, bcast_nbytes, run_threads
from fcit_hpc.fed.server import RoundInfo, aggregate_round, plan_round, run_dko
from fcit_hpc.fed.server.dko import DkoResult
from fcit_hpc.fed.strategies import FedAvg, ServerOptConfig
from fcit_hpc.fed.wire import (
    UPDATE_WIDTH,
    Update,
    pack_predictions,
    pack_tokens,
    pack_updates,
    unpack_predictions,
    unpack_tokens,
    unpack_updates,
    wire_nbytes,
)
from fcit_hpc.methods.base import MATCHED, NEW, DkoDecision
from fcit_hpc.methods.disco import Disco
from fcit_hpc.state.schema import ClientStatus, RunState, comparable_content, same_content

from .conftest import ROOT, method_of


class _Schedule:
    """Every client of a round trains data unit 10·stage + slot."""

    def unit_of(self, stage, round_, slot):
        return 10 * stage + slot


def _cfg(*overrides):
    return load_config(ROOT / "configs/smoke.yaml", list(overrides))


# --- planning -----------------------------------------------------------------------------------


def _plan(cfg, stage, round_, world):
    return plan_round(
        cfg.federation, _Schedule(), seed=cfg.seed, stage=stage, round_=round_, world=world
    )


@pytest.mark.parametrize(
    "world,hosts,ranks",
    [(1, False, [0, 0, 0]), (3, True, [0, 1, 2]), (3, False, [1, 2, 1]), (2, False, [1, 1, 1])],
)
def test_plan_deals_clients_round_robin_over_worker_ranks(world, hosts, ranks):
    cfg = _cfg(f"federation.server_hosts_clients={str(hosts).lower()}")
    plan = _plan(cfg, 1, 0, world)
    assert plan.dtype == np.int64 and plan.shape == (3, 3)  # 10 clients x 0.3
    assert plan[:, 1].tolist() == [10, 11, 12]
    assert plan[:, 2].tolist() == ranks
    assert list(plan[:, 0]) == sorted(set(plan[:, 0])) and (plan[:, 0] < 10).all()
    # the same clients at every world size: only the ranks differ
    assert np.array_equal(_plan(cfg, 1, 0, 1)[:, :2], plan[:, :2])


def test_plan_differs_between_rounds_and_is_reproducible():
    cfg = _cfg()
    a, b = (_plan(cfg, 0, r, 1)[:, 0].tolist() for r in (0, 1))
    assert a == _plan(cfg, 0, 0, 1)[:, 0].tolist()
    assert a != b or a == _plan(cfg, 0, 2, 1)[:, 0].tolist()


# --- DKO ----------------------------------------------------------------------------------------


def _state(s_max=3, dim=2):
    return RunState(
        "",
        np.zeros((s_max, 4), np.float32),
        np.zeros((s_max, dim), np.float32),
        np.zeros(s_max),
        accuracy=np.zeros((1, 1)),
    )


def test_dko_validates_tokens_then_assigns_in_client_order():
    cfg = _cfg("method.tau=0.9")
    st = _state()
    rows = [(5, 2), (1, 4), (3, 1), (7, 1), (9, 2)]
    vals = [
        np.array([1.0, 0.0], np.float32),  # 5: like client 1 -> matched
        np.array([1.0, 0.1], np.float32),  # 1: first -> new subspace 0
        np.array([0.0, 1.0], np.float32),  # 3: orthogonal -> new subspace 1
        np.array([np.nan, 1.0], np.float32),  # 7: non-finite -> rejected
        np.array([1.0, 0.0, 0.0], np.float32),  # 9: wrong dimension -> rejected
    ]
    # two ranks' messages, in any order: the server sorts by client id
    h1, b1 = pack_tokens(rows[:2], vals[:2])
    h2, b2 = pack_tokens(rows[2:], vals[2:])
    res = run_dko(st, method_of(Disco, cfg), unpack_tokens([h1, h2], [b1, b2]))
    d = res.decisions
    assert [d[c].subspace for c in (1, 3, 5, 7, 9)] == [0, 1, 0, -1, -1]
    assert (d[1].action, d[3].action, d[5].action) == (NEW, NEW, MATCHED)
    assert st.num_subspaces == 2
    # running mean of client 1 (4 samples) and client 5 (2 samples)
    np.testing.assert_allclose(st.tokens[0], [1.0, 4 * 0.1 / 6], rtol=1e-6)
    assert st.token_counts.tolist() == [6, 1, 0]
    assert res.token_bytes == {1: 32 + 8, 3: 32 + 8, 5: 32 + 8, 7: 32 + 8, 9: 32 + 12}
    assert res.assignment().tolist() == [[1, 0], [3, 1], [5, 0], [7, -1], [9, -1]]


# --- aggregation --------------------------------------------------------------------------------


def _update(client, k, n, delta, loss=1.0):
    delta = np.asarray(delta, np.float32)
    return Update(
        client,
        k,
        n,
        loss,
        seconds=0.5,
        steps=3,
        delta=delta,
        nbytes=wire_nbytes(np.zeros(7), delta),
    )


def test_aggregation_weighted_mean_statuses_and_bytes():
    st = _state(s_max=2)
    st.num_subspaces = 2
    st.adapter[:] = 1.0
    plan = np.array([[c, 40 + c, c % 2] for c in (1, 2, 3, 4, 6)], np.int64)
    updates = [
        _update(1, 0, 1, [1, 2, 3, 4], loss=2.0),
        _update(2, 0, 3, [5, 6, 7, 8], loss=1.0),
        _update(3, 1, 2, [np.nan, 0, 0, 0]),
        _update(4, 1, 2, [1, 1, 1]),
    ]
    decisions = {c: DkoDecision(c, k, 0.95, MATCHED) for c, k in ((1, 0), (2, 0), (3, 1), (4, 1))}
    decisions[6] = DkoDecision(6, -1, float("nan"), 0)
    tokens = dict.fromkeys((1, 2, 3, 4, 6), 32)
    info = RoundInfo(0, 1, plan, decisions, token_bytes=tokens, bytes_down=1000)
    agg = aggregate_round(st, updates, FedAvg(ServerOptConfig()), info)
    # subspace 0: 1 + (1·[1,2,3,4] + 3·[5,6,7,8]) / 4 ; subspace 1: nothing accepted
    np.testing.assert_array_equal(st.adapter[0], [5.0, 6.0, 7.0, 8.0])
    np.testing.assert_array_equal(st.adapter[1], [1.0, 1.0, 1.0, 1.0])
    rows = agg.client_rows
    assert rows["client"].tolist() == [1, 2, 3, 4, 6]
    assert rows["status"].tolist() == [
        ClientStatus.ACCEPTED,
        ClientStatus.ACCEPTED,
        ClientStatus.NON_FINITE,
        ClientStatus.WRONG_SHAPE,
        ClientStatus.BAD_TOKEN,
    ]
    assert rows["unit"].tolist() == [41, 42, 43, 44, 46] and rows["rank"].tolist() == [
        1,
        0,
        1,
        0,
        0,
    ]
    assert rows["bytes_sent"].tolist() == [56 + 16 + 32] * 3 + [56 + 12 + 32, 32]
    assert (rows["bytes_recv"] == 1000).all()
    assert rows["subspace"][-1] == -1 and np.isnan(rows["similarity"][-1])
    r = agg.round_row[0]
    assert (r["accepted"], r["rejected"], r["samples"]) == (2, 3, 4)
    assert r["loss"] == pytest.approx((2.0 * 1 + 1.0 * 3) / 4)
    assert r["bytes_sent"] == rows["bytes_sent"].sum() and r["num_subspaces"] == 2


# --- wire ----------------------------------------------------------------------------------------


def test_wire_round_trips_and_counts_bytes():
    deltas = [np.arange(3, dtype=np.float32), np.arange(2, dtype=np.float32)]
    h, b = pack_updates([(4, 1, 7, 0.25, 0.1, 9), (2, 0, 5, 0.5, 0.2, 3)], deltas)
    u = unpack_updates([h], [b])
    assert [x.client for x in u] == [2, 4] and u[1].delta.tolist() == [0, 1, 2]
    assert (u[1].subspace, u[1].samples, u[1].loss, u[1].steps) == (1, 7, 0.25, 9)
    assert u[0].nbytes == UPDATE_WIDTH * 8 + 2 * 4
    preds = {(0, 1): "héllo", (2, 0): ""}
    h, b = pack_predictions([(t, i, p) for (t, i), p in preds.items()])
    assert unpack_predictions([h], [b]) == preds


# --- ThreadComm ---------------------------------------------------------------------------------


def test_thread_comm_collectives_uneven_and_bytes_as_mpi():
    def body(comm: ThreadComm):
        a = comm.bcast_array(np.arange(6, dtype=np.float32).reshape(2, 3) if comm.is_root else None)
        got = comm.gatherv(np.full(comm.rank, comm.rank, np.int64))  # rank r sends r values
        part = comm.scatterv(
            [np.arange(r + 1) for r in range(comm.size)] if comm.is_root else None, np.int64
        )
        comm.barrier()
        return (
            a.tolist(),
            None if got is None else [g.tolist() for g in got],
            part.tolist(),
            (comm.bytes_broadcast),
        )

    out = run_threads(3, body)
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    for rank, (a, got, part, nbytes) in enumerate(out):
        assert a == arr.tolist() and part == list(range(rank + 1))
        assert nbytes == bcast_nbytes(arr) == 48 + 24
        assert got == ([[], [1], [2, 2]] if rank == 0 else None)
    assert LocalComm().bcast_array(arr) is not None  # same interface, world of one


def test_thread_comm_raises_the_failing_rank():
    def body(comm):
        if comm.rank == 2:
            raise ValueError("boom")
        return comm.bcast_array(np.zeros(1, np.float32))

    with pytest.raises(RuntimeError, match="rank 2"):
        run_threads(3, body, timeout=30)


@pytest.mark.slow
def test_three_thread_ranks_without_server_clients_equal_one_rank(tmp_path):
    """P = 3, rank 0 hosts no clients, ranks 1 and 2 train 2 and 1 clients: the same state as a
    world of one (the config differs only in server_hosts_clients)."""
    from fcit_hpc.run import run_federated

    over = ["federation.server_hosts_clients=false"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    serial = run_federated(_cfg(*over, f"out_dir={a}"), LocalComm(), a, None)
    cfg = _cfg(*over, f"out_dir={b}")
    states = run_threads(3, lambda comm: run_federated(cfg, comm, b, None))
    assert states[1] is None and states[2] is None and states[0].done and serial.done
    ranks = states[0].clients["rank"]
    assert 0 not in ranks and sorted(set(ranks.tolist())) == [1, 2]
    per_round = np.bincount(ranks[:3], minlength=3).tolist()  # the first round
    assert per_round == [0, 2, 1]  # uneven: rank 1 hosts two clients, rank 2 one
    assert same_content(comparable_content(a), comparable_content(b)) == []


def test_dko_result_assignment_empty():
    assert DkoResult().assignment().shape == (0, 2)
