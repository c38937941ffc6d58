"""Byte-level tokenizer of the embedded tiny models (no vocabulary files, nothing to download)."""

from __future__ import annotations

PAD, BOS, EOS, IMAGE = 0, 1, 2, 3
OFFSET = 4
VOCAB_SIZE = 256 + OFFSET


class ByteTokenizer:
    pad_token_id = PAD
    bos_token_id = BOS
    eos_token_id = EOS
    image_token_id = IMAGE
    vocab_size = VOCAB_SIZE

    def __init__(self, num_image_tokens: int = 0, image_size: int = 0):
        self.num_image_tokens = num_image_tokens  # > 0: a multimodal (LLaVA) model
        self.image_size = image_size

    def encode(self, text: str) -> list[int]:
        return [b + OFFSET for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - OFFSET for i in ids if int(i) >= OFFSET).decode("utf-8", "replace")

    def prompt(self, instruction: str) -> list[int]:
        """``<bos> [<image> x N] instruction \\n`` — the answer follows, ended by ``<eos>``."""
        return [BOS, *([IMAGE] * self.num_image_tokens), *self.encode(instruction + "\n")]
