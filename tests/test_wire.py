"""Malformed messages on the wire (what the fuzzing of tests/fuzz_wire.py found): rank 0 refuses a
message that breaks its layout with a WireError naming the rank or client and the field, and
rejects an update whose values would overflow the server optimizer's float32 state."""

import numpy as np
import pytest

from fcit_hpc.errors import EXIT_PROTOCOL, WireError
from fcit_hpc.fed.server import RoundInfo, aggregate_round
from fcit_hpc.fed.server.aggregate import MAX_ABS_UPDATE
from fcit_hpc.fed.strategies import FedAdagrad, FedAvg, ServerOptConfig
from fcit_hpc.fed.wire import (
    pack_predictions,
    pack_tokens,
    pack_updates,
    unpack_predictions,
    unpack_tokens,
    unpack_updates,
)
from fcit_hpc.methods.base import MATCHED, DkoDecision
from fcit_hpc.state.schema import ClientStatus, RunState

PLAN = np.array([[1, 0, 0], [2, 0, 0]], np.int64)


def _updates(rows=((1, 0, 3), (2, 1, 5)), numel=4):
    deltas = [np.full(numel, 0.5, np.float32) for _ in rows]
    return pack_updates([(c, k, n, 1.0, 0.1, 2) for c, k, n in rows], deltas)


def _field(head, item, name):
    """Index of header field ``name`` of item ``item`` in a packed update header."""
    from fcit_hpc.fed.wire import UPDATE_FIELDS

    return item * len(UPDATE_FIELDS) + UPDATE_FIELDS.index(name)


def _set(name, value, item=1):
    head, body = _updates()
    head[_field(head, item, name)] = value
    return [head], [body]


@pytest.mark.parametrize(
    "message,match",
    [
        (lambda: ([_updates()[0][:-1]], [_updates()[1]]), r"rank 0: update header of 15 values"),
        (lambda: ([_updates()[0]], [_updates()[1][:-1]]), r"announces 32 values \(nbytes\)"),
        (lambda: ([_updates()[0]], [np.ones(9, np.float32)]), r"the body holds 9"),
        (lambda: _set("client", np.nan), r"rank 0: update 1: client = nan is not an integer"),
        (lambda: _set("client", -1.0), r"client = -1.0 is not an integer >= 0"),
        (lambda: _set("subspace", 0.5), r"update 1: subspace = 0.5"),
        (lambda: _set("samples", 0.0), r"samples = 0.0 is not an integer >= 1"),
        (lambda: _set("numel", 2.0**63), r"numel = 9.2\d+e\+18"),
        (lambda: _set("steps", np.inf), r"steps = inf"),
        (lambda: _set("client", 1.0), r"update of client 1: sent twice"),
        (lambda: _set("client", 7.0), r"update of client 7: not a client of this round's plan"),
        (lambda: ([_updates()[0]], []), r"update messages: 1 headers, 0 bodies"),
    ],
)
def test_malformed_update_messages_are_refused_naming_the_rank_and_field(message, match):
    heads, bodies = message()
    with pytest.raises(WireError, match=match) as e:
        unpack_updates(heads, bodies, planned={1, 2})
    assert e.value.exit_code == EXIT_PROTOCOL == 76 and e.value.rank_local


def _state(s_max=2, numel=4):
    return RunState(
        "",
        np.zeros((s_max, numel), np.float32),
        np.zeros((s_max, 2)),
        np.zeros(s_max),
        accuracy=np.zeros((1, 1)),
    )


