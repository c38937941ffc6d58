"""Secure aggregation, SecAgg+ (Bell et al., CCS 2020; SecAgg: Bonawitz et al., CCS 2017): the
server learns the sum of a group's vectors and nothing else, also when some clients drop out
after the key sharing.

Per round and per aggregation group (the clients that update one subspace, or every client for
the side vectors), in the stages of Flower's ``SecAggPlusWorkflow`` / ``secaggplus_mod``:

1. *setup / advertise keys*: every member u makes two X25519 key pairs, (sk1, pk1) for its
   pairwise masks and (sk2, pk2) for encrypting its shares, and a 32-byte self-mask seed b_u; it
   sends (pk1, pk2). The server fixes the neighbour graph: a k-regular circulant (Harary) graph
   over the members in a seeded order (k = all others: plain SecAgg).
2. *share keys*: u splits sk1_u and b_u into Shamir shares (threshold t) for itself and each
   neighbour, and sends each neighbour v its pair AES-GCM-encrypted under
   HKDF(X25519(sk2_u, pk2_v)); the server only forwards them.
3. *collect masked vectors*: u encodes its vector x_u in the ring Z_{2^64} (fixed point,
   ``frac_bits``) and uploads y_u = x_u + PRG(b_u) + Σ_{v∈N(u), v>u} PRG(s_uv)
   − Σ_{v∈N(u), v<u} PRG(s_uv), with s_uv = HKDF(X25519(sk1_u, pk1_v)) = s_vu. A client that
   drops out uploads nothing.
4. *unmask*: each survivor returns, for every neighbour, the share of b (the neighbour
   uploaded) or of sk1 (it dropped out). The server rebuilds them (at least t shares each, else
   :class:`SecAggError`), subtracts the survivors' self masks and the dropped clients' pairwise
   masks from Σ y_u, and decodes the sum.

PRG: a ChaCha20 keystream keyed by HKDF-SHA256 of the seed (HKDF alone expands to at most 8,160
bytes). Shamir's scheme works over GF(2^521 − 1), wide enough for a 32-byte secret in one piece.
Secret keys and seeds come from the OS's randomness, as in a deployment: the masks cancel exactly
in the ring, so the decoded sum, and every result after it, does not depend on them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import KW_ONLY, dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fcit_hpc.errors import FcitError

PRIME = (1 << 521) - 1  # Mersenne prime: the Shamir field
SHARE_BYTES = 66  # an element of GF(PRIME)
KEY_BYTES = 32
RING_BITS = 64  # vectors live in Z_{2^64}: numpy uint64 arithmetic wraps there
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SecAggError(FcitError):
    """Secure aggregation cannot finish a round (too many drop-outs, a value out of range). Raised
    on one rank (the server, or a client's): the job is aborted; the state keeps the last
    completed round."""

    rank_local = True


# --- primitives ---------------------------------------------------------------------------------


def hkdf(secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret``, bound to ``info``; no salt."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def prg(seed: bytes, info: bytes, n: int) -> np.ndarray:
    """n uniform uint64 values from ``seed``: ChaCha20 keystream under HKDF(seed, info)."""
    key = hkdf(seed, b"fcit-secagg-prg|" + info, 32 + 16)
    enc = Cipher(algorithms.ChaCha20(key[:32], key[32:]), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)), dtype="<u8").astype(np.uint64)


def shamir_split(secret: bytes, xs: list[int], t: int) -> list[bytes]:
    """Shares of ``secret`` at the points ``xs`` (>= 1, distinct) of a random polynomial of degree
    t − 1 over GF(PRIME); any t rebuild it (:func:`shamir_combine`)."""
    coeffs = [int.from_bytes(secret, "big")] + [
        int.from_bytes(os.urandom(SHARE_BYTES), "big") % PRIME for _ in range(t - 1)
    ]
    out = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out.append(y.to_bytes(SHARE_BYTES, "big"))
    return out


def shamir_combine(points: list[tuple[int, bytes]], length: int = KEY_BYTES) -> bytes:
    """The secret from t shares (x, y): Lagrange interpolation at 0."""
    xs = [x for x, _ in points]
    secret = 0
    for j, (xj, yj) in enumerate(points):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        secret = (secret + int.from_bytes(yj, "big") * num * pow(den, -1, PRIME)) % PRIME
    return secret.to_bytes(length, "big")


def encode(values: np.ndarray, frac_bits: int, bound: float) -> np.ndarray:
    """float [n] → uint64 fixed point round(v·2^frac_bits) mod 2^64 (two's complement). |v| must
    stay below ``bound`` (so the group's sum cannot wrap), else :class:`SecAggError`."""
    v = np.asarray(values, np.float64)
    if v.size and not np.abs(v).max() < bound:
        raise SecAggError(
            f"a value of magnitude {np.abs(v).max():.3g} does not fit the ring (|v| < {bound:.3g} "
            f"with privacy.secagg_frac_bits {frac_bits}); lower the fraction bits"
        )
    return np.rint(v * 2.0**frac_bits).astype(np.int64).view(np.uint64)


def decode(ring: np.ndarray, frac_bits: int) -> np.ndarray:
    """uint64 [n] (a sum in the ring) → float64, reading it as a signed fixed-point number."""
    return ring.view(np.int64).astype(np.float64) / 2.0**frac_bits


def value_bound(frac_bits: int, members: int) -> float:
    """The largest |v| a member may encode: the sum of ``members`` of them stays in the signed
    half of the ring."""
    return 2.0 ** (RING_BITS - 1 - frac_bits) / max(members, 1)


def harary_graph(members: list[int], k: int, seed: int) -> dict[int, list[int]]:
    """Neighbours of each member: a k-regular circulant graph (each member joined to the k/2 next
    and previous in a seeded shuffled order, Bell et al.'s Harary graph); k = 0 or k >= members − 1:
    the complete graph (SecAgg)."""
    n = len(members)
    if k <= 0 or k >= n - 1:
        return {u: [v for v in members if v != u] for u in members}
    order = [members[i] for i in np.random.default_rng(seed).permutation(n)]
    pos = {u: i for i, u in enumerate(order)}
    half = k // 2
    return {
        u: sorted({order[(pos[u] + d) % n] for d in range(-half, half + 1) if d != 0})
        for u in members
    }


def threshold(degree: int, frac: float) -> int:
    """t: shares needed to rebuild a secret shared among a member and its ``degree`` neighbours —
    more than ``frac`` of them (0.5: a strict majority, so the server never rebuilds both a
    survivor's b and its sk1)."""
    return min(degree + 1, int(np.floor(frac * (degree + 1))) + 1)


def public_bytes(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(*_RAW)


def _pair_info(group: int, a: int, b: int) -> bytes:
    return b"pair|%d|%d|%d" % (group, min(a, b), max(a, b))


# --- one member of one group ---------------------------------------------------------------------


@dataclass
class Member:
    """A client's part of one group's SecAgg+ instance in one round."""

    client: int
    group: int
    sk1: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    sk2: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    _: KW_ONLY
    b: bytes = field(default_factory=lambda: os.urandom(KEY_BYTES))
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # owner → (sk1, b) shares

    def public_keys(self) -> bytes:
        """Stage 1: pk1 ‖ pk2 (64 bytes)."""
        return public_bytes(self.sk1.public_key()) + public_bytes(self.sk2.public_key())

    def _channel(self, other_pk2: bytes, a: int, b: int) -> AESGCM:
        shared = self.sk2.exchange(X25519PublicKey.from_public_bytes(other_pk2))
        return AESGCM(hkdf(shared, b"chan|%d|%d|%d" % (self.group, min(a, b), max(a, b))))

    def share_keys(self, neighbours: list[int], keys: dict[int, bytes], t: int) -> dict[int, bytes]:
        """Stage 2: recipient → encrypted (sk1 share, b share); the share for itself is kept.
        Share points: 1 + the rank of the recipient among {u} ∪ N(u) sorted."""
        holders = sorted([self.client, *neighbours])
        xs = [i + 1 for i in range(len(holders))]
        sk = self.sk1.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        s_sk, s_b = shamir_split(sk, xs, t), shamir_split(self.b, xs, t)
        out = {}
        for v, x, a, bb in zip(holders, xs, s_sk, s_b, strict=True):
            plain = struct.pack("<qqq", self.client, v, x) + a + bb
            if v == self.client:
                self.held[v] = (plain,)
                continue
            nonce = os.urandom(12)
            out[v] = nonce + self._channel(keys[v][32:], self.client, v).encrypt(nonce, plain, None)
        return out

    def receive(self, sender: int, blob: bytes, keys: dict[int, bytes]) -> None:
        """Stage 2 (recipient side): decrypt and keep a neighbour's shares."""
        nonce, ct = blob[:12], blob[12:]
        self.held[sender] = (
            self._channel(keys[sender][32:], sender, self.client).decrypt(nonce, ct, None),
        )

    def masked(self, x: np.ndarray, neighbours: list[int], keys: dict[int, bytes]) -> np.ndarray:
        """Stage 3: y_u = x_u + PRG(b_u) ± PRG(s_uv) (uint64, mod 2^64)."""
        y = x + prg(self.b, b"self|%d" % self.group, x.size)
        for v in neighbours:
            m = pair_mask(self.sk1, keys[v][:32], self.group, self.client, b=v, n=x.size)
            y = y + m if self.client < v else y - m
        return y

    def unmask(self, dropped: set[int]) -> list[tuple[int, int, int, bytes]]:
        """Stage 4: (owner, kind 0 = sk1 / 1 = b, x, share) for every owner whose share it holds."""
        out = []
        for owner, (plain,) in sorted(self.held.items()):
            _, _, x = struct.unpack("<qqq", plain[:24])
            s_sk, s_b = plain[24 : 24 + SHARE_BYTES], plain[24 + SHARE_BYTES :]
            out.append((owner, 0, x, s_sk) if owner in dropped else (owner, 1, x, s_b))
        return out


def pair_mask(sk1, other_pk1: bytes, group: int, a: int, *, b: int, n: int) -> np.ndarray:
    """PRG(s_ab), s_ab = X25519(sk1_a, pk1_b) = X25519(sk1_b, pk1_a)."""
    shared = sk1.exchange(X25519PublicKey.from_public_bytes(other_pk1))
    return prg(shared, _pair_info(group, a, b), n)


# --- the server's side of one group --------------------------------------------------------------


def unmask_sum(
    group: int,
    graph: dict[int, list[int]],
    keys: dict[int, bytes],
    masked: dict[int, np.ndarray],
    *,
    shares: list[tuple[int, int, int, bytes]],
    t_frac: float,
    n: int,
) -> np.ndarray:
    """Stage 4 on the server: Σ x_u (uint64 [n]) over the members that uploaded (``masked``), from
    their masked vectors and the survivors' shares; :class:`SecAggError` when a needed secret has
    fewer than t shares."""
    survivors = sorted(masked)
    dropped = sorted(set(graph) - set(masked))
    total = np.zeros(n, np.uint64)
    for u in survivors:
        total = total + masked[u]
    by_owner: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
    for owner, kind, x, s in shares:
        by_owner.setdefault((owner, kind), []).append((x, s))

    def rebuild(owner: int, kind: int) -> bytes:
        t = threshold(len(graph[owner]), t_frac)
        got = by_owner.get((owner, kind), [])
        if len(got) < t:
            what = "pairwise-mask key" if kind == 0 else "self-mask seed"
            raise SecAggError(
                f"secure aggregation of group {group}: client {owner}'s {what} has {len(got)} "
                f"shares from surviving clients, {t} are needed (too many drop-outs; "
                "privacy.secagg_threshold, federation.dropout)"
            )
        return shamir_combine(sorted(got)[:t])

    for u in survivors:
        total = total - prg(rebuild(u, 1), b"self|%d" % group, n)
    for d in dropped:
        sk = X25519PrivateKey.from_private_bytes(rebuild(d, 0))
        for u in graph[d]:
            if u in masked:  # y_u carried +PRG(s_ud) when u < d, −PRG(s_ud) otherwise
                m = pair_mask(sk, keys[u][:32], group, d, b=u, n=n)
                total = total - m if u < d else total + m
    return total
