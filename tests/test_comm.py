import sys

import numpy as np
import pytest

from fcit_hpc.fed.comm import LocalComm
from fcit_hpc.fed.wire import TOKEN_WIDTH, UPDATE_WIDTH

from .conftest import ROOT, mpiexec


def test_local_comm_is_world_of_one():
    c = LocalComm()
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = c.bcast_array(a)
    assert np.array_equal(a, b) and b is not a
    assert [x.tolist() for x in c.gatherv(np.array([1, 2]))] == [[1, 2]]
    assert c.scatterv([np.array([5, 6])], np.int64).tolist() == [5, 6]
    assert c.allreduce_max(7) == 7 and c.bytes_broadcast == 6 * 8 + a.nbytes


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2, 3])
def test_mpi_collectives(n):
    p = mpiexec(n, sys.executable, str(ROOT / "tests/mpi/comm_check.py"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(line for line in p.stdout.splitlines() if "ok" in line) == [
        f"rank {i}/{n} ok" for i in range(n)
    ]


def test_no_module_but_comm_imports_mpi4py():
    offenders = [
        str(f.relative_to(ROOT))
        for f in (ROOT / "fcit_hpc").rglob("*.py")
        if ("import mpi4py" in f.read_text() or "from mpi4py" in f.read_text())
        and f.name != "comm.py"
    ]
    assert offenders == []


class RecordingComm(LocalComm):
    """World of one that keeps a copy of every array broadcast and gathered."""

    def __init__(self):
        self.sent_down: list[np.ndarray] = []
        self.sent_up: list[np.ndarray] = []

    def bcast_array(self, arr, root=0):
        self.sent_down.append(np.array(arr, copy=True))
        return super().bcast_array(arr, root)

    def gatherv(self, arr, root=0):
        self.sent_up.append(np.array(arr, copy=True))
        return super().gatherv(arr, root)


def test_round_bytes_are_the_bytes_of_the_buffers_that_travel(tmp_path, monkeypatch):
    """bytes_recv of every client = every buffer broadcast during its round (each with the
    int64 header of dtype, ndim and 4 dims); bytes_sent = its update header row and delta plus its
    identity-token header row and token, counted here from the recorded arrays' sizes."""
    from fcit_hpc.config import load_config
    from fcit_hpc.fed import loop
    from fcit_hpc.run import run_federated
    from fcit_hpc.timers import COUNTERS, GAUGES, PHASES

    cfg = load_config(ROOT / "configs/smoke.yaml", ["eval.enabled=false"])
    comm = RecordingComm()
    down_of, up_of = {}, {}
    original = loop.run_round

    def recorded_round(ctx, role, stage, rnd):
        d0, u0 = len(comm.sent_down), len(comm.sent_up)
        original(ctx, role, stage, rnd)
        down_of[stage, rnd] = comm.sent_down[d0:]
        up_of[stage, rnd] = comm.sent_up[u0:]

    monkeypatch.setattr(loop, "run_round", recorded_round)
    st = run_federated(cfg, comm, tmp_path, None)
    assert len(down_of) == 4 and st.adapter.shape[0] == 4  # 2 stages x 2 rounds, S_max = 4
    numel, dim = st.adapter.shape[1], st.tokens.shape[1]
    for (stage, rnd), arrays in down_of.items():
        # plan, adapter [S_max, P], tokens, live count, projector, DKO assignment
        assert any(a.shape == st.adapter.shape for a in arrays)
        expected_down = sum(6 * 8 + a.size * a.itemsize for a in arrays)
        # gathered: token headers, tokens, update headers, deltas (one rank, so all clients),
        # then the rank's phase timers (fcit_hpc.timers; no part of the round's traffic)
        tok_head, toks, upd_head, deltas, timer = up_of[stage, rnd]
        assert (
            timer.dtype == np.float64
            and timer.size == len(PHASES) + len(COUNTERS) + len(GAUGES) + 1
        )
        assert toks.size == tok_head.size // TOKEN_WIDTH * dim * 4  # uncompressed: float32 bytes
        assert deltas.size == upd_head.size // UPDATE_WIDTH * numel * 4
        rows = st.clients[(st.clients["stage"] == stage) & (st.clients["round"] == rnd)]
        assert len(rows) == 3
        for r in rows:
            assert r["bytes_recv"] == expected_down
            assert r["bytes_sent"] == UPDATE_WIDTH * 8 + numel * 4 + TOKEN_WIDTH * 8 + dim * 4
        rnd_row = st.rounds[(st.rounds["stage"] == stage) & (st.rounds["round"] == rnd)][0]
        assert rnd_row["bytes_recv"] == 3 * expected_down


def test_to_host_copies_any_float_tensor_to_float32():
    import torch

    from fcit_hpc.host import to_host

    t = torch.tensor([[1.5, -2.25], [3.0, 0.125]], dtype=torch.bfloat16, requires_grad=True)
    a = to_host(t * 1)
    assert a.dtype == np.float32 and a.flags.c_contiguous
    assert a.tolist() == [[1.5, -2.25], [3.0, 0.125]]
    f = torch.arange(4.0)
    b = to_host(f)
    f += 1  # the host copy shares no memory with the tensor
    assert b.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert to_host(torch.arange(3), np.int64).dtype == np.int64
