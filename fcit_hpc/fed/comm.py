"""Communication between ranks. The only module of fcit_hpc that imports mpi4py.

Everything travels as flat typed numpy buffers (``Bcast`` / ``Gatherv`` / ``Scatterv`` with explicit
counts), never as pickled objects. ``LocalComm`` is the in-process implementation (world size 1)
used when the program is not started under ``mpiexec``; ``ThreadComm`` is an in-process world of
any size (threads and queues) for tests; the server loop runs the same code on all three.
"""

from __future__ import annotations

import os
import queue
import sys
import threading

import numpy as np

from fcit_hpc.fed.wire import wire_nbytes

# dtype codes of the header that precedes a broadcast array
_DTYPES = [np.float32, np.float64, np.int64, np.int32, np.uint8, np.uint32]
_CODE = {np.dtype(d): i for i, d in enumerate(_DTYPES)}
_MAX_NDIM = 4
# int64 header (dtype code, ndim, shape[_MAX_NDIM]) sent ahead of every broadcast array
BCAST_HEADER = (2 + _MAX_NDIM) * 8


def _check_bcast(arr: np.ndarray) -> None:
    """What a broadcast header can describe: ndim <= _MAX_NDIM, a dtype of _DTYPES."""
    if arr.ndim > _MAX_NDIM or arr.dtype not in _CODE:
        raise ValueError(f"cannot broadcast array of dtype {arr.dtype}, ndim {arr.ndim}")


def bcast_nbytes(arr: np.ndarray) -> int:
    """Bytes one broadcast of ``arr`` moves to each receiving rank: its header and its data."""
    return BCAST_HEADER + wire_nbytes(arr)


