"""Faults of a real cluster (issue 17): a stop signal (preemption) ends every rank at a round
boundary with exit 75 and the run continues bitwise equal; a failed write of state.h5 leaves the
previous state as it was; ranks started with different configs or code stop at start-up; a run
directory stopped before its first round is continued from its config.yaml.

The SLURM side (requeue, `scancel --signal=TERM`) is in tests/test_slurm.py."""

import argparse
import hashlib
import time

import pytest

from fcit_hpc.cli import RunStart, resolve_run
from fcit_hpc.config import load_config, to_yaml
from fcit_hpc.errors import ConfigError, StateError
from fcit_hpc.fed import handshake
from fcit_hpc.fed.comm import run_threads
from fcit_hpc.state.schema import comparable_content, read_state, same_content

from .conftest import fcit, mpiexec
from .test_runtime_mpi import FCIT, SMOKE, metrics_content

# --- stop on a signal ------------------------------------------------------------------------


@pytest.mark.mpi
def test_stop_signal_ends_every_rank_at_a_round_boundary_then_resume_is_bitwise(
    serial_run, tmp_path
):
    """Rank 1 gets SIGTERM while training its first client of stage 1 round 0: that round
    completes and is stored, every rank stops before the next one (rank 0 never saw the signal:
    the ranks vote), exit 75 with a line naming the stage, round and run directory; resuming
    gives the uninterrupted run's state and metrics."""
    out = tmp_path / "stopped"
    kill = ["debug.kill_rank=1", "debug.kill_stage=1", "debug.kill_round=0"]
    p = mpiexec(2, FCIT, "run", SMOKE, "--out", str(out), *kill, "debug.kill_signal=TERM")
    assert p.returncode == 75, p.stderr[-3000:]
    assert (
        f"fcit: stopped on SIGTERM after stage 1 round 0, the last completed round "
        f"({out / 'state.h5'}); continue with `fcit run --resume {out}`" in p.stderr
    )
    st = read_state(out)
    assert (st.stage, st.round, st.done) == (1, 0, False)
    assert len(st.rounds) == 3  # stage 0: rounds 0, 1; stage 1: round 0
    p = fcit("run", "--resume", str(out))  # one rank: the state is world-size invariant
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_content(comparable_content(serial_run), comparable_content(out)) == []
    assert metrics_content(out) == metrics_content(serial_run)


# --- a failed write of state.h5 --------------------------------------------------------------

