"""Bad input and faults (issue 26): the run directory's lock, pre-flight, resume's config check,
state checksums, stop signals at any time, the top-level handler and ``fcit export``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import h5py
import numpy as np
import pytest

from fcit_hpc.config import load_config
from fcit_hpc.errors import ConfigError, RunDirError, StateError
from fcit_hpc.state.lock import LOCK_FILE, acquire
from fcit_hpc.state.schema import (
    STATE_FILE,
    comparable_content,
    read_state,
    same_content,
    write_state,
)
from tests.conftest import BIN, ROOT, fcit

SMOKE = ROOT / "configs" / "smoke.yaml"


def _env() -> dict:
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    return e


# --- the run directory's lock ------------------------------------------------------------------


def test_second_owner_is_refused_naming_pid_and_host(tmp_path):
    lock = acquire(tmp_path / "run")  # makes the directory
    assert (tmp_path / "run" / LOCK_FILE).read_text().split() == [
        "pid",
        str(os.getpid()),
        "host",
        socket.gethostname(),
    ]
    with pytest.raises(ConfigError, match=rf"in use by another fcit run \(pid {os.getpid()} host"):
        acquire(tmp_path / "run")  # a second open file description: flock conflicts
    lock.release()
    acquire(tmp_path / "run").release()


def test_stale_lock_of_a_dead_process_is_taken(tmp_path):
    """A lock file left by a process that died (kill -9 leaves the file, the kernel drops the
    flock): the next run takes it and names itself."""
    code = f"import os, fcit_hpc.state.lock as k; k.acquire({str(tmp_path)!r}); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    dead = (tmp_path / LOCK_FILE).read_text()
    assert dead.split()[1] != str(os.getpid())
    lock = acquire(tmp_path)
    assert (tmp_path / LOCK_FILE).read_text().split()[1] == str(os.getpid())
    lock.release()


@pytest.mark.slow
def test_concurrent_run_is_refused_before_writing_and_the_first_equals_a_run_alone(
    serial_run, tmp_path
):
    """Run A is held before its first round (nothing stored yet, so B's resolve sees a fresh
    directory); B on the same directory is refused by the lock with exit 2 naming A's pid, writes
    nothing; A then ends with state.h5 and metrics.jsonl equal to the smoke run alone."""
    run, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    a = subprocess.Popen(
        [str(BIN / "fcit"), "run", str(SMOKE), "--out", str(run), f"debug.hold_file={hold}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    try:
        deadline = time.time() + 120
        # metrics.jsonl is A's last write before its hold (the server's start rewrites it)
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        b = fcit("run", str(SMOKE), "--out", str(run), "seed=1")
        assert b.returncode == 2, b.stderr[-2000:]
        assert f"in use by another fcit run (pid {a.pid} host" in b.stderr
        assert "Traceback" not in b.stderr
        after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        assert after == before  # B wrote nothing
        r = fcit("run", "--resume", str(run))  # a resume is refused alike
        assert r.returncode == 2 and f"(pid {a.pid} host" in r.stderr
    finally:
        hold.unlink(missing_ok=True)
        out, _ = a.communicate(timeout=300)
    assert a.returncode == 0, out[-3000:]
    assert same_content(comparable_content(run), comparable_content(serial_run)) == []
    assert _metrics(run) == _metrics(serial_run)


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the time fields (the state's VOLATILE_FIELDS: seconds, phases ...)."""
    from fcit_hpc.state.schema import VOLATILE_FIELDS

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE_FIELDS} for r in rows]


# --- pre-flight ----------------------------------------------------------------------------------


def test_preflight_refuses_paths_that_cannot_be_run_directories(tmp_path):
    from fcit_hpc.preflight import check_run_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"f: is a file, not a directory"):
        check_run_dir(tmp_path / "f", False, 1)
    with pytest.raises(ConfigError, match=r"lies under the file .*f, not a directory"):
        check_run_dir(tmp_path / "f" / "run", False, 1)
    for virtual in ("/proc/fcit", "/sys/fcit/run"):
        with pytest.raises(ConfigError, match=rf"{virtual}: under the virtual file system"):
            check_run_dir(Path(virtual), False, 1)
    check_run_dir(tmp_path / "new" / "run", False, 1)  # fine, and nothing created
    assert not (tmp_path / "new").exists()


