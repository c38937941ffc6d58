"""Compressed uploads end to end: payloads through the wire and the server's decoder, the
error-feedback residuals in state.h5, and the smoke run with int8 + error feedback — its bytes
by formula, world-size invariance (3 thread ranks) and a killed 2-rank run resumed bitwise."""

from __future__ import annotations

import numpy as np
import pytest

from fcit_hpc.config import load_config
from fcit_hpc.errors import StateError
from fcit_hpc.fed.codec import Codec, decode_rows, encode_rows
from fcit_hpc.fed.compress import Compression, residual_parts
from fcit_hpc.fed.server.run_state import check_residuals
from fcit_hpc.fed.wire import (
    TOKEN_WIDTH,
    UPDATE_WIDTH,
    pack_tokens,
    pack_updates,
    unpack_tokens,
    unpack_updates,
)
from fcit_hpc.state.schema import (
    ClientStatus,
    comparable_content,
    read_state,
    same_content,
    write_state,
)

from .conftest import ROOT, fcit, mpiexec, smoke_serial
from .test_runtime_mpi import FCIT, SMOKE
from .test_tracking import assert_events_equal_metrics, read_events

INT8 = [
    "compress.subspace=int8",
    "compress.token=int8",
    "compress.download=int8",
    "compress.block_size=32",
]
TB = ["log.tensorboard=true"]


def _comp(*over):
    return Compression(load_config(ROOT / "configs/smoke.yaml", [*INT8, *over]).compress)


def test_updates_through_the_wire_decode_to_the_codecs_values():
    """Client side codes with error feedback, the server's decoder gives what the codec's
    decode gives; a wrong length and an undecodable payload are rejected by their size."""
    comp = _comp("compress.projector=bf16")
    numel, sides = 40, {"projector": 10}
    g = np.random.default_rng(0)
    deltas = [g.standard_normal(50).astype(np.float32) for _ in range(3)]
    rows = [(c, c % 2, 5, 1.0, 0.1, 2) for c in range(3)]
    payloads = [
        comp.encode_update(c, (k,), numel, sides, delta=d)
        for (c, k, *_), d in zip(rows, deltas, strict=True)
    ]
    h, b = pack_updates(rows, deltas, payloads)
    ups = unpack_updates([h], [b], decode=comp.update_decoder(numel, sides, lambda k: (k,)))
    int8, bf16 = Codec("int8", 32), Codec("bf16")
    for u, d in zip(ups, deltas, strict=True):
        want = np.concatenate(
            [int8.decode(int8.encode(d[:40]), 40), bf16.decode(bf16.encode(d[40:]), 10)]
        )
        assert np.array_equal(u.delta, want)
        assert u.nbytes == UPDATE_WIDTH * 8 + int8.nbytes(40) + bf16.nbytes(10)
        # the residual the client keeps is what the codec lost
        np.testing.assert_array_equal(comp.residuals[(u.client, u.subspace)], d[:40] - want[:40])
        np.testing.assert_array_equal(comp.residuals[(u.client, -1)], d[40:] - want[40:])
    assert comp.touched == {(c, k) for c in range(3) for k in (c % 2, -1)}
    # malformed: one value short (its own length), and a payload cut by a byte
    short = deltas[0][:-1]
    p_short = comp.encode_update(7, (0,), numel, sides, delta=short)
    h, b = pack_updates([(7, 0, 5, 1.0, 0.1, 2)], [short], [p_short])
    (u,) = unpack_updates([h], [b], decode=comp.update_decoder(numel, sides, lambda k: (k,)))
    assert u.delta.size == 49
    h, b = pack_updates([(8, 0, 5, 1.0, 0.1, 2)], [deltas[0]], [payloads[0][:-1]])
    (u,) = unpack_updates([h], [b], decode=comp.update_decoder(numel, sides, lambda k: (k,)))
    assert u.delta.size == 0


def test_download_rows_coded_one_by_one():
    m = np.random.default_rng(1).standard_normal((3, 70)).astype(np.float32)
    c = Codec("int4", 16)
    buf = encode_rows(c, m)
    assert buf.size == 3 * c.nbytes(70)
    want = np.stack([c.decode(c.encode(r), 70) for r in m])
    assert np.array_equal(decode_rows(c, buf, 3, 70), want)