@pytest.mark.parametrize(
    "subspace,decided,match",
    [
        (-1, None, "rank 0: update 0: subspace = -1.0 is not an integer >= 0"),
        (2, None, "update of client 1: subspace = 2 is not one of the 2 slots"),
        (1, 0, "update of client 1: subspace = 1, DKO assigned 0"),
        (0, -1, "update of client 1: subspace = 0, DKO assigned -1"),
    ],
)
def test_an_update_of_another_subspace_than_its_slot_or_dko_is_refused(subspace, decided, match):
    """Before: subspace -1 silently updated the last slot (numpy's negative index), 2 raised an
    IndexError, and an update against DKO's decision was averaged into another subspace."""
    head, body = pack_updates([(1, subspace, 3, 1.0, 0.1, 2)], [np.ones(4, np.float32)])
    decisions = {} if decided is None else {1: DkoDecision(1, decided, 0.9, MATCHED)}
    st = _state()
    before = st.adapter.copy()
    with pytest.raises(WireError, match=match):
        updates = unpack_updates([head], [body], planned={1})
        aggregate_round(
            st,
            updates,
            FedAvg(ServerOptConfig()),
            RoundInfo(0, 0, PLAN, decisions, token_bytes={}, bytes_down=0),
        )
    np.testing.assert_array_equal(st.adapter, before)


def test_an_update_beyond_the_bound_is_rejected_and_the_server_optimizer_stays_finite():
    """Found by the fuzzing: a finite delta of 2.8e19 made FedAdagrad's second moment inf in
    float32, which froze the subspace's server steps at 0 from then on, without a word."""
    big = np.array([0, 0, 0, 2.767e19], np.float32)
    ok = np.full(4, 0.25, np.float32)
    head, body = pack_updates([(1, 0, 3, 1.0, 0.1, 2), (2, 0, 1, 1.0, 0.1, 2)], [big, ok])
    st, strategy = _state(), FedAdagrad(ServerOptConfig(fed_alg="fedadagrad"))
    st.server_opt = strategy.init_state(st.adapter.shape)
    agg = aggregate_round(
        st,
        unpack_updates([head], [body]),
        strategy,
        RoundInfo(0, 0, PLAN, {}, token_bytes={}, bytes_down=0),
    )
    assert agg.client_rows["status"].tolist() == [ClientStatus.OUT_OF_RANGE, ClientStatus.ACCEPTED]
    assert all(np.isfinite(v).all() for v in st.server_opt.values())
    # the accepted client alone moved the subspace, as FedAdagrad moves it from that delta
    ref, ref_st = _state(), strategy.init_state((2, 4))
    ref.adapter[0] = strategy.update(ref.adapter[0], ok, {k: v[0] for k, v in ref_st.items()})
    np.testing.assert_array_equal(st.adapter, ref.adapter)
    # at the bound itself the update is accepted
    at = np.full(4, MAX_ABS_UPDATE, np.float32)
    head, body = pack_updates([(1, 0, 3, 1.0, 0.1, 2)], [at])
    agg = aggregate_round(
        _state(),
        unpack_updates([head], [body]),
        FedAvg(ServerOptConfig()),
        RoundInfo(0, 0, PLAN, {}, token_bytes={}, bytes_down=0),
    )
    assert agg.client_rows["status"].tolist() == [ClientStatus.ACCEPTED]


def test_tokens_from_unplanned_or_repeated_clients_are_refused():
    head, body = pack_tokens([(1, 2), (4, 1)], [np.ones(2, np.float32)] * 2)
    with pytest.raises(WireError, match="token of client 4: not a client of this round's plan"):
        unpack_tokens([head], [body], planned={1, 2})
    with pytest.raises(WireError, match="token of client 1: sent twice"):
        unpack_tokens([head, head], [body, body])
    head[1] = 0  # samples: a mean over no sample
    with pytest.raises(WireError, match="rank 0: token 0: samples = 0"):
        unpack_tokens([head], [body])


def test_predictions_that_are_not_utf8_or_repeated_are_refused():
    head, body = pack_predictions([(0, 3, "é"), (1, 0, "ok")])
    assert unpack_predictions([head], [body]) == {(0, 3): "é", (1, 0): "ok"}
    broken = body.copy()
    broken[0] = 0xFF
    with pytest.raises(WireError, match=r"rank 0: prediction 0: text is not UTF-8"):
        unpack_predictions([head], [broken])
    with pytest.raises(WireError, match=r"rank 1: prediction 0: task 0 sample 3 sent twice"):
        unpack_predictions([head, head], [body, body])