class Comm:
    """Interface of a communicator between the server (rank 0) and client ranks."""

    rank: int = 0
    size: int = 1
    # bytes every rank has received (root: sent) by broadcast so far; the same on every rank and
    # for every world size, so round deltas of it are the downlink of the round
    bytes_broadcast: int = 0

    def bcast_array(self, arr: np.ndarray | None, root: int = 0) -> np.ndarray:
        """Root passes ``arr``; every rank returns a copy of it (any shape, dtypes in _DTYPES)."""
        raise NotImplementedError

    def gatherv(self, arr: np.ndarray, root: int = 0) -> list[np.ndarray] | None:
        """Every rank passes a 1-D array of one dtype; root gets the list in rank order."""
        raise NotImplementedError

    def scatterv(self, parts: list[np.ndarray] | None, dtype, root: int = 0) -> np.ndarray:
        """Root passes one 1-D array per rank; each rank returns its part."""
        raise NotImplementedError

    def allreduce_max(self, value: int) -> int:
        """Every rank passes an integer and gets the maximum over all ranks (a vote: one rank's
        flag is everyone's). Not counted in ``bytes_broadcast``: it is no part of a round."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def idle_barrier(self, poll_seconds: float = 0.2) -> None:
        """Barrier that sleeps while waiting (frees the cores for a rank doing one-off work)."""
        self.barrier()

    def abort(self, code: int) -> None:
        raise NotImplementedError

    @property
    def is_root(self) -> bool:
        return self.rank == 0


class LocalComm(Comm):
    """In-process world of size 1."""

    rank = 0
    size = 1

    def bcast_array(self, arr, root=0):
        out = np.array(arr, copy=True)
        self.bytes_broadcast += bcast_nbytes(out)
        return out

    def gatherv(self, arr, root=0):
        return [np.array(arr, copy=True)]

    def scatterv(self, parts, dtype, root=0):
        return np.asarray(parts[0], dtype=dtype).copy()

    def allreduce_max(self, value):
        return int(value)

    def barrier(self):
        pass

    def abort(self, code):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _ThreadWorld:
    """Shared by the ranks of a :class:`ThreadComm` world: one FIFO queue per (sender, receiver)
    pair, a barrier, and the turn lock (one rank computes at a time)."""

    def __init__(self, size: int, timeout: float):
        self.size = size
        self.timeout = timeout
        self.queues = [[queue.Queue() for _ in range(size)] for _ in range(size)]
        self.barrier = threading.Barrier(size)
        self.turn = threading.Lock()
        self.failed = False


class ThreadComm(Comm):
    """In-process world of ``size`` ranks, one thread each, talking through queues: the server and
    client logic at P > 1 without mpiexec (see :func:`run_threads`).

    Ranks take turns: a rank holds the world's turn lock while it computes and gives it up only
    while it waits in a collective, so process-global state (torch's RNG, thread count) behaves as
    in separate processes. Byte accounting is MPIComm's (:func:`bcast_nbytes`)."""

    def __init__(self, world: _ThreadWorld, rank: int):
        self.world = world
        self.rank = rank
        self.size = world.size

    def _wait(self, fn):
        self.world.turn.release()
        try:
            return fn()
        finally:
            self.world.turn.acquire()

    def _get(self, src: int) -> np.ndarray:
        q, w = self.world.queues[src][self.rank], self.world

        def get():
            for _ in range(max(1, int(w.timeout / 0.2))):
                if w.failed:
                    raise RuntimeError(f"rank {self.rank}: another rank failed")
                try:
                    return q.get(timeout=0.2)
                except queue.Empty:
                    continue
            raise TimeoutError(f"rank {self.rank}: nothing from rank {src} in {w.timeout} s")

        return self._wait(get)

    def _put(self, dst: int, arr: np.ndarray) -> None:
        self.world.queues[self.rank][dst].put(np.array(arr, copy=True))

    def bcast_array(self, arr, root=0):
        if self.rank == root:
            arr = np.ascontiguousarray(arr)
            _check_bcast(arr)
            for r in range(self.size):
                if r != root:
                    self._put(r, arr)
            out = np.array(arr, copy=True)
        else:
            out = self._get(root)
        self.bytes_broadcast += bcast_nbytes(out)
        return out

    def gatherv(self, arr, root=0):
        arr = np.ascontiguousarray(arr).reshape(-1)
        if self.rank != root:
            self._put(root, arr)
            return None
        return [np.array(arr, copy=True) if r == root else self._get(r) for r in range(self.size)]

    def scatterv(self, parts, dtype, root=0):
        if self.rank != root:
            return self._get(root)
        for r in range(self.size):
            if r != root:
                self._put(r, np.asarray(parts[r], dtype=dtype).reshape(-1))
        return np.asarray(parts[root], dtype=dtype).reshape(-1).copy()

    def allreduce_max(self, value):
        mine = np.array([value], np.int64)
        if self.rank != 0:
            self._put(0, mine)
            return int(self._get(0)[0])
        top = max([int(value)] + [int(self._get(r)[0]) for r in range(1, self.size)])
        for r in range(1, self.size):
            self._put(r, np.array([top], np.int64))
        return top

    def barrier(self):
        self._wait(lambda: self.world.barrier.wait(timeout=self.world.timeout))

    def abort(self, code):
        self.world.barrier.abort()
        raise RuntimeError(f"rank {self.rank}: abort({code})")


def run_threads(size: int, fn, timeout: float = 600.0) -> list:
    """Run ``fn(comm)`` on ``size`` in-process ranks (threads of a :class:`ThreadComm` world);
    returns every rank's result, rank order. An exception on any rank is raised here."""
    world = _ThreadWorld(size, timeout)
    results: list = [None] * size
    errors: list = []

    def main(rank: int) -> None:
        world.turn.acquire()
        try:
            results[rank] = fn(ThreadComm(world, rank))
        except BaseException as e:  # noqa: BLE001 — re-raised in the caller
            errors.append((rank, e))
            world.failed = True
            world.barrier.abort()
        finally:
            world.turn.release()

    threads = [threading.Thread(target=main, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank, e = min(errors, key=lambda x: x[0])
        raise RuntimeError(f"rank {rank} failed: {e!r}") from e
    return results


class MPIComm(Comm):
    """mpi4py world (a duplicate of COMM_WORLD, so library traffic cannot collide with ours)."""

    def __init__(self) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self._comm = MPI.COMM_WORLD.Dup()
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()

    def bcast_array(self, arr, root=0):
        header = np.zeros(2 + _MAX_NDIM, dtype=np.int64)
        if self.rank == root:
            arr = np.ascontiguousarray(arr)
            _check_bcast(arr)
            header[0] = _CODE[arr.dtype]
            header[1] = arr.ndim
            header[2 : 2 + arr.ndim] = arr.shape
        self._comm.Bcast(header, root=root)
        if self.rank != root:
            shape = tuple(int(s) for s in header[2 : 2 + int(header[1])])
            arr = np.empty(shape, dtype=_DTYPES[int(header[0])])
        self._comm.Bcast(arr, root=root)
        self.bytes_broadcast += bcast_nbytes(arr)
        return arr

    def gatherv(self, arr, root=0):
        arr = np.ascontiguousarray(arr).reshape(-1)
        counts = np.zeros(self.size, dtype=np.int64)
        self._comm.Gather(np.array([arr.size], dtype=np.int64), counts, root=root)
        if self.rank != root:
            self._comm.Gatherv(arr, None, root=root)
            return None
        out = np.empty(int(counts.sum()), dtype=arr.dtype)
        self._comm.Gatherv(arr, [out, counts], root=root)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return [out[offsets[i] : offsets[i + 1]] for i in range(self.size)]

    def scatterv(self, parts, dtype, root=0):
        dtype = np.dtype(dtype)
        counts = np.zeros(self.size, dtype=np.int64)
        if self.rank == root:
            counts[:] = [p.size for p in parts]
        self._comm.Bcast(counts, root=root)
        out = np.empty(int(counts[self.rank]), dtype=dtype)
        if self.rank == root:
            send = np.concatenate([np.asarray(p, dtype=dtype).reshape(-1) for p in parts])
            self._comm.Scatterv([send, counts], out, root=root)
        else:
            self._comm.Scatterv(None, out, root=root)
        return out

    def allreduce_max(self, value):
        out = np.zeros(1, np.int64)
        self._comm.Allreduce(np.array([value], np.int64), out, op=self._MPI.MAX)
        return int(out[0])

    def barrier(self):
        self._comm.Barrier()

    def idle_barrier(self, poll_seconds: float = 0.2):
        import time

        req = self._comm.Ibarrier()
        while not req.Test():
            time.sleep(poll_seconds)

    def abort(self, code):
        sys.stdout.flush()
        sys.stderr.flush()
        self._MPI.COMM_WORLD.Abort(code)


def launched_by_mpi() -> bool:
    """True when an MPI launcher (mpiexec / srun) started this process."""
    keys = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "PMI_RANK")
    return any(k in os.environ for k in keys)


def local_rank() -> int:
    """Rank of this process on its node (for device and port choice)."""
    for key in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def make_comm() -> Comm:
    """MPI world when launched by mpiexec/srun, else the in-process world of size 1."""
    if launched_by_mpi():
        return MPIComm()
    return LocalComm()


_LIBRARY_PROBE = """
import json, mpi4py
mpi4py.rc.initialize = mpi4py.rc.finalize = False
from mpi4py import MPI
print(json.dumps([mpi4py.__version__, MPI.Get_library_version()]))
"""


def mpi_library(init: bool = False) -> tuple[str, str, int | None]:
    """(mpi4py's version, the first line of the MPI library's version string, the world size or
    None) for ``fcit doctor``. ``MPI_Get_library_version`` needs no ``MPI_Init``: without ``init``
    the library is loaded in a child Python, so this process's mpi4py stays untouched; with
    ``init``, MPI is initialized here and the world size read. Raises RuntimeError with mpi4py's
    message when the library does not load."""
    import json
    import subprocess

    if init:
        from mpi4py import MPI

        version, text, size = _mpi4py_version(), MPI.Get_library_version(), MPI.COMM_WORLD.size
    else:
        p = subprocess.run(
            [sys.executable, "-c", _LIBRARY_PROBE], capture_output=True, text=True, timeout=60
        )
        if p.returncode != 0:
            lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
            raise RuntimeError(lines[-1] if lines else f"exit {p.returncode}")
        (version, text), size = json.loads(p.stdout), None
    text = text.replace("\x00", "").strip()
    return version, (text.splitlines()[0] if text else "unnamed"), size


def _mpi4py_version() -> str:
    import mpi4py

    return mpi4py.__version__
