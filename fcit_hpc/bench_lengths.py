"""Sample lengths for ``fcit bench train --lengths``: what a client's batches look like when its
conversations differ in length, padded (every row to the batch's longest) or packed
(:func:`fcit_hpc.data.batches.pack_batch`).

A spec gives the TEXT tokens of each sample (a LLaVA sample also has its image tokens):

- ``fixed``: every sample ``model.max_seq_len`` (the default; no padding);
- ``uniform:LO:HI``: integers drawn uniformly from [LO, HI] (seeded);
- ``file:PATH``: one integer per line (``#`` comments allowed), used in order and again from the
  top when the run needs more samples, e.g. the token counts of a release's client file.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import torch

from fcit_hpc.data.batches import collate
from fcit_hpc.errors import ConfigError


@dataclass(frozen=True)
class Lengths:
    """A parsed ``--lengths`` spec."""

    kind: str  # fixed | uniform | file
    lo: int = 0
    hi: int = 0
    values: tuple[int, ...] = ()
    _: KW_ONLY
    source: str = ""

    def describe(self, fixed: int) -> str:
        if self.kind == "fixed":
            return f"fixed {fixed} text tokens"
        if self.kind == "uniform":
            return f"uniform {self.lo}..{self.hi} text tokens"
        v = self.values
        return f"{len(v)} lengths from {self.source} (text tokens {min(v)}..{max(v)})"

    def draw(self, n: int, fixed: int, seed: int) -> list[int]:
        """Text tokens of ``n`` samples."""
        if self.kind == "fixed":
            return [fixed] * n
        if self.kind == "uniform":
            gen = torch.Generator().manual_seed(seed)
            return torch.randint(self.lo, self.hi + 1, (n,), generator=gen).tolist()
        return [self.values[i % len(self.values)] for i in range(n)]


def parse_lengths(spec: str) -> Lengths:
    """``--lengths`` → :class:`Lengths`; ConfigError naming the flag on a bad spec."""
    kind, _, rest = spec.partition(":")
    if kind == "fixed" and not rest:
        return Lengths("fixed")
    if kind == "uniform":
        try:
            lo, hi = (int(x) for x in rest.split(":"))
        except ValueError:
            lo = hi = -1
        if not 2 <= lo <= hi:
            raise ConfigError(f"--lengths: {spec!r}: want uniform:LO:HI with 2 <= LO <= HI")
        return Lengths("uniform", lo, hi)
    if kind == "file" and rest:
        path = Path(rest)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--lengths: {path}: cannot read ({e})") from None
        values = []
        for i, line in enumerate(lines, 1):
            text = line.split("#")[0].strip()
            if not text:
                continue
            if not text.isdigit() or int(text) < 2:
                raise ConfigError(f"--lengths: {path}:{i}: {text!r} is not an integer >= 2")
            values.append(int(text))
        if not values:
            raise ConfigError(f"--lengths: {path}: no lengths")
        return Lengths("file", values=tuple(values), source=str(path))
    raise ConfigError(f"--lengths: {spec!r}: want fixed, uniform:LO:HI or file:PATH")


def synthetic_rows(shape, text_lens: list[int], gen: torch.Generator):
    """(input_ids, labels) of one synthetic sample per text length: random ids (not the image
    token's), the image tokens after the first position, the loss on the last half of the text."""
    img = shape.image_token_id
    rows = []
    for t in text_lens:
        T = shape.image_tokens + t
        if img < 0:
            ids = torch.randint(0, shape.vocab, (T,), generator=gen)
        else:  # skip the image token's id
            ids = torch.randint(0, shape.vocab - 1, (T,), generator=gen)
            ids += (ids >= img).long()
        ids[1 : 1 + shape.image_tokens] = img
        labels = torch.full_like(ids, -100)
        labels[T - t // 2 :] = ids[T - t // 2 :]
        rows.append((ids, labels))
    return rows


def batches_of(rows, images, batch_size: int, pack: bool, *, device) -> list[dict]:
    """Consecutive rows as batches, padded (pad id 0) or packed, with their images, on
    ``device``."""
    out = []
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size], 0, pack)
        if images is not None:
            batch["pixel_values"] = images[i : i + batch_size]
        out.append({k: v.to(device) for k, v in batch.items()})
    return out
