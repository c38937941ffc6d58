"""The cache folder of generated artefacts (fcit-mini, non-default embedded models) and the hash
that names a recipe's folder there (the recipe's key plus the generating module's source)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """``$FCIT_CACHE``, or ``~/.cache/fcit_hpc``."""
    return Path(os.environ.get("FCIT_CACHE", Path.home() / ".cache" / "fcit_hpc"))


def recipe_hash(key: bytes, source: str | Path) -> str:
    """16 hex digits of sha256(key + the bytes of ``source``): a new folder whenever the recipe
    or the code that generates it changes."""
    return hashlib.sha256(key + Path(source).read_bytes()).hexdigest()[:16]