def test_preflight_read_only_and_full_disk(tmp_path, monkeypatch):
    from fcit_hpc import preflight

    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(RunDirError, match=rf"{tmp_path}: .* free, the state needs") as e:
        preflight.check_run_dir(tmp_path / "run", False, free)  # 2 x the free space
    assert e.value.exit_code == 74
    monkeypatch.setattr(preflight.os, "access", lambda *a: False)  # root ignores mode bits
    with pytest.raises(RunDirError, match=rf"{tmp_path}: cannot write the run directory here"):
        preflight.check_run_dir(tmp_path / "run", False, 1)


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.hidden_size=1000000000", "model.hidden_size"),
        ("lora.lora_r=1000000000", "lora.lora_r"),
        ("benchmark.train_per_task=1000000000", "benchmark.train_per_task"),
    ],
)
def test_preflight_refuses_sizes_that_cannot_be_allocated(override, field):
    from fcit_hpc.preflight import check_memory, device_memory, memory_terms

    cfg = load_config(SMOKE, [override])
    need = sum(n for n, _ in memory_terms(cfg))
    assert need > device_memory(cfg)[0]
    with pytest.raises(ConfigError, match=rf"^{field}.*more than the .* GiB of"):
        check_memory(cfg)
    check_memory(load_config(SMOKE))  # the smoke run fits


def test_preflight_lower_bounds_match_the_model(smoke_config):
    """The LoRA numel bound is exact for the FFN targets of tiny-llama (every target h x i)."""
    from fcit_hpc.model.build import build_model
    from fcit_hpc.preflight import lora_numel

    cfg = load_config(smoke_config)
    _, adapter, _ = build_model(cfg.model, cfg.lora, 1)
    assert lora_numel(cfg) == adapter.numel


@pytest.mark.slow
def test_bad_target_module_and_file_out_end_with_2_and_create_nothing(tmp_path):
    p = fcit("run", str(SMOKE), "--out", str(tmp_path / "q"), "lora.target_modules=[q_projx]")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "fcit: error: lora.target_modules: ['q_projx'] name no linear layer" in p.stderr
    assert not (tmp_path / "q").exists()  # the stray config.yaml and directory are removed
    (tmp_path / "f").write_text("x")
    p = fcit("run", str(SMOKE), "--out", str(tmp_path / "f"))
    assert p.returncode == 2 and f"fcit: error: {tmp_path / 'f'}: is a file" in p.stderr


# --- resume: exact or refused ------------------------------------------------------------------


def _resume_args(run: Path, accept: bool = False) -> Namespace:
    return Namespace(
        resume=str(run), config=None, overrides=[], cont=False, out=None, accept_config=accept
    )


