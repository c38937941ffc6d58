"""One owner per run directory: an exclusive ``fcntl.flock`` on ``RUN_DIR/.fcit.lock``.

Rank 0 takes the lock before it writes anything into the run directory and holds it until the
process ends. The kernel drops a flock when its holder dies (``kill -9`` included), so a lock file
left by a dead process is stale by construction: the next run takes it and overwrites the owner
line. A second run or resume on a directory whose owner is alive is refused (exit 2) with the
owner's pid and host, read from the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from fcit_hpc.errors import ConfigError, StorageError, one_line

LOCK_FILE = ".fcit.lock"


class RunLock:
    """The held lock of one run directory (keep the object alive while the run writes)."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self.fd = run_dir, fd

    def release(self) -> None:
        """Unlock and close (the file stays: a later run reuses it)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def owner_line() -> str:
    """What the lock file says about its holder: ``pid <pid> host <host>``."""
    return f"pid {os.getpid()} host {socket.gethostname()}"


def acquire(run_dir: str | Path) -> RunLock:
    """Create ``run_dir`` if needed and lock it; ConfigError (exit 2) naming the owner's pid and
    host when a live process holds it; StorageError (exit 74) naming the path when the directory
    or lock file cannot be made."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StorageError(f"{path}: cannot create the run's lock file ({one_line(e)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read_owner(fd)
        os.close(fd)
        raise ConfigError(
            f"{run_dir}: in use by another fcit run ({owner}); wait for it to end, stop it, or "
            "use another --out"
        ) from None
    except OSError as e:  # a file system without flock support
        os.close(fd)
        raise StorageError(f"{path}: cannot lock the run directory ({one_line(e)})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (owner_line() + "\n").encode(), 0)
    except OSError as e:
        os.close(fd)
        raise StorageError(f"{path}: cannot write the run's lock file ({one_line(e)})") from None
    return RunLock(run_dir, fd)


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "owner unknown"
