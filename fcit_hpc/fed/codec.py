"""Codecs of the uploads: how a float32 vector becomes the bytes that travel, and back.

A :class:`Codec` turns x (float32 [n]) into a uint8 payload of ``nbytes(n)`` bytes and decodes it
to x̂ (float32 [n]):

- ``none``: the float32 values themselves (4n bytes);
- ``fp16``, ``bf16``: half precision, round to nearest even (2n bytes; fp16 overflows to ±inf
  beyond 65504, which the server rejects as non-finite);
- ``int8``, ``int4``: symmetric per-block quantisation, one float32 scale s_b = max|x_b| / L per
  block of ``block`` values (L = 127 or 7), q = round(x / s_b) (4·⌈n/block⌉ + n, or + ⌈n/2⌉
  bytes: two 4-bit codes a byte); |x − x̂| ≤ s_b / 2 elementwise;
- ``topk``: the k = ⌈fraction·n⌉ largest |x| (ties: the lower index), as uint32 indices
  (ascending) and float32 values (8k bytes); every other value decodes to 0. NaN counts as the
  largest, so a non-finite update stays non-finite on the wire.

:class:`UplinkCodec` applies one codec per part of a message (the subspace deltas, the projector,
the identity tokens: the ``compress`` section of the config) with client-side error feedback
(Seide et al. 2014; Karimireddy et al. 2019, EF-SGD): a client sends C(x + e) and keeps
e ← x + e − D(C(x + e)) for its next upload of the same part, so Σ_t x̂_t + e_T = Σ_t x_t.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fcit_hpc.registry import CODECS

__all__ = [
    "CODECS",
    "Codec",
    "CodecError",
    "UplinkCodec",
    "decode_rows",
    "encode_rows",
    "update_parts",
]
_LEVELS = {"int8": 127, "int4": 7}


class CodecError(ValueError):
    """A payload that is not what its codec writes (a malformed upload)."""


def _u8(a: np.ndarray) -> np.ndarray:
    return np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8)


def _view(buf: np.ndarray, dtype, count: int, offset: int = 0) -> np.ndarray:
    size = np.dtype(dtype).itemsize * count
    return np.frombuffer(buf[offset : offset + size].tobytes(), dtype, count)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → the uint16 bits of bfloat16, rounded to nearest even (NaN stays a quiet NaN)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


@dataclass(frozen=True)
class Codec:
    """One codec (module docstring): ``name`` of :data:`CODECS`; ``block``: values per scale
    (int8, int4); ``fraction``: the share of values top-k keeps."""

    name: str = "none"
    block: int = 64
    fraction: float = 0.1

    @property
    def lossless(self) -> bool:
        return self.name == "none"

    def topk_count(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.fraction * n))) if n else 0

    def nbytes(self, n: int) -> int:
        """Payload bytes of an n-value vector."""
        name = self.name
        if name == "none":
            return 4 * n
        if name in ("fp16", "bf16"):
            return 2 * n
        if name in _LEVELS:
            scales = 4 * math.ceil(n / self.block)
            return scales + (n if name == "int8" else (n + 1) // 2)
        return 8 * self.topk_count(n)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 [n] → uint8 [nbytes(n)]."""
        x = np.ascontiguousarray(x, np.float32).reshape(-1)
        name = self.name
        if name == "none":
            return _u8(x)
        if name == "fp16":
            with np.errstate(over="ignore"):
                return _u8(x.astype(np.float16))
        if name == "bf16":
            return _u8(bf16_bits(x))
        if name in _LEVELS:
            return self._encode_blocks(x, _LEVELS[name])
        k = self.topk_count(x.size)
        key = np.where(np.isnan(x), np.inf, np.abs(x))
        idx = np.sort(np.argsort(-key, kind="stable")[:k]).astype(np.uint32)
        return np.concatenate([_u8(idx), _u8(x[idx])])

    def _encode_blocks(self, x: np.ndarray, levels: int) -> np.ndarray:
        n, b = x.size, self.block
        nb = math.ceil(n / b)
        padded = np.zeros(nb * b, np.float32)
        padded[:n] = x
        blocks = padded.reshape(nb, b)  # (blocks, block)
        with np.errstate(invalid="ignore"):
            scale = (np.max(np.abs(blocks), axis=1) / np.float32(levels)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))  # a zero block codes as zeros
        with np.errstate(invalid="ignore"):
            q = np.clip(np.rint(blocks / safe[:, None]), -levels, levels)
        q = np.nan_to_num(q, nan=0).astype(np.int8).reshape(-1)[:n]
        if levels == 127:
            return np.concatenate([_u8(scale), _u8(q)])
        codes = (q + 8).astype(np.uint8)  # 1..15
        if n % 2:
            codes = np.append(codes, np.uint8(8))
        return np.concatenate([_u8(scale), codes[0::2] | (codes[1::2] << 4)])

    def decode(self, buf: np.ndarray, n: int) -> np.ndarray:
        """uint8 payload of an n-value vector → float32 [n]; CodecError when it is malformed."""
        buf = np.asarray(buf)
        if buf.dtype != np.uint8 or buf.ndim != 1 or buf.size != self.nbytes(n):
            raise CodecError(
                f"{self.name} payload of {buf.size} bytes, expected {self.nbytes(n)} for {n} values"
            )
        name = self.name
        if name == "none":
            return _view(buf, np.float32, n).copy()
        if name == "fp16":
            return _view(buf, np.float16, n).astype(np.float32)
        if name == "bf16":
            return (_view(buf, np.uint16, n).astype(np.uint32) << 16).view(np.float32)
        if name in _LEVELS:
            return self._decode_blocks(buf, n, _LEVELS[name])
        k = self.topk_count(n)
        idx = _view(buf, np.uint32, k)
        if k and (idx.max() >= n or (np.diff(idx.astype(np.int64)) <= 0).any()):
            raise CodecError("topk payload with indices out of range or not ascending")
        out = np.zeros(n, np.float32)
        out[idx] = _view(buf, np.float32, k, 4 * k)
        return out

    def _decode_blocks(self, buf: np.ndarray, n: int, levels: int) -> np.ndarray:
        b, nb = self.block, math.ceil(n / self.block)
        scale = _view(buf, np.float32, nb)
        body = buf[4 * nb :]
        if levels == 127:
            q = body.view(np.int8).astype(np.float32)
        else:
            codes = np.empty(2 * body.size, np.int16)
            codes[0::2], codes[1::2] = body & 0x0F, body >> 4
            q = (codes[:n] - 8).astype(np.float32)
            if ((codes[:n] < 1) | (codes[:n] > 15)).any():
                raise CodecError("int4 payload with a code outside 1..15")
        return (q * np.repeat(scale, b)[:n]).astype(np.float32)