@pytest.fixture
def done_run(serial_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(serial_run, run)
    return run


def test_resume_refuses_an_edited_empty_or_broken_config(done_run):
    from fcit_hpc.cli import resolve_run

    saved = done_run / "config.yaml"
    text = saved.read_text()
    saved.write_text(text.replace("seed: 0", "seed: 7"))
    with pytest.raises(ConfigError, match=r"(?s)config.yaml: differs from.*-seed: 0\n\+seed: 7"):
        resolve_run(_resume_args(done_run))
    start = resolve_run(_resume_args(done_run, accept=True))  # deliberately: the file's settings
    assert start.cfg.seed == 7 and "seed: 7" in start.state.config_yaml
    saved.write_text("")
    with pytest.raises(ConfigError, match=r"config.yaml: empty .*remove .* to resume"):
        resolve_run(_resume_args(done_run))
    saved.write_text("seed: [")
    with pytest.raises(ConfigError, match=r"config.yaml: malformed YAML.*state.h5 holds"):
        resolve_run(_resume_args(done_run))
    saved.unlink()
    start = resolve_run(_resume_args(done_run))  # missing: rewritten from the state
    assert start.write_config and start.cfg.seed == 0
    saved.write_text(text)
    start = resolve_run(_resume_args(done_run))
    assert not start.write_config and start.cfg.seed == 0


def test_resume_without_state_refuses_an_empty_config(tmp_path):
    """A 0-byte config.yaml (what a full disk left) no longer starts the default config."""
    from fcit_hpc.cli import resolve_run

    (tmp_path / "config.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"config.yaml: empty .*not resuming with the default"):
        resolve_run(_resume_args(tmp_path))


@pytest.mark.slow
def test_resume_of_a_finished_run_writes_a_missing_report_and_clean_metrics(done_run, serial_run):
    """A run killed after its end was stored: --resume writes report.md, and metrics.jsonl is
    rewritten from the state (rows another process appended are gone)."""
    (done_run / "report.md").unlink()
    with open(done_run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "round", "stage": 0, "round": 0, "foreign": true}\n')
    p = fcit("run", "--resume", str(done_run))
    assert p.returncode == 0, p.stderr[-2000:]
    assert (done_run / "report.md").is_file()
    assert _metrics(done_run) == _metrics(serial_run)
    assert same_content(comparable_content(done_run), comparable_content(serial_run)) == []


# --- checksums -----------------------------------------------------------------------------------


def _flip(path: Path, dataset: str, at: int = 0) -> None:
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    assert offset is not None  # contiguous storage: the values lie at this file offset
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        b = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("dataset", ["global/adapter", "metrics/clients", "eval/accuracy"])
def test_flipped_byte_in_a_dataset_is_refused_naming_it(serial_run, tmp_path, dataset):
    write_state(tmp_path, read_state(serial_run))
    read_state(tmp_path)
    _flip(tmp_path / STATE_FILE, dataset, at=3)
    with pytest.raises(StateError, match=rf"state.h5: /{dataset}: checksum mismatch"):
        read_state(tmp_path)


def test_state_of_schema_version_1_still_loads_and_others_are_refused(serial_run, tmp_path):
    write_state(tmp_path, read_state(serial_run))
    path = tmp_path / STATE_FILE
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 1
        f.visititems(lambda n, o: o.attrs.__delitem__("sha256") if "sha256" in o.attrs else None)
    back = read_state(tmp_path)  # written before checksums: loads unverified
    assert np.array_equal(back.adapter, read_state(serial_run).adapter)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 4
    with pytest.raises(StateError, match=r"schema_version 4: this fcit reads versions 1, 2, 3"):
        read_state(tmp_path)
    write_state(tmp_path, read_state(serial_run))
    with h5py.File(path, "a") as f:
        del f["global/tokens"].attrs["sha256"]
    with pytest.raises(StateError, match=r"/global/tokens carries no sha256 checksum"):
        read_state(tmp_path)


# --- stop signals at any time ------------------------------------------------------------------


def test_signal_outside_the_round_loop_stops_at_once_inside_waits():
    from fcit_hpc.errors import Interrupted
    from fcit_hpc.fed import preempt

    with preempt.stop_signals(announce=False):
        preempt.set_run_dir("RUN")
        with pytest.raises(Interrupted, match=r"SIGTERM during set-up.*fcit run --resume RUN`"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at once
    with preempt.stop_signals(announce=False):
        preempt.set_run_dir("RUN")
        with pytest.raises(Interrupted, match="SIGINT after rounds"):  # a flag left at the end
            with preempt.phase("rounds", deferred=True):
                os.kill(os.getpid(), signal.SIGINT)  # only a flag: the next safe point stops
                time.sleep(0.05)
                assert preempt._received == [signal.SIGINT]
                with pytest.raises(Interrupted, match="SIGINT during rounds"):  # again: at once
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
    # nothing received by a finished run is left for the next one (or for a later agree/phase)
    assert preempt._received == [] and preempt.resume_dir() == ""


def _start(run: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "fcit"), "run", str(SMOKE), "--out", str(run), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_data_generation_stops_within_10s(tmp_path, sig):
    """A set-up of minutes (generating 4 x 10^6 samples): SIGTERM or Ctrl-C 2 s in stops it
    within 10 s with exit 75, the message and the resume command; no state is stored."""
    from fcit_hpc.preflight import check_memory

    big = "benchmark.train_per_task=2000000"
    try:
        check_memory(load_config(SMOKE, [big]))
    except ConfigError:
        pytest.skip("this machine's memory refuses the big set-up up front")
    run = tmp_path / "run"
    p = _start(run, big)
    deadline = time.time() + 120
    while not (run / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # generating the data now
    assert p.poll() is None
    t0 = time.time()
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    took = time.time() - t0
    assert p.returncode == 75, err[-2000:]
    assert took <= 10.0, took
    assert f"stopped on {sig.name} during set-up" in err
    assert f"continue with `fcit run --resume {run}`" in err and "Traceback" not in err
    assert not (run / STATE_FILE).exists()
    assert not list(run.glob(".*.tmp"))


# --- the top-level handler -------------------------------------------------------------------


def test_unexpected_exceptions_become_one_line_and_a_log(tmp_path, monkeypatch):
    from fcit_hpc.crash import classify

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    code, msg = classify(OSError(errno.ENOSPC, "No space left on device", "/x/metrics.jsonl"))
    assert code == 74 and msg.startswith("error: /x/metrics.jsonl: No space left on device")
    code, msg = classify(RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 TB"))
    assert code == 2 and "model.hidden_size" in msg
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError as e:
        code, msg = classify(e)
    assert code == 1 and msg.startswith("internal error (a bug in fcit): ZeroDivisionError")
    log = Path(msg.split("traceback in ")[1].rstrip(")"))
    assert log.parent == tmp_path and "ZeroDivisionError: boom" in log.read_text()


# --- fcit export -------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ["nan,1", "1", "1,2,3", "x,1", "1e39,1"])
def test_export_refuses_bad_alpha_before_writing(serial_run, tmp_path, alpha):
    from fcit_hpc.cli import main

    out = tmp_path / "adapters"
    assert main(["export", str(serial_run), "--out", str(out), "--alpha", alpha]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "edit,why",
    [
        (lambda t: t, "does not fit the model of its stored config (subspace vector has 1 values"),
        (lambda t: t.replace("seed: 0", "seed: -3"), "stored config is invalid: seed"),
    ],
)
def test_export_of_a_state_that_misfits_its_model_names_the_state_file(tmp_path, capsys, edit, why):
    """Found by the fuzzing: a state whose adapter does not fit the model of its stored config
    ended with a message naming no file (and an invalid stored config, with a field alone)."""
    from fcit_hpc.cli import main
    from fcit_hpc.state.schema import RunState

    smoke = (ROOT / "configs" / "smoke.yaml").read_text()
    assert "seed: 0" in smoke
    one = np.ones((1, 1), np.float32)
    (tmp_path / "r").mkdir()
    write_state(
        tmp_path / "r", RunState(edit(smoke), one, one, np.ones(1), accuracy=np.zeros((1, 1)))
    )
    out = tmp_path / "adapters"
    assert main(["export", str(tmp_path / "r"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'r' / STATE_FILE}: {why}" in err and not out.exists()


def _in_terminal(cmd: list[str], trigger: bytes, timeout: float = 240) -> tuple[int, str]:
    """Run ``cmd`` in a pseudo-terminal and press Ctrl-C (``\\x03`` to the terminal: its driver
    sends SIGINT to the foreground process group, as a real Ctrl-C does) once ``trigger`` has
    been printed; (exit code, everything the terminal showed)."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, with the terminal as its controlling terminal
        os.execve(cmd[0], cmd, _env())
    buf, pressed, deadline = b"", False, time.time() + timeout
    while time.time() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the terminal's other side closed: the command ended
                break
            if not data:
                break
            buf += data
        if not pressed and trigger in buf:
            time.sleep(0.5)
            os.write(fd, b"\x03")
            pressed = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), buf.decode(errors="replace")


@pytest.mark.mpi
@pytest.mark.slow
def test_ctrl_c_under_mpiexec_prints_the_stop_and_the_resume_command(tmp_path):
    """mpiexec answers Ctrl-C by closing the ranks' output and terminating them (its own exit
    code, 1): rank 0's line reaches the terminal through /dev/tty; the state is resumable."""
    run, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    cmd = [str(BIN / "mpiexec"), "--oversubscribe", "-n", "2", str(BIN / "fcit"), "run"]
    cmd += [str(SMOKE), "--out", str(run), f"debug.hold_file={hold}", "debug.hold_stage=1"]
    code, shown = _in_terminal(cmd, b"holding before stage 1")
    assert "received: stopping at the next round boundary" in shown, shown[-3000:]
    assert f"continue with `fcit run --resume {run}`" in shown
    assert code != 0 and "Traceback" not in shown
    hold.unlink()
    st = read_state(run)  # the last completed round, whole
    assert (st.stage, st.round) == (1, -1)
