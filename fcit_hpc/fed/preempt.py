"""Stopping on request at a safe point, so that a preempted, requeued or timed-out job loses no
completed round and tells SLURM to requeue it.

SIGTERM (what SLURM sends before it kills a job's processes) and SIGUSR1 (what slurm/fcit.sbatch
forwards through the launcher, which does not forward SIGTERM gracefully) only set a flag. At every
safe point (before each round, and after a stage's rounds) the ranks combine their flags with a
max-reduction, so either all ranks stop there or none does; rank 0 has stored the last completed
round by then (``state.h5``, written atomically), and every rank exits with 75 (EX_TEMPFAIL).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fcit_hpc.fed.comm import Comm

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # stop signals received in this ``fcit run`` (by the handler)
log = logging.getLogger("fcit")


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Catch the stop signals while the block runs (main thread: ``fcit run``), then restore the
    previous handlers (a test may call the CLI in-process)."""
    _received.clear()
    before = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


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