# parts of a message: a subspace's delta (key k >= 0), a side vector (key -1 - i for the i-th
# side of RunState.sides(): the projector, a method's mixer), the identity token
TOKEN_PART = "token"


@dataclass(frozen=True)
class UplinkCodec:
    """The run's upload codecs (config ``compress``): ``subspace`` for the subspace deltas and a
    method's mixer, ``projector`` for the LLaVA projector's delta, ``token`` for the identity
    tokens; ``error_feedback``: a client keeps its residual per part (deltas only: a token is
    not summed by the server, so it has no error to feed back)."""

    subspace: Codec = Codec()
    projector: Codec = Codec()
    token: Codec = Codec()
    error_feedback: bool = True

    @classmethod
    def from_config(cls, c) -> UplinkCodec:
        def make(name: str) -> Codec:
            return Codec(name, c.block_size, c.topk_fraction)

        return cls(make(c.subspace), make(c.projector), make(c.token), c.error_feedback)

    @property
    def keeps_residuals(self) -> bool:
        """Whether clients keep error-feedback residuals (a lossy codec on a delta part)."""
        return self.error_feedback and not (self.subspace.lossless and self.projector.lossless)

    def codec(self, key: int, side_names: tuple[str, ...]) -> Codec:
        if key >= 0:
            return self.subspace
        return self.projector if side_names[-1 - key] == "projector" else self.subspace

    def layout(self, parts: list[tuple[int, int]], side_names: tuple[str, ...]):
        """(key, size, codec) of every part of an update (``parts``: (key, size))."""
        return [(key, size, self.codec(key, side_names)) for key, size in parts]

    def encode_update(
        self,
        x: np.ndarray,
        parts: list[tuple[int, int]],
        side_names: tuple[str, ...],
        residuals: dict[int, np.ndarray],
    ) -> np.ndarray:
        """A client's update x (float32, the parts concatenated) → its payload. With error
        feedback, ``residuals`` (key → float32 residual of this client) is read and updated in
        place; a part whose value is not finite (a broken client) restarts from zero."""
        if parts and x.size != sum(s for _, s in parts):  # malformed (debug.bad_shape_clients):
            parts = [*parts[:-1], (parts[-1][0], x.size - sum(s for _, s in parts[:-1]))]
        out, off = [], 0
        for key, size, codec in self.layout(parts, side_names):
            v = x[off : off + size]
            off += size
            ef = self.error_feedback and not codec.lossless
            if ef and key in residuals:
                v = (v + residuals[key]).astype(np.float32)
            payload = codec.encode(v)
            if ef:
                r = (v - codec.decode(payload, size)).astype(np.float32)
                residuals[key] = r if np.isfinite(r).all() else np.zeros(size, np.float32)
            out.append(payload)
        return np.concatenate(out) if out else np.zeros(0, np.uint8)

    def decode_update(
        self, payload: np.ndarray, parts: list[tuple[int, int]], side_names: tuple[str, ...]
    ) -> np.ndarray:
        """Payload → the float32 update (CodecError when malformed)."""
        lay = self.layout(parts, side_names)
        if payload.size != sum(c.nbytes(s) for _, s, c in lay):
            raise CodecError(f"update payload of {payload.size} bytes does not fit its parts")
        out, off = [], 0
        for _, size, codec in lay:
            nb = codec.nbytes(size)
            out.append(codec.decode(payload[off : off + nb], size))
            off += nb
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def update_parts(
    subspaces: Iterable[int], numel: int, sides: dict[str, int]
) -> list[tuple[int, int]]:
    """(key, size) of the parts of an update: each trained subspace's delta (key k), then each
    side vector in upload order (key -1 - i)."""
    parts = [(int(k), numel) for k in subspaces]
    return parts + [(-1 - i, size) for i, size in enumerate(sides.values())]


def encode_rows(codec: Codec, m: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] → one payload, each row coded on its own (a subspace's vector)."""
    parts = [codec.encode(row) for row in np.asarray(m, np.float32)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def decode_rows(codec: Codec, buf: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The payload of :func:`encode_rows` → float32 [rows, cols]."""
    nb = codec.nbytes(cols)
    if buf.size != rows * nb:
        raise CodecError(f"{buf.size} bytes for {rows} rows of {cols} values, expected {rows * nb}")
    return np.stack([codec.decode(buf[i * nb : (i + 1) * nb], cols) for i in range(rows)])
