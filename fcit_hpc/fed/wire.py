"""Message layouts on the wire: the one place that knows headers, dtypes and how each message is
packed and unpacked, and the one formula of the communication accounting.

Every message is a header array (one row per item) plus one flat body of values, moved with
``Comm.gatherv`` (never pickled):

- update (client → server, after local training): float64 rows ``UPDATE_FIELDS`` + the deltas'
  payloads, uint8 (``numel`` values coded in ``nbytes`` bytes by the run's codecs,
  :mod:`fcit_hpc.fed.codec`; float32 bytes uncompressed);
- token (client → server, before DKO; also the EWC Fisher upload): int64 rows ``TOKEN_FIELDS`` +
  uint8 payloads as for updates;
- residual (client ranks ↔ rank 0, error feedback's per-client memory kept in the state, not a
  message of the federated protocol: not counted): int64 rows ``RESIDUAL_FIELDS`` + float32;
- prediction (rank → rank 0, evaluation): int64 rows ``PREDICTION_FIELDS`` + UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# update header: one float64 row per client. ``steps`` travels for the record (local steps run).
UPDATE_FIELDS = ("client", "subspace", "samples", "loss", "seconds", "numel", "steps", "nbytes")
UPDATE_WIDTH = len(UPDATE_FIELDS)
UPDATE_DTYPE = np.float64
# token header (identity token μ_k, or an EWC Fisher diagonal): one int64 row per client
TOKEN_FIELDS = ("client", "samples", "size", "nbytes")
TOKEN_WIDTH = len(TOKEN_FIELDS)
# residual header: one int64 row per (client, part); part: update part key (fed.codec)
RESIDUAL_FIELDS = ("client", "part", "size")
RESIDUAL_WIDTH = len(RESIDUAL_FIELDS)
# prediction header: one int64 row per test sample; the body is its UTF-8 text
PREDICTION_FIELDS = ("task", "index", "nbytes")
PREDICTION_WIDTH = len(PREDICTION_FIELDS)
VALUE_DTYPE = np.float32


def wire_nbytes(*arrays: np.ndarray) -> int:
    """Bytes of the buffers as they travel: the one formula of the communication accounting."""
    return int(sum(np.asarray(a).nbytes for a in arrays))


def _body(parts: list[np.ndarray], empty_dtype) -> np.ndarray:
    """The values of every item, concatenated as they are (dtype of the parts)."""
    return np.concatenate(parts) if parts else np.zeros(0, empty_dtype)


def raw_bytes(values: np.ndarray) -> np.ndarray:
    """float32 values as an uncompressed payload (uint8)."""
    return np.frombuffer(np.ascontiguousarray(values, VALUE_DTYPE).tobytes(), np.uint8)


def raw_values(numel: int, payload: np.ndarray) -> np.ndarray:
    """An uncompressed payload → float32 values (as sent: ``numel`` is not checked)."""
    usable = payload.size - payload.size % 4
    return np.frombuffer(payload[:usable].tobytes(), VALUE_DTYPE)


def _items(heads: list[np.ndarray], bodies: list[np.ndarray], width: int, size_col: int):
    """(header row, its slice of the body) for every item of every rank's message."""
    for h, b in zip(heads, bodies, strict=True):
        off = 0
        for row in h.reshape(-1, width):
            n = int(row[size_col])
            yield row, b[off : off + n]
            off += n


# --- update -----------------------------------------------------------------------------------


@dataclass
class Update:
    """One client's upload after local training, as the server reads it."""

    client: int
    subspace: int
    samples: int
    loss: float
    seconds: float
    steps: int
    delta: np.ndarray  # float32 [numel] decoded (as sent: may be malformed)
    nbytes: int  # its header row and payload as they travelled


