"""The core datum: one instruction-tuning sample."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One instruction-tuning sample. ``instruction`` is the user turn (no image placeholder, no
    system line), ``answer`` the target, ``image`` an absolute path or None."""

    instruction: str
    answer: str
    task: int
    image: str | None = None
    id: str = ""
