"""Byte-level tokenizer of the embedded tiny models (no vocabulary files, nothing to download)."""

from __future__ import annotations

PAD, BOS, EOS = 0, 1, 2
OFFSET = 3
VOCAB_SIZE = 256 + OFFSET


class ByteTokenizer:
    pad_token_id = PAD
    bos_token_id = BOS
    eos_token_id = EOS
    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return [b + OFFSET for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - OFFSET for i in ids if int(i) >= OFFSET).decode("utf-8", "replace")

    def prompt(self, instruction: str) -> list[int]:
        """``<bos> instruction \\n`` — the answer follows, ended by ``<eos>``."""
        return [BOS, *self.encode(instruction + "\n")]
