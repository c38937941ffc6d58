"""Readers and writers of the LLaVA formats: training conversations and test questions.

Training: a JSON list of ``{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``; a multi-turn record gives one sample per
(human, gpt) turn pair, each asked about the record's image on its own (the models here take
single-turn prompts). Test: a JSON list of ``{"question_id", "image", "text", "answer"}``
(``question_id`` may be ``id`` or absent: then the record index). Every error names the file and the
record index.
"""

from __future__ import annotations

import json
from pathlib import Path

from fcit_hpc.data.sample import Sample
from fcit_hpc.errors import DataError

IMAGE_TOKEN = "<image>"


def user_instruction(text: str) -> str:
    """The user's instruction: the image placeholder and a system line removed, whitespace
    collapsed (what a client's identity token is computed from)."""
    lines = [
        ln
        for ln in str(text).replace(IMAGE_TOKEN, "").splitlines()
        if not ln.lower().startswith("system:")
    ]
    return " ".join(" ".join(lines).split())


def _read_list(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the file ({e})") from None
    try:
        data = json.loads(text)
    except ValueError as e:  # also an integer of more digits than Python converts
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _image(path: Path, i: int, rec: dict, image_root: Path | None, *, check: bool) -> str | None:
    img = rec.get("image")
    if img in (None, ""):
        return None
    if not isinstance(img, str):
        raise DataError(f"{path}: record {i}: 'image' must be a string")
    full = Path(img) if Path(img).is_absolute() else (image_root or path.parent) / img
    try:
        found = not check or full.is_file()
    except (OSError, ValueError) as e:  # e.g. a name too long for the file system
        raise DataError(f"{path}: record {i}: bad image path {_short(img)} ({e})") from None
    if not found:
        raise DataError(f"{path}: record {i}: image not found: {full}")
    return str(full)


def _short(text: str, limit: int = 60) -> str:
    """``repr`` of a string for a message, cut to ``limit`` characters."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _turn_pairs(path: Path, i: int, conv) -> list[tuple[str, str]]:
    """(human, gpt) values of a conversation, in order; turns must alternate, human first."""
    if (
        not isinstance(conv, list)
        or len(conv) < 2
        or not all(isinstance(c, dict) and "value" in c for c in conv)
    ):
        raise DataError(f"{path}: record {i}: 'conversations' must list human and gpt turns")
    pairs, question = [], None
    for k, turn in enumerate(conv):
        role = turn.get("from")
        if role == "human" and question is None:
            question = str(turn["value"])
        elif role == "gpt" and question is not None:
            pairs.append((question, str(turn["value"])))
            question = None
        else:
            want = "human" if question is None else "gpt"
            raise DataError(
                f"{path}: record {i}: turn {k}: expected a {want} turn, got {role!r} "
                "(turns alternate human, gpt)"
            )
    if question is not None:
        raise DataError(f"{path}: record {i}: the last human turn has no gpt answer")
    return pairs


def load_conversations(
    path: str | Path,
    task: int,
    image_root: str | Path | None = None,
    check_images: bool = True,
    *,
    allow_empty: bool = False,
) -> list[Sample]:
    path = Path(path)
    data = _read_list(path)
    if not data and not allow_empty:
        raise DataError(f"{path}: empty client file (no records)")
    root = Path(image_root) if image_root else None
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i}: expected an object")
        if "conversations" not in rec:
            raise DataError(f"{path}: record {i}: missing 'conversations'")
        pairs = _turn_pairs(path, i, rec["conversations"])
        image = _image(path, i, rec, root, check=check_images)
        rid = str(rec.get("id", i))
        out += [Sample(user_instruction(q), a, task, image, id=rid) for q, a in pairs]
    return out


def load_test(
    path: str | Path, task: int, image_root: str | Path | None = None, check_images: bool = True
) -> list[Sample]:
    path = Path(path)
    data = _read_list(path)
    root = Path(image_root) if image_root else None
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i}: expected an object")
        for key in ("text", "answer"):
            if key not in rec:
                raise DataError(f"{path}: record {i}: missing '{key}'")
        qid = rec.get("question_id", rec.get("id", i))
        if isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise DataError(f"{path}: record {i}: 'question_id' must be a string or an integer")
        ans = rec["answer"]
        out.append(
            Sample(
                user_instruction(rec["text"]),
                json.dumps(ans) if isinstance(ans, list) else str(ans),
                task,
                _image(path, i, rec, root, check=check_images),
                id=qid,
            )
        )
    return out


def to_conversation(s: Sample, image_rel: str | None) -> dict:
    rec = {
        "id": s.id,
        "conversations": [
            {"from": "human", "value": (IMAGE_TOKEN + "\n" if image_rel else "") + s.instruction},
            {"from": "gpt", "value": s.answer},
        ],
    }
    if image_rel:
        rec["image"] = image_rel
    return rec


def to_test(s: Sample, image_rel: str | None) -> dict:
    rec = {"question_id": s.id, "text": s.instruction, "answer": s.answer}
    if image_rel:
        rec["image"] = image_rel
    return rec


def write_json(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=0, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