def test_non_finite_update_stays_non_finite_and_its_residual_restarts():
    from fcit_hpc.fed.server.aggregate import update_status

    comp = _comp()
    d = np.ones(40, np.float32)
    d[3] = np.nan
    p = comp.encode_update(1, (0,), 40, {}, delta=d)
    h, b = pack_updates([(1, 0, 5, 1.0, 0.1, 2)], [d], [p])
    (u,) = unpack_updates([h], [b], decode=comp.update_decoder(40, {}, lambda k: (k,)))
    assert update_status(u, 40) == ClientStatus.NON_FINITE
    assert not comp.residuals[(1, 0)].any()


def test_tokens_coded_and_decoded():
    comp = _comp()
    mus = [np.linspace(-1, 1, 64, dtype=np.float32), np.full(63, 0.5, np.float32)]
    h, b = pack_tokens([(3, 10), (4, 11)], mus, [comp.encode_token(m) for m in mus])
    ups = unpack_tokens([h], [b], decode=comp.decode_token)
    int8 = Codec("int8", 32)
    assert np.array_equal(ups[0].values, int8.decode(int8.encode(mus[0]), 64))
    assert ups[1].values.size == 63  # a wrong width stays wrong (DKO rejects it)
    assert ups[0].nbytes == TOKEN_WIDTH * 8 + int8.nbytes(64)


def test_residuals_reach_the_clients_rank_and_come_back():
    from fcit_hpc.fed.comm import run_threads

    stored = {(c, k): np.full(4, c + 0.5 * k, np.float32) for c in range(4) for k in (0, 1)}
    plan = np.array([[0, 0, 0], [2, 0, 1], [3, 0, 2]], np.int64)  # client 1 not in the round

    def body(comm):
        comp = _comp()
        comp.receive(comm, residual_parts(stored, plan, 3) if comm.is_root else None)
        got = dict(comp.residuals)
        mine = [int(c) for c, _, r in plan if r == comm.rank]
        for c in mine:
            comp.encode_update(c, (0,), 4, {}, delta=np.ones(4, np.float32))
        return got, comp.send_back(comm)

    out = run_threads(3, body)
    for rank, (got, _) in enumerate(out):
        want = {key for key in stored if key[0] == plan[rank, 0]}
        assert set(got) == want
    back = out[0][1]
    assert set(back) == {(0, 0), (2, 0), (3, 0)} and out[1][1] is None


def test_residuals_stored_read_and_checked(tmp_path):
    from fcit_hpc.state.schema import RunState

    n = 24
    st = RunState(
        "",
        np.zeros((4, n), np.float32),
        np.zeros((4, 8), np.float32),
        np.zeros(4),
        accuracy=np.full((2, 2), np.nan),
    )
    st.residuals = {(5, 1): np.arange(n, dtype=np.float32), (2, 0): np.ones(n, np.float32)}
    write_state(tmp_path, st)
    back = read_state(tmp_path).residuals
    assert list(back) == [(5, 1), (2, 0)] or set(back) == {(5, 1), (2, 0)}
    for key, v in st.residuals.items():
        assert back[key].tobytes() == v.tobytes()
    check_residuals(read_state(tmp_path), n, "state.h5")
    st.residuals[(1, 0)] = np.ones(n - 1, np.float32)
    with pytest.raises(StateError, match="client 1, part 0"):
        check_residuals(st, n, "state.h5")
    st.residuals = {(1, -1): np.ones(3, np.float32)}  # no projector in this model
    with pytest.raises(StateError, match="part -1"):
        check_residuals(st, n, "state.h5")
    import h5py

    st.residuals = {(2, 0): np.ones(n, np.float32)}
    write_state(tmp_path, st)
    with h5py.File(tmp_path / "state.h5", "r+") as f:
        del f["compress/keys"]
        f["compress/keys"] = np.array([[2, 0, n + 1]], np.int64)
    with pytest.raises(StateError, match="/compress/keys"):
        read_state(tmp_path)


# --- the smoke run with int8 and error feedback ------------------------------------------------


