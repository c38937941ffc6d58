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

Unpacking checks the framing of every rank's message before anything is read from it: whole
header rows, every count and id a non-negative integer, the body exactly as long as the header
announces, no item twice; anything else is a :class:`~fcit_hpc.errors.WireError` naming the rank,
the item and the field. The values themselves (a NaN delta, a token of the wrong size) are the
server's to accept or reject per client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass

import numpy as np

from fcit_hpc.errors import WireError

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


def _count(row: np.ndarray, fields: tuple[str, ...], name: str, where: str, *, low: int = 0) -> int:
    """Field ``name`` of a header row as an integer >= ``low``; WireError when it is not one."""
    v = row[fields.index(name)]
    if not (np.isfinite(v) and v == np.floor(v) and low <= v < 2**53):
        raise WireError(f"{where}: {name} = {v.item()!r} is not an integer >= {low}")
    return int(v)


def _items(kind: str, heads, bodies, fields: tuple[str, ...], *, size: str, ints: dict[str, int]):
    """(where, header row, its integer fields, its slice of the body) for every item of every
    rank's message, the framing checked (module docstring). ``ints``: field -> its lowest value."""
    if len(heads) != len(bodies):
        raise WireError(f"{kind} messages: {len(heads)} headers, {len(bodies)} bodies")
    width = len(fields)
    for rank, (h, b) in enumerate(zip(heads, bodies, strict=True)):
        h, b = np.asarray(h).reshape(-1), np.asarray(b).reshape(-1)
        if h.size % width:
            raise WireError(
                f"rank {rank}: {kind} header of {h.size} values is not whole rows of {width} "
                f"({', '.join(fields)})"
            )
        rows = h.reshape(-1, width)
        items = []
        for i, row in enumerate(rows):
            where = f"rank {rank}: {kind} {i}"
            items.append(
                (where, row, {f: _count(row, fields, f, where, low=lo) for f, lo in ints.items()})
            )
        announced = sum(n[size] for _, _, n in items)
        if announced != b.size:
            raise WireError(
                f"rank {rank}: {kind} header announces {announced} values ({size}), "
                f"the body holds {b.size}"
            )
        off = 0
        for where, row, n in items:
            yield where, row, n, b[off : off + n[size]]
            off += n[size]


def _senders(kind: str, clients: list[int], planned: set[int] | None) -> None:
    """Every client sends at most once, and only a client of the round's plan (when given)."""
    seen = set()
    for c in clients:
        if c in seen:
            raise WireError(f"{kind} of client {c}: sent twice")
        if planned is not None and c not in planned:
            raise WireError(f"{kind} of client {c}: not a client of this round's plan")
        seen.add(c)


# --- update -----------------------------------------------------------------------------------


@dataclass
class Update:
    """One client's upload after local training, as the server reads it."""

    client: int
    subspace: int
    samples: int
    loss: float
    _: KW_ONLY
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
    *,
    planned=None,
    decode: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> list[Update]:
    """Gathered per-rank (header, body) → updates sorted by client id (framing checked; senders
    among ``planned`` client ids, when given). ``decode``: (header row, payload) → float32 delta
    (None: uncompressed)."""
    decode = decode or (lambda r, p: raw_values(int(r[5]), p))
    ints = {"client": 0, "subspace": 0, "samples": 1, "numel": 0, "steps": 0, "nbytes": 0}
    out = [
        Update(
            n["client"],
            n["subspace"],
            n["samples"],
            float(r[3]),
            seconds=float(r[4]),
            steps=n["steps"],
            delta=decode(r, p),
            nbytes=wire_nbytes(r, p),
        )
        for _, r, n, p in _items("update", heads, values, UPDATE_FIELDS, size="nbytes", ints=ints)
    ]
    _senders("update", [u.client for u in out], planned)
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
    *,
    planned=None,
    decode: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> list[TokenUpload]:
    """Gathered per-rank (header, body) → uploads sorted by client id (framing checked; senders
    among ``planned`` client ids, when given). ``decode``: (size, payload) → float32 values
    (None: uncompressed)."""
    decode = decode or raw_values
    ints = {"client": 0, "samples": 1, "size": 0, "nbytes": 0}
    out = [
        TokenUpload(n["client"], n["samples"], decode(n["size"], p), wire_nbytes(r, p))
        for _, r, n, p in _items("token", heads, values, TOKEN_FIELDS, size="nbytes", ints=ints)
    ]
    _senders("token", [u.client for u in out], planned)
    return sorted(out, key=lambda e: e.client)


# --- residual (error feedback's memory of each client) ----------------------------------------


def pack_residuals(items: dict[tuple[int, int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(client, part) → float32 residual, in key order → (int64 header, float32 body)."""
    keys = sorted(items)
    head = np.array([[c, k, items[(c, k)].size] for c, k in keys], np.int64).reshape(-1)
    return head, _body([np.asarray(items[key], VALUE_DTYPE) for key in keys], VALUE_DTYPE)


def unpack_residuals(heads, bodies) -> dict[tuple[int, int], np.ndarray]:
    """Gathered (or scattered) per-rank (header, body) → (client, part) → float32 residual."""
    ints = {"client": 0, "part": 0, "size": 0}
    return {
        (n["client"], n["part"]): np.array(v, VALUE_DTYPE)
        for _, _, n, v in _items("residual", heads, bodies, RESIDUAL_FIELDS, size="size", ints=ints)
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
    """Gathered per-rank (header, body) → (task, index) → text (framing and UTF-8 checked)."""
    ints = {"task": 0, "index": 0, "nbytes": 0}
    out = {}
    for where, _, n, b in _items(
        "prediction", heads, bodies, PREDICTION_FIELDS, size="nbytes", ints=ints
    ):
        key = (n["task"], n["index"])
        if key in out:
            raise WireError(f"{where}: task {key[0]} sample {key[1]} sent twice")
        try:
            out[key] = bytes(b).decode("utf-8")
        except UnicodeDecodeError as e:
            raise WireError(f"{where}: text is not UTF-8 ({e.reason} at byte {e.start})") from None
    return out
