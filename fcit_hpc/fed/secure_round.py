"""One round of secure aggregation over the ranks: the SecAgg+ stages of :mod:`fcit_hpc.fed.secagg`
as collectives, around local training.

Groups: every subspace a client trains is one group (its members: the round's clients that train
it), and the side vectors (projector, mixer), when there are any, one more group of every training
client. Every rank derives the groups from the plan and the broadcast subspace assignment.

Messages (flat typed buffers, never pickled; the server only forwards what is not its own):

- keys (up, then broadcast as the server's key table): int64 rows (client, group) + uint8 64 bytes
  each (pk1 ‖ pk2);
- shares (up, then forwarded by broadcast): int64 rows (sender, group, recipient, nbytes) + uint8
  AES-GCM ciphertexts;
- masked vectors (up): int64 rows (client, group, n) + uint64 values;
- drop-outs (broadcast): int64 rows (group, client) of the members whose vector is missing;
- unmask shares (up): int64 rows (holder, group, owner, kind, x) + uint8 66 bytes each.

The neighbour graph of a group is a function of its members and (seed, stage, round, group),
computed alike by the server and the clients (Flower's server sends it; here it needs no message).
"""

from __future__ import annotations

import numpy as np

from fcit_hpc.config import PrivacyConfig
from fcit_hpc.fed import secagg as sa
from fcit_hpc.seeds import derive_seed

SALT_SECAGG_GRAPH = 5_009


def _rows(rows: list, width: int) -> np.ndarray:
    return np.asarray(rows, np.int64).reshape(-1, width)


def _bytes(blobs: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(blobs), np.uint8).copy() if blobs else np.zeros(0, np.uint8)


def _split(heads, bodies, width: int, size):
    """(row, its bytes) over every rank's message; ``size(row)``: bytes of the row's item."""
    for h, b in zip(heads, bodies, strict=True):
        off = 0
        for row in h.reshape(-1, width):
            n = size(row)
            yield row, bytes(b[off : off + n])
            off += n