@pytest.fixture(scope="module")
def int8_serial(tmp_path_factory):
    return smoke_serial(tmp_path_factory.mktemp("int8") / "run", *INT8, *TB)


@pytest.mark.slow
def test_int8_run_bytes_by_formula_and_residuals_of_every_trained_client(int8_serial, serial_run):
    st = read_state(int8_serial)
    numel, dim = st.adapter.shape[1], st.tokens.shape[1]
    int8 = Codec("int8", 32)
    per_client = UPDATE_WIDTH * 8 + int8.nbytes(numel) + TOKEN_WIDTH * 8 + int8.nbytes(dim)
    assert per_client < (UPDATE_WIDTH + TOKEN_WIDTH) * 8 + 4 * (numel + dim) * 0.3
    ok = st.clients[st.clients["status"] == ClientStatus.ACCEPTED]
    assert len(ok) == len(st.clients) and (st.clients["bytes_sent"] == per_client).all()
    trained = {(int(c), int(k)) for c, k in zip(ok["client"], ok["subspace"], strict=True)}
    assert set(st.residuals) == trained
    # some client came back to its subspace: its residual was fed into a later upload
    assert len(trained) < len(ok)
    for v in st.residuals.values():
        assert v.shape == (numel,) and np.isfinite(v).all() and 0 < np.abs(v).max() < 1e-3
    # the download: every round's adapter broadcast, int8 instead of float32, per client
    plain = read_state(serial_run).clients["bytes_recv"]
    s_max = st.adapter.shape[0]
    assert (plain - st.clients["bytes_recv"] == s_max * (4 * numel - int8.nbytes(numel))).all()


@pytest.mark.slow
def test_int8_run_tensorboard_events_equal_metrics(int8_serial):
    """The run's TensorBoard event files, read by TensorBoard's reader, hold metrics.jsonl."""
    assert_events_equal_metrics(
        int8_serial, load_config(int8_serial / "config.yaml").federation.num_rounds
    )
    events = read_events(int8_serial)
    st = read_state(int8_serial)
    assert events[("round/bytes_sent", 0)] == float(st.rounds["bytes_sent"][0])
    assert any(t.startswith("eval/accuracy/") for t, _ in events)
    assert any(t.startswith("round/phases/") for t, _ in events)
    assert ("summary/last", 2) in events


@pytest.mark.slow
def test_int8_three_thread_ranks_equal_one_rank(tmp_path):
    """In-process worlds of 1 and 3 ranks (both in this process, whose kernels run in Triton's
    interpreter: compared with each other, not with the plain process's run)."""
    from fcit_hpc.fed.comm import LocalComm, run_threads
    from fcit_hpc.run import run_federated

    one, three = tmp_path / "one", tmp_path / "three"
    runs = {}
    for d in (one, three):
        d.mkdir()
        runs[d] = load_config(ROOT / "configs/smoke.yaml", [*INT8, f"out_dir={d}"])
    assert run_federated(runs[one], LocalComm(), one, None).done
    states = run_threads(3, lambda comm: run_federated(runs[three], comm, three, None))
    assert states[0].done and sorted(set(states[0].clients["rank"].tolist())) == [0, 1, 2]
    assert states[0].residuals
    assert same_content(comparable_content(one), comparable_content(three)) == []


@pytest.mark.mpi
def test_int8_killed_two_rank_run_resumes_bitwise_on_one_rank(int8_serial, tmp_path):
    killed = tmp_path / "killed"
    kill = ["debug.kill_rank=1", "debug.kill_stage=1", "debug.kill_round=1"]
    p = mpiexec(2, FCIT, "run", SMOKE, "--out", str(killed), *INT8, *TB, *kill, timeout=180)
    assert p.returncode != 0
    assert read_state(killed).residuals  # stopped part-way, residuals stored
    p = fcit("run", "--resume", str(killed))  # on one rank: the residuals follow the clients
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_content(comparable_content(int8_serial), comparable_content(killed)) == []
    # TensorBoard's events, rewritten from the log at the resume, equal the log
    assert_events_equal_metrics(killed, load_config(killed / "config.yaml").federation.num_rounds)
