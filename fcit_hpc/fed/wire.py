"""Message layouts on the wire: the one place that knows headers, dtypes and how each message is
packed and unpacked, and the one formula of the communication accounting.

Every message is a header array (one row per item) plus one flat body of values, moved with
``Comm.gatherv`` (never pickled):

- update (client → server, after local training): float64 rows ``UPDATE_FIELDS`` + float32 deltas;
- token (client → server, before DKO; also the EWC Fisher upload): int64 rows ``TOKEN_FIELDS`` +
  float32 values;
- prediction (rank → rank 0, evaluation): int64 rows ``PREDICTION_FIELDS`` + UTF-8 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# update header: one float64 row per client. ``steps`` travels for the record (local steps run).
UPDATE_FIELDS = ("client", "subspace", "samples", "loss", "seconds", "numel", "steps")
UPDATE_WIDTH = len(UPDATE_FIELDS)
UPDATE_DTYPE = np.float64
# token header (identity token μ_k, or an EWC Fisher diagonal): one int64 row per client
TOKEN_FIELDS = ("client", "samples", "size")
TOKEN_WIDTH = len(TOKEN_FIELDS)
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
    delta: np.ndarray  # float32 [numel] (as sent: may be malformed)
    nbytes: int  # its header row and delta as they travelled


def pack_updates(rows: list[tuple], deltas: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """rows: (client, subspace, samples, loss, seconds, steps) per client, deltas: float32 each →
    (float64 header [n·UPDATE_WIDTH], float32 body)."""
    head = [
        [c, k, n, loss, sec, d.size, steps]
        for (c, k, n, loss, sec, steps), d in zip(rows, deltas, strict=True)
    ]
    header = np.asarray(head, dtype=UPDATE_DTYPE).reshape(-1, UPDATE_WIDTH)
    return header.reshape(-1), _body(deltas, VALUE_DTYPE)


def unpack_updates(heads: list[np.ndarray], values: list[np.ndarray]) -> list[Update]:
    """Gathered per-rank (header, body) → updates sorted by client id."""
    out = [
        Update(
            int(r[0]),
            int(r[1]),
            int(r[2]),
            float(r[3]),
            float(r[4]),
            int(r[6]),
            d,
            wire_nbytes(r, d),
        )
        for r, d in _items(heads, values, UPDATE_WIDTH, UPDATE_FIELDS.index("numel"))
    ]
    out.sort(key=lambda u: u.client)
    return out


# --- token (identity token, EWC Fisher) -------------------------------------------------------


@dataclass
class TokenUpload:
    client: int
    samples: int
    values: np.ndarray  # float32 [size] (as sent)
    nbytes: int  # its header row and values as they travelled


def pack_tokens(rows: list[tuple[int, int]], values: list[np.ndarray]):
    """rows: (client, samples) per client → (int64 header [n·TOKEN_WIDTH], float32 body)."""
    head = [[c, n, v.size] for (c, n), v in zip(rows, values, strict=True)]
    header = np.asarray(head, dtype=np.int64).reshape(-1, TOKEN_WIDTH)
    return header.reshape(-1), _body(values, VALUE_DTYPE)


def unpack_tokens(heads: list[np.ndarray], values: list[np.ndarray]) -> list[TokenUpload]:
    """Gathered per-rank (header, body) → uploads sorted by client id."""
    out = [
        TokenUpload(int(r[0]), int(r[1]), v, wire_nbytes(r, v))
        for r, v in _items(heads, values, TOKEN_WIDTH, TOKEN_FIELDS.index("size"))
    ]
    return sorted(out, key=lambda e: e.client)


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
