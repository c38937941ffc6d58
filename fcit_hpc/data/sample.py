"""The core datum: one instruction-tuning sample."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass


@dataclass(frozen=True)
class Sample:
    """One instruction-tuning sample. ``instruction`` is the user turn (no image placeholder, no
    system line), ``answer`` the target, ``image`` an absolute path or None, ``id`` the record's id
    (a test question's ``question_id`` as released: string or integer)."""

    instruction: str
    answer: str
    task: int
    image: str | None = None
    _: KW_ONLY
    id: str | int = ""
