"""The first exchange of a job: every rank runs the same config and the same code.

Ranks started with different configs (another override, another file on another node) or
different code (a stale install on one node) would compute a mixture that fails late or not at
all. So before anything is written, every rank sends rank 0 a fixed-size record: whether it could
load its config, the SHA-256 of its resolved config (with the state schema version), and the
SHA-256 of its fcit_hpc sources. Rank 0 compares them with its own and broadcasts a verdict per
rank; on any difference every rank stops with the same message (exit 2).
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from fcit_hpc.errors import ConfigError, FcitError
from fcit_hpc.fed.comm import Comm
from fcit_hpc.state.schema import SCHEMA_VERSION

OK, NO_CONFIG, OTHER_CONFIG, OTHER_CODE = 0, 1, 2, 3
_DIGEST = 32  # bytes of a SHA-256


@lru_cache(maxsize=1)
def code_digest() -> bytes:
    """SHA-256 of the sources of fcit_hpc and fcit_kernels (relative paths and contents)."""
    h = hashlib.sha256()
    for pkg in ("fcit_hpc", "fcit_kernels"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            continue
        root = Path(spec.origin).parent
        for f in sorted(root.rglob("*.py")):
            h.update(f"{pkg}/{f.relative_to(root).as_posix()}\0".encode())
            h.update(f.read_bytes())
    return h.digest()


def config_digest(config_text: str) -> bytes:
    """SHA-256 of the resolved config's text and the state schema version."""
    return hashlib.sha256(f"schema {SCHEMA_VERSION}\n{config_text}".encode()).digest()


def _record(config_text: str | None) -> np.ndarray:
    """uint8 [1 + 2 * 32]: loaded?, config digest, code digest."""
    ok = config_text is not None
    cfg = config_digest(config_text) if ok else bytes(_DIGEST)
    return np.frombuffer(bytes([int(ok)]) + cfg + code_digest(), np.uint8).copy()


def _verdict(records: list[np.ndarray]) -> np.ndarray:
    """Per rank: OK, NO_CONFIG, OTHER_CONFIG or OTHER_CODE, compared with rank 0's record."""
    out = np.zeros(len(records), np.int64)
    ref = records[0]
    for r, rec in enumerate(records):
        if rec.size != ref.size:
            out[r] = OTHER_CODE
        elif not rec[0]:
            out[r] = NO_CONFIG
        elif not np.array_equal(rec[1 + _DIGEST :], ref[1 + _DIGEST :]):
            out[r] = OTHER_CODE
        elif ref[0] and not np.array_equal(rec[1 : 1 + _DIGEST], ref[1 : 1 + _DIGEST]):
            out[r] = OTHER_CONFIG
    return out


def _message(verdict: np.ndarray) -> str:
    def ranks(code: int) -> str:
        return ", ".join(str(r) for r in np.flatnonzero(verdict == code))

    if (verdict == OTHER_CODE).any():
        return (
            f"rank(s) {ranks(OTHER_CODE)} run other fcit_hpc code than rank 0 (the digests of "
            "their sources differ): install the same version on every node"
        )
    if (verdict == OTHER_CONFIG).any():
        return (
            f"rank(s) {ranks(OTHER_CONFIG)} resolved another config than rank 0 (the digests of "
            "the resolved configs differ): start every rank with the same CONFIG, overrides and "
            "files"
        )
    return f"rank(s) {ranks(NO_CONFIG)} could not load the config (see their message)"


def check_same_job(comm: Comm, config_text: str | None, error: FcitError | None = None) -> None:
    """Collective, before anything is written. ``config_text``: this rank's resolved config, or
    None when loading it failed with ``error``. Raises on every rank when the ranks differ: the
    rank's own ``error`` where it has one (rank-local when rank 0 loaded its config), else a
    ConfigError naming the ranks that differ from rank 0."""
    records = comm.gatherv(_record(config_text))
    verdict = comm.bcast_array(_verdict(records) if records is not None else None)
    if not verdict.any():
        return
    if error is not None:
        error.rank_local = bool(verdict[0] == OK)  # only this rank knows its message
        raise error
    raise ConfigError(_message(verdict))