def pack_updates(
    rows: list[tuple], deltas: list[np.ndarray], payloads: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """rows: (client, subspace, samples, loss, seconds, steps) per client, deltas: float32 each,
    payloads: their coded bytes (None: uncompressed) → (float64 header [n·UPDATE_WIDTH], uint8
    body)."""
    if payloads is None:
        payloads = [raw_bytes(d) for d in deltas]
    head = [
        [c, k, n, loss, sec, d.size, steps, p.size]
        for (c, k, n, loss, sec, steps), d, p in zip(rows, deltas, payloads, strict=True)
    ]
    header = np.asarray(head, dtype=UPDATE_DTYPE).reshape(-1, UPDATE_WIDTH)
    return header.reshape(-1), _body(payloads, np.uint8)


def unpack_updates(
    heads: list[np.ndarray],
    values: list[np.ndarray],
    decode: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> list[Update]:
    """Gathered per-rank (header, body) → updates sorted by client id. ``decode``: (header row,
    payload) → float32 delta (None: uncompressed)."""
    decode = decode or (lambda r, p: raw_values(int(r[5]), p))
    out = [
        Update(
            int(r[0]),
            int(r[1]),
            int(r[2]),
            float(r[3]),
            float(r[4]),
            int(r[6]),
            decode(r, p),
            wire_nbytes(r, p),
        )
        for r, p in _items(heads, values, UPDATE_WIDTH, UPDATE_FIELDS.index("nbytes"))
    ]
    out.sort(key=lambda u: u.client)
    return out


# --- token (identity token, EWC Fisher) -------------------------------------------------------


@dataclass
class TokenUpload:
    client: int
    samples: int
    values: np.ndarray  # float32 [size] decoded (as sent)
    nbytes: int  # its header row and payload as they travelled


def pack_tokens(
    rows: list[tuple[int, int]],
    values: list[np.ndarray],
    payloads: list[np.ndarray] | None = None,
):
    """rows: (client, samples) per client, values: float32 each, payloads: their coded bytes
    (None: uncompressed) → (int64 header [n·TOKEN_WIDTH], uint8 body)."""
    if payloads is None:
        payloads = [raw_bytes(v) for v in values]
    head = [[c, n, v.size, p.size] for (c, n), v, p in zip(rows, values, payloads, strict=True)]
    header = np.asarray(head, dtype=np.int64).reshape(-1, TOKEN_WIDTH)
    return header.reshape(-1), _body(payloads, np.uint8)


def unpack_tokens(
    heads: list[np.ndarray],
    values: list[np.ndarray],
    decode: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> list[TokenUpload]:
    """Gathered per-rank (header, body) → uploads sorted by client id. ``decode``: (size,
    payload) → float32 values (None: uncompressed)."""
    decode = decode or raw_values
    out = [
        TokenUpload(int(r[0]), int(r[1]), decode(int(r[2]), p), wire_nbytes(r, p))
        for r, p in _items(heads, values, TOKEN_WIDTH, TOKEN_FIELDS.index("nbytes"))
    ]
    return sorted(out, key=lambda e: e.client)


# --- residual (error feedback's memory of each client) ----------------------------------------


def pack_residuals(items: dict[tuple[int, int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(client, part) → float32 residual, in key order → (int64 header, float32 body)."""
    keys = sorted(items)
    head = np.array([[c, k, items[(c, k)].size] for c, k in keys], np.int64).reshape(-1)
    return head, _body([np.asarray(items[key], VALUE_DTYPE) for key in keys], VALUE_DTYPE)


def unpack_residuals(heads, bodies) -> dict[tuple[int, int], np.ndarray]:
    """Gathered (or scattered) per-rank (header, body) → (client, part) → float32 residual."""
    return {
        (int(r[0]), int(r[1])): np.array(v, VALUE_DTYPE)
        for r, v in _items(heads, bodies, RESIDUAL_WIDTH, RESIDUAL_FIELDS.index("size"))
    }


# --- prediction --------------------------------------------------------------------------------


def pack_predictions(local: list[tuple[int, int, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(task, index, text) per sample → (int64 header [n·PREDICTION_WIDTH], uint8 UTF-8 body)."""
    blobs = [p.encode("utf-8") for _, _, p in local]
    head = np.array(
        [[t, i, len(b)] for (t, i, _), b in zip(local, blobs, strict=True)], np.int64
    ).reshape(-1)
    body = np.frombuffer(b"".join(blobs), np.uint8) if blobs else np.zeros(0, np.uint8)
    return head, body


def unpack_predictions(heads, bodies) -> dict[tuple[int, int], str]:
    """Gathered per-rank (header, body) → (task, index) → text."""
    return {
        (int(r[0]), int(r[1])): bytes(b).decode("utf-8")
        for r, b in _items(heads, bodies, PREDICTION_WIDTH, PREDICTION_FIELDS.index("nbytes"))
    }