class SecureRound:
    """A rank's part of one round's secure aggregation (every rank makes one; rank 0 also acts
    as the server). ``groups``: group → sorted member ids (the whole round); ``mine``: the
    clients this rank reports."""

    def __init__(
        self,
        comm,
        p: PrivacyConfig,
        *,
        seed: int,
        stage: int,
        round_: int,
        groups: dict[int, list[int]],
        mine,
    ):
        self.comm, self.p = comm, p
        self.seed, self.stage, self.round = seed, stage, round_
        self.groups = groups
        mine = set(int(c) for c in mine)
        self.members = {
            (c, g): sa.Member(c, g) for g, ms in groups.items() for c in ms if c in mine
        }
        self.keys: dict[int, dict[int, bytes]] = {}
        self.graphs: dict[int, dict[int, list[int]]] = {}
        self.masked: list[tuple[int, int, np.ndarray]] = []
        self.sent: dict[int, int] = {}  # server: client → bytes it uploaded for the protocol

    def _count(self, heads, bodies, width: int, col: int, *, size) -> None:
        """Server: add each gathered row (and its item's bytes) to its client's uploads."""
        if heads is None:
            return
        for h in heads:
            for row in h.reshape(-1, width):
                c = int(row[col])
                self.sent[c] = self.sent.get(c, 0) + 8 * width + int(size(row))

    def graph(self, g: int) -> dict[int, list[int]]:
        if g not in self.graphs:
            seed = derive_seed(self.seed, self.stage, self.round, g, SALT_SECAGG_GRAPH)
            self.graphs[g] = sa.harary_graph(self.groups[g], self.p.secagg_neighbours, seed)
        return self.graphs[g]

    def t(self, g: int, c: int) -> int:
        return sa.threshold(len(self.graph(g)[c]), self.p.secagg_threshold)

    # stage 1 ------------------------------------------------------------------------------
    def advertise_keys(self) -> None:
        rows, blobs = [], []
        for (c, g), m in sorted(self.members.items()):
            rows.append((c, g))
            blobs.append(m.public_keys())
        heads = self.comm.gatherv(_rows(rows, 2).reshape(-1))
        bodies = self.comm.gatherv(_bytes(blobs))
        self._count(heads, bodies, 2, 0, size=lambda r: 64)
        table = (
            (np.concatenate(heads) if heads is not None else None),
            (np.concatenate(bodies) if bodies is not None else None),
        )
        head = self.comm.bcast_array(table[0])
        body = self.comm.bcast_array(table[1])
        for i, (c, g) in enumerate(head.reshape(-1, 2)):
            self.keys.setdefault(int(g), {})[int(c)] = bytes(body[64 * i : 64 * (i + 1)])

    # stage 2 ------------------------------------------------------------------------------
    def share_keys(self) -> None:
        rows, blobs = [], []
        for (c, g), m in sorted(self.members.items()):
            for v, blob in sorted(
                m.share_keys(self.graph(g)[c], self.keys[g], self.t(g, c)).items()
            ):
                rows.append((c, g, v, len(blob)))
                blobs.append(blob)
        heads = self.comm.gatherv(_rows(rows, 4).reshape(-1))
        bodies = self.comm.gatherv(_bytes(blobs))
        self._count(heads, bodies, 4, 0, size=lambda r: r[3])
        head = self.comm.bcast_array(np.concatenate(heads) if heads is not None else None)
        body = self.comm.bcast_array(np.concatenate(bodies) if bodies is not None else None)
        for row, blob in _split([head], [body], 4, lambda r: int(r[3])):
            sender, g, v = int(row[0]), int(row[1]), int(row[2])
            if (v, g) in self.members:
                self.members[(v, g)].receive(sender, blob, self.keys[g])

    # stage 3 ------------------------------------------------------------------------------
    def mask(self, client: int, group: int, values: np.ndarray) -> None:
        """A client's vector of one group (float, already weighted), encoded and masked."""
        bound = sa.value_bound(self.p.secagg_frac_bits, len(self.groups[group]))
        x = sa.encode(values, self.p.secagg_frac_bits, bound)
        y = self.members[(client, group)].masked(x, self.graph(group)[client], self.keys[group])
        self.masked.append((client, group, y))

    def upload(self) -> dict[int, dict[int, np.ndarray]] | None:
        """Gather the masked vectors: group → client → y on the server, None elsewhere."""
        rows = [(c, g, y.size) for c, g, y in self.masked]
        body = (
            np.concatenate([y for _, _, y in self.masked])
            if self.masked
            else np.zeros(0, np.uint64)
        )
        heads = self.comm.gatherv(_rows(rows, 3).reshape(-1))
        bodies = self.comm.gatherv(body)
        self._count(heads, bodies, 3, 0, size=lambda r: 8 * r[2])
        if heads is None:
            return None
        out: dict[int, dict[int, np.ndarray]] = {}
        for h, b in zip(heads, bodies, strict=True):
            off = 0
            for c, g, n in h.reshape(-1, 3):
                out.setdefault(int(g), {})[int(c)] = b[off : off + int(n)]
                off += int(n)
        return out

    # stage 4 ------------------------------------------------------------------------------
    def unmask(self, masked: dict[int, dict[int, np.ndarray]] | None, sizes: dict[int, int]):
        """The server's group sums (group → float64 Σ values of the members that uploaded; groups
        nobody uploaded to are absent) on rank 0, None elsewhere. ``sizes``: group → length."""
        drops = None
        if masked is not None:
            drops = _rows(
                [
                    (g, c)
                    for g, ms in sorted(self.groups.items())
                    for c in ms
                    if c not in masked.get(g, {})
                ],
                2,
            )
        drops = self.comm.bcast_array(drops)
        dropped: dict[int, set[int]] = {}
        for g, c in drops:
            dropped.setdefault(int(g), set()).add(int(c))
        rows, blobs = [], []
        for (c, g), m in sorted(self.members.items()):
            if c in dropped.get(g, set()):
                continue  # a client that dropped out answers nothing
            for owner, kind, x, share in m.unmask(dropped.get(g, set())):
                rows.append((c, g, owner, kind, x))
                blobs.append(share)
        heads = self.comm.gatherv(_rows(rows, 5).reshape(-1))
        bodies = self.comm.gatherv(_bytes(blobs))
        self._count(heads, bodies, 5, 0, size=lambda r: sa.SHARE_BYTES)
        if heads is None:
            return None
        shares: dict[int, list] = {}
        for row, blob in _split(heads, bodies, 5, lambda r: sa.SHARE_BYTES):
            _, g, owner, kind, x = (int(v) for v in row)
            shares.setdefault(g, []).append((owner, kind, x, blob))
        sums = {}
        for g in sorted(self.groups):
            if not masked.get(g):
                continue
            ring = sa.unmask_sum(
                g,
                self.graph(g),
                self.keys[g],
                masked[g],
                shares=shares.get(g, []),
                t_frac=self.p.secagg_threshold,
                n=sizes[g],
            )
            sums[g] = sa.decode(ring, self.p.secagg_frac_bits)
        return sums
