"""The run's upload compression on both ends (config ``compress``, codecs in
:mod:`fcit_hpc.fed.codec`): clients code their updates and identity tokens for the wire, the server
decodes them before DKO and aggregation; error feedback's residuals (one per client and update
part) live in the server's state (``/compress``) and reach the client's rank for its round.

In a deployment each client would keep its own residual; the simulator keeps them on rank 0 so
that a client's memory follows it to whichever rank trains it (world-size invariance) and is
stored with the round (bitwise resume). Moving them is bookkeeping, not protocol traffic, and is
not counted in the communication bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from fcit_hpc.config import CompressConfig
from fcit_hpc.fed.codec import (
    Codec,
    CodecError,
    UplinkCodec,
    decode_rows,
    encode_rows,
    update_parts,
)
from fcit_hpc.fed.wire import pack_residuals, unpack_residuals

log = logging.getLogger("fcit.server")

Residuals = dict[tuple[int, int], np.ndarray]  # (client, part key) -> float32 residual


class Compression:
    """One per rank. ``download``: the codec of the global adapter's broadcast in training
    rounds (no top-k: it carries weights, not deltas). ``residuals``: on a client rank, those of
    its clients of the current round (received before training); ``touched``: the ones its
    clients changed (sent back after)."""

    def __init__(self, c: CompressConfig, adapter_shape: tuple[int, int] = (0, 0)):
        self.codec = UplinkCodec.from_config(c)
        self.download = Codec(c.download, c.block_size, c.topk_fraction)
        self.adapter_shape = adapter_shape  # (S_max, P) of the global adapter (the download)
        self.residuals: Residuals = {}
        self.touched: set[tuple[int, int]] = set()

    @property
    def keeps_residuals(self) -> bool:
        return self.codec.keeps_residuals

    # --- client side ---------------------------------------------------------------------------

    def encode_update(
        self, client: int, subspaces, numel: int, sides: dict[str, int], *, delta: np.ndarray
    ) -> np.ndarray:
        """A client's update (float32: its subspaces' deltas, then each side's) → payload,
        with its error-feedback residuals read and updated."""
        mine = {k: v for (c, k), v in self.residuals.items() if c == client}
        parts = update_parts(subspaces, numel, sides)
        payload = self.codec.encode_update(delta, parts, tuple(sides), mine)
        for k, _ in parts:
            if k in mine:
                self.residuals[(client, k)] = mine[k]
                self.touched.add((client, k))
        return payload

    def encode_token(self, mu: np.ndarray) -> np.ndarray:
        return self.codec.token.encode(mu)

    def receive(self, comm, parts: list[tuple[np.ndarray, np.ndarray]] | None) -> None:
        """Every rank: this round's residuals of its clients, scattered from rank 0 (``parts``:
        (header, body) per rank, rank 0's only)."""
        heads = comm.scatterv([h for h, _ in parts] if parts else None, np.int64)
        bodies = comm.scatterv([b for _, b in parts] if parts else None, np.float32)
        self.residuals = unpack_residuals([heads], [bodies])
        self.touched = set()

    def send_back(self, comm) -> Residuals | None:
        """Every rank: the residuals its clients changed, gathered on rank 0 (None elsewhere)."""
        head, body = pack_residuals({key: self.residuals[key] for key in self.touched})
        heads, bodies = comm.gatherv(head), comm.gatherv(body)
        self.residuals, self.touched = {}, set()
        return unpack_residuals(heads, bodies) if heads is not None else None

    def broadcast_adapter(self, comm, adapter: np.ndarray | None) -> np.ndarray:
        """Every rank: the global adapter [S_max, P] as the download codec delivers it (each
        subspace coded on its own; ``adapter``: rank 0's, exact). Rank 0 decodes it too, so
        that its clients start where every other rank's do."""
        payload = comm.bcast_array(
            encode_rows(self.download, adapter) if adapter is not None else None
        )
        return decode_rows(self.download, payload, *self.adapter_shape)

    # --- server side ---------------------------------------------------------------------------

    def update_decoder(
        self, numel: int, sides: dict[str, int], subspaces_of: Callable[[int], tuple[int, ...]]
    ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """(update header row, payload) → float32 delta for :func:`fcit_hpc.fed.wire.
        unpack_updates`. A payload whose value count is not its parts' decodes to that many
        zeros, an undecodable one to no values: the validation rejects both by their size."""
        names = tuple(sides)

        def decode(row: np.ndarray, payload: np.ndarray) -> np.ndarray:
            client, k, n = int(row[0]), int(row[1]), int(row[5])
            parts = update_parts(subspaces_of(k), numel, sides)
            if n != sum(s for _, s in parts):
                return np.zeros(n, np.float32)
            try:
                return self.codec.decode_update(payload, parts, names)
            except CodecError as e:
                log.warning("client %d: update payload not decodable (%s)", client, e)
                return np.zeros(0, np.float32)

        return decode

    def decode_token(self, size: int, payload: np.ndarray) -> np.ndarray:
        """For :func:`fcit_hpc.fed.wire.unpack_tokens`: an undecodable token has no values
        (DKO rejects it by its dimension)."""
        try:
            return self.codec.token.decode(payload, size)
        except CodecError as e:
            log.warning("identity token payload not decodable (%s)", e)
            return np.zeros(0, np.float32)


def residual_parts(residuals: Residuals, plan: np.ndarray, size: int):
    """Rank 0: the stored residuals of each rank's clients of the round (``plan``: int64 [n, 3]
    client, unit, rank), packed per rank for :meth:`Compression.receive`."""
    rank_of = {int(c): int(r) for c, _, r in plan}
    per_rank: list[Residuals] = [{} for _ in range(size)]
    for (c, k), v in residuals.items():
        if c in rank_of:
            per_rank[rank_of[c]][(c, k)] = v
    return [pack_residuals(p) for p in per_rank]
