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


class HFTokenizer:
    """A Hugging Face tokenizer behind the interface above (text models from a local path).

    The prompt is the model's chat template for one user turn when it has one, else
    ``instruction + "\\n"``.
    """

    num_image_tokens = 0
    image_size = 0

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos_token_id = tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def prompt(self, instruction: str) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(
                [{"role": "user", "content": instruction}],
                add_generation_prompt=True,
                tokenize=True,
            )
            if hasattr(ids, "keys"):  # a BatchEncoding in recent transformers
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return self.encode(instruction + "\n")
