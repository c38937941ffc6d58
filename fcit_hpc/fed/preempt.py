"""Stopping on request, so that a preempted, requeued, timed-out or interrupted job loses no
completed round and tells SLURM to requeue it.

SIGTERM (what SLURM sends before it kills a job's processes), SIGUSR1 (what slurm/fcit.sbatch
forwards through the launcher, which does not forward SIGTERM gracefully) and SIGINT (Ctrl-C) are
caught while ``fcit run`` runs. Inside the round loop (:func:`deferred`) they only set a flag: at
every safe point (before each round, and after a stage's rounds) the ranks combine their flags
with a max-reduction, so either all ranks stop there or none does; rank 0 has stored the last
completed round by then (``state.h5``, written atomically), and every rank exits with 75
(EX_TEMPFAIL). Outside it — set-up, data generation, evaluation, which have no safe point for
minutes — and on a second signal, the handler raises :class:`~fcit_hpc.errors.Interrupted` at
once (every file is replaced atomically, so nothing is left half-written), and the rank exits 75
(a multi-rank job is aborted with 75). Either way rank 0 prints the stop and the resume command
the moment the signal arrives, so it is on the terminal even when a launcher kills the ranks soon
after (``mpiexec`` on Ctrl-C).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fcit_hpc.errors import Interrupted
from fcit_hpc.fed.comm import Comm

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_received: list[int] = []  # stop signals received in this ``fcit run`` (by the handler)
_where = {"deferred": False, "phase": "set-up", "run_dir": "", "announce": True}
log = logging.getLogger("fcit")


def resume_hint() -> str:
    d = _where["run_dir"]
    return f"continue with `fcit run --resume {d}`" if d else "nothing was written yet"


def _stop_now(name: str) -> str:
    """The message of an immediate stop."""
    d = _where["run_dir"]
    if not d:
        return f"stopped on {name} during start-up; nothing was written"
    return (
        f"stopped on {name} during {_where['phase']}; {d} holds the last completed round, if "
        f"any (every file is written whole, nothing half-written); {resume_hint()}"
    )


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    name = signal.Signals(signum).name
    if not _where["deferred"] or len(_received) > 1:
        raise Interrupted(_stop_now(name))
    if _where["announce"]:
        tell(
            f"fcit: {name} received: stopping at the next round boundary (again to stop at "
            f"once); {resume_hint()}"
        )


def tell(line: str) -> None:
    """Print ``line`` on stderr and, when stderr is not a terminal but the process has one, on
    the terminal too: ``mpiexec`` answers Ctrl-C by closing the ranks' output before it
    terminates them, so a line on stderr alone would never be seen."""
    print(line, file=sys.stderr, flush=True)
    try:
        if sys.stderr.isatty():
            return
        with open("/dev/tty", "w") as tty:  # no terminal (batch job, test): OSError
            tty.write(line + "\n")
    except (OSError, ValueError):
        pass


@contextmanager
def stop_signals(announce: bool = True) -> Iterator[None]:
    """Catch the stop signals while the block runs (main thread: ``fcit run``), then restore the
    previous handlers (a test may call the CLI in-process). ``announce``: print the note on a
    deferred stop (rank 0)."""
    _received.clear()
    _where.update(deferred=False, phase="set-up", run_dir="", announce=announce)
    before = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        # what this run received ends with it: a later run (or a later in-process caller of
        # agree/phase) must not stop on a signal that an earlier one already acted on
        _received.clear()
        _where.update(deferred=False, phase="set-up", run_dir="", announce=True)


def resume_dir() -> str:
    """The run directory of this ``fcit run`` ('' before it is known)."""
    return _where["run_dir"]


def set_run_dir(run_dir: Path | str) -> None:
    """The run directory the resume hint names (once it is known)."""
    _where["run_dir"] = str(run_dir)


@contextmanager
def phase(name: str, deferred: bool = False) -> Iterator[None]:
    """Name the phase the block runs (in a stop's message); ``deferred``: a stop signal waits for
    the next safe point (the round loop). A signal received before a deferred block but not yet
    acted on stops at its first safe point."""
    before = dict(_where)
    _where.update(phase=name, deferred=deferred)
    try:
        yield
    finally:
        _where.update(phase=before["phase"], deferred=before["deferred"])
    if _received and not _where["deferred"] and deferred:  # arrived in the loop's last steps
        raise Interrupted(
            f"stopped on {signal.Signals(_received[0]).name} after {name}; {resume_hint()}"
        )


def agree(comm: Comm) -> str:
    """Collective: on every rank, the name of a stop signal some rank has received ('' when no
    rank has received one)."""
    signum = comm.allreduce_max(_received[0] if _received else 0)
    return signal.Signals(signum).name if signum else ""


def hold(path: Path, where: str, poll_seconds: float = 0.1) -> None:
    """Fault injection (``debug.hold_file``): wait while ``path`` exists, or until a stop signal
    arrives, so a test can signal a job at a known point."""
    if path.exists():
        log.warning("debug: holding %s while %s exists", where, path)
    while path.exists() and not _received:
        time.sleep(poll_seconds)
    if _received:
        log.warning("debug: hold %s ended by %s", where, signal.Signals(_received[0]).name)
