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

    def pixels(self, path: str | None):
        """[3, size, size] pixel values of the embedded LLaVA models."""
        from fcit_hpc.data.images import load_image

        return load_image(path, self.image_size)


class HFTokenizer:
    """A Hugging Face tokenizer behind the interface above (text models from a local path).

    The prompt is the model's chat template for one user turn when it has one, else
    ``instruction + "\\n"``.
    """

    num_image_tokens = 0
    image_size = 0
    image_token_id = -1

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


# LLaVA-1.5's conversation format, for a checkpoint whose processor has no chat template
LLAVA15_TEMPLATE = "USER: <image>\n{instruction} ASSISTANT:"


class HFLlavaTokenizer(HFTokenizer):
    """A Hugging Face LLaVA checkpoint's own processor behind the tokenizer interface: its chat
    template (LLaVA-1.5: ``USER: <image>\\n… ASSISTANT:``), its image token expanded to the number
    of image features the model inserts, and its image processor, after padding the image to a
    square with the processor's mean colour (LLaVA-1.5's ``image_aspect_ratio: pad``)."""

    def __init__(self, processor, path: str = ""):
        super().__init__(processor.tokenizer)
        self.processor = processor
        self.image_processor = processor.image_processor
        self.image_token = getattr(processor, "image_token", "<image>")
        ids = self.tok.encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{path}: the tokenizer has no single token for {self.image_token!r}")
        self.image_token_id = ids[0]
        from PIL import Image

        probe = processor(
            text=self.image_token, images=Image.new("RGB", (8, 8)), return_tensors="pt"
        )
        self.num_image_tokens = int((probe["input_ids"][0] == self.image_token_id).sum())
        self.pixel_shape = tuple(probe["pixel_values"].shape[1:])  # [3, H, W]
        self.image_size = int(self.pixel_shape[-1])
        mean = getattr(self.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self.fill = tuple(int(round(255 * m)) for m in mean)

    def _prompt_text(self, instruction: str) -> str:
        tmpl = getattr(self.processor, "chat_template", None)
        if tmpl:
            msgs = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": instruction}],
                }
            ]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        return LLAVA15_TEMPLATE.format(instruction=instruction)

    def prompt(self, instruction: str) -> list[int]:
        """The chat prompt with its image placeholder expanded, as the processor does it."""
        text = self._prompt_text(instruction)
        text = text.replace(self.image_token, self.image_token * self.num_image_tokens)
        return [int(i) for i in self.tok(text)["input_ids"]]

    def pixels(self, path: str | None):
        """[3, H, W] float32 pixel values of one image (a mean-colour square without one)."""
        from PIL import Image

        from fcit_hpc.data.images import open_rgb

        img = Image.new("RGB", (8, 8), self.fill) if path is None else open_rgb(path)
        w, h = img.size
        if w != h:  # pad to a square with the mean colour, centred (LLaVA-1.5's expand2square)
            side = max(w, h)
            sq = Image.new("RGB", (side, side), self.fill)
            sq.paste(img, ((side - w) // 2, (side - h) // 2))
            img = sq
        out = self.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
        return out.float()


Tokenizer = ByteTokenizer | HFTokenizer  # what a run's model speaks (HFLlavaTokenizer is an HF one)