# Runs fcit with h5py failing (ENOSPC) half way through the FAULT_AT-th state file rank 0 writes,
# after recording the sha256 of the state file then in place.
WRITE_FAULT = """
import errno, hashlib, os, sys
from pathlib import Path
import h5py
from fcit_hpc import cli

fail_at, record = int(os.environ["FAULT_AT"]), Path(os.environ["FAULT_RECORD"])
calls = [0]
create = h5py.Group.create_dataset

def failing(self, name, *args, **kw):
    if name == "clients":  # /metrics/clients: once per state file, after adapter and tokens
        calls[0] += 1
        if calls[0] == fail_at:
            final = Path(self.file.filename).with_name("state.h5")
            record.write_text(hashlib.sha256(final.read_bytes()).hexdigest())
            raise OSError(errno.ENOSPC, "No space left on device")
    return create(self, name, *args, **kw)

h5py.Group.create_dataset = failing
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.mpi
def test_failed_state_write_leaves_the_previous_state_and_ends_the_job(tmp_path):
    """Disk full half way through the second state file (after stage 0 round 1): the job ends
    (rank 0 fails alone and aborts the others) with a message naming the file; the state of
    stage 0 round 0 is still there, byte for byte, and no temporary file is left."""
    import sys

    script, record, out = tmp_path / "fault.py", tmp_path / "sha", tmp_path / "run"
    script.write_text(WRITE_FAULT)
    t0 = time.monotonic()
    p = mpiexec(
        2,
        sys.executable,
        str(script),
        "run",
        SMOKE,
        "--out",
        str(out),
        env={"FAULT_AT": "2", "FAULT_RECORD": str(record)},
        timeout=120,
    )
    assert p.returncode == 74, (p.returncode, p.stderr[-3000:])
    assert time.monotonic() - t0 < 90
    assert (
        f"fcit: error: {out / 'state.h5'}: cannot write the state file ([Errno 28] No space "
        "left on device); the previous state is unchanged" in p.stderr
    )
    assert hashlib.sha256((out / "state.h5").read_bytes()).hexdigest() == record.read_text()
    st = read_state(out)
    assert (st.stage, st.round, st.done) == (0, 0, False)
    # no temporary file left (the run directory's lock file stays, unlocked)
    assert sorted(x.name for x in out.iterdir() if x.name.startswith(".")) == [".fcit.lock"]


# --- ranks that differ ------------------------------------------------------------------------


@pytest.mark.mpi
def test_rank_with_another_config_stops_the_job_at_start(tmp_path):
    """Rank 1 is started with another override (seed=1): exit 2 before anything is written."""
    out = tmp_path / "mixed"
    cmd = (
        f'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then set -- seed=1; fi; '
        f'exec {FCIT} run {SMOKE} --out {out} "$@"'
    )
    p = mpiexec(2, "sh", "-c", cmd, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert (
        "fcit: error: rank(s) 1 resolved another config than rank 0 (the digests of the "
        "resolved configs differ)" in p.stderr
    )
    assert not out.exists()


def _handshake(texts, errors=None):
    """check_same_job on len(texts) thread ranks: rank r resolved texts[r] (None: failed with
    errors[r]); returns what each rank raised (None: passed)."""

    def body(comm):
        try:
            handshake.check_same_job(comm, texts[comm.rank], errors[comm.rank] if errors else None)
        except ConfigError as e:
            return e
        return None

    return run_threads(len(texts), body)


def test_handshake_names_the_ranks_that_differ():
    assert _handshake(["a", "a", "a"]) == [None, None, None]
    got = _handshake(["a", "b", "a"])
    assert all("rank(s) 1 resolved another config than rank 0" in str(e) for e in got)
    bad = ConfigError("seed: expected an integer")
    got = _handshake(["a", None], errors=[None, bad])
    assert "rank(s) 1 could not load the config" in str(got[0])
    assert got[1] is bad and bad.rank_local  # rank 1 prints its own message, aborts the job
    # other code on rank 2 (its record's source digest differs)
    recs = [handshake._record("a") for _ in range(3)]
    recs[2][-1] ^= 1
    verdict = handshake._verdict(recs)
    assert verdict.tolist() == [0, 0, handshake.OTHER_CODE]
    assert "rank(s) 2 run other fcit_hpc code than rank 0" in handshake._message(verdict)


# --- continuing a run directory ----------------------------------------------------------------


def _args(*items, resume=None, out=None, cont=False):
    items = list(items)
    config = items[0] if items and "=" not in items[0] else None
    return argparse.Namespace(
        config=config,
        overrides=items[1:] if config else items,
        resume=resume,
        out=out,
        cont=cont,
    )


def test_resume_of_a_run_stopped_before_its_first_round_starts_afresh(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(SMOKE, [f"out_dir={run}"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    start = resolve_run(_args(resume=str(run)))
    assert start.state is None and not start.write_config and start.run_dir == run
    assert to_yaml(start.cfg) == to_yaml(cfg)
    with pytest.raises(StateError, match="state.h5: state file not found"):
        resolve_run(_args(resume=str(tmp_path / "none")))


def test_continue_takes_a_run_of_the_same_config_only(serial_run, tmp_path):
    """--continue: the stored run when its config equals the given one (out_dir aside), a fresh
    start when the directory is empty; another config is an error naming the difference."""
    start = resolve_run(_args(SMOKE, out=str(serial_run), cont=True))
    assert isinstance(start, RunStart) and start.state is not None and start.state.done
    with pytest.raises(ConfigError, match=r"holds a run of another config \(stored 'seed: 0'"):
        resolve_run(_args(SMOKE, "seed=3", out=str(serial_run), cont=True))
    with pytest.raises(StateError, match="a run already exists here"):
        resolve_run(_args(SMOKE, out=str(serial_run)))
    fresh = resolve_run(_args(SMOKE, out=str(tmp_path / "new"), cont=True))
    assert fresh.state is None and fresh.write_config


def test_agree_is_a_vote_of_all_ranks():
    from fcit_hpc.fed import preempt

    def body(comm):
        return comm.allreduce_max(comm.rank * 3), preempt.agree(comm)

    assert run_threads(3, body) == [(6, "")] * 3
    preempt._received.append(15)
    try:
        assert run_threads(2, lambda comm: preempt.agree(comm)) == ["SIGTERM"] * 2
    finally:
        preempt._received.clear()
