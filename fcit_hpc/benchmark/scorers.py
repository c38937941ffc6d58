"""Per-dataset scorers, as in the published evaluation: exact match, the FigureQA/DVQA substring
rule, grounding accuracy at IoU > 0.5, and caption quality (BLEU-1..4, METEOR, ROUGE-L, CIDEr via
pycocoevalcap, mean x 100). Each returns a score in [0, 100] for a list of predictions."""

from __future__ import annotations

import re

_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _norm(s: str) -> str:
    return " ".join(str(s).strip().lower().split()).rstrip(".")


def exact_match(preds: list[str], answers: list[str]) -> float:
    """Case-insensitive exact match (whitespace and a final period ignored)."""
    return _mean([_norm(p) == _norm(a) for p, a in zip(preds, answers, strict=True)])


def substring_match(preds: list[str], answers: list[str]) -> float:
    """Correct when the (non-empty) prediction is a substring of the answer, case-insensitive."""
    return _mean(
        [bool(_norm(p)) and _norm(p) in _norm(a) for p, a in zip(preds, answers, strict=True)]
    )


def parse_box(text: str, width: float | None = None, height: float | None = None):
    """[x1, y1, x2, y2] from free text: brackets or not, commas or spaces; pixel coordinates are
    normalised by (width, height) when any value exceeds 1. None when fewer than 4 numbers."""
    nums = [float(x) for x in _NUM.findall(str(text))]
    if len(nums) < 4:
        return None
    box = nums[:4]
    if max(box) > 1.0:
        if not width or not height:
            return None
        box = [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
    x1, y1, x2, y2 = box
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(preds: list[str], answers: list[str], sizes=None) -> float:
    """Accuracy at IoU > 0.5; ``sizes`` gives (width, height) per sample for pixel predictions."""
    hits = []
    for i, (p, a) in enumerate(zip(preds, answers, strict=True)):
        w, h = sizes[i] if sizes else (None, None)
        pb, ab = parse_box(p, w, h), parse_box(a, w, h)
        hits.append(pb is not None and ab is not None and iou(pb, ab) > 0.5)
    return _mean(hits)


def caption_scores(
    preds: list[str], answers: list[list[str]] | list[str], meteor: str = "java"
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap; METEOR needs Java) and their mean, x100.
    ``meteor``: "java" (the paper's metric) or "skip" (no METEOR: the mean of the other six)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [_tok(r) for r in (a if isinstance(a, list) else [a])] for i, a in enumerate(answers)}
    res = {i: [_tok(p) or "empty"] for i, p in enumerate(preds)}
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = 100 * float(b)
    if meteor == "java":
        out["METEOR"] = 100 * float(_meteor().compute_score(gts, res)[0])
    out["ROUGE-L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    out["mean"] = sum(out.values()) / len(out)
    return out


_METEOR = None


def _meteor():
    """One METEOR (Java) process per Python process, started on first use, closed at exit."""
    global _METEOR
    if _METEOR is None:
        import atexit

        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
        atexit.register(_close_meteor, _METEOR)
    return _METEOR


def _close_meteor(m) -> None:
    proc = getattr(m, "meteor_p", None)
    if proc is not None:
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001 - already closed
                pass
        proc.kill()
        proc.wait()


def _tok(s: str) -> str:
    """Lower-case and split punctuation off (what the PTB tokenizer does for these metrics)."""
    return " ".join(re.findall(r"[a-z0-9]+", str(s).lower()))


def _mean(xs) -> float:
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else 0.0


def score(
    scorer: str, preds: list[str], answers: list, sizes=None, *, meteor: str = "java"
) -> float:
    """A dataset's score in [0, 100]; ``meteor``: config ``eval.caption_meteor`` (captions)."""
    if scorer == "exact":
        return exact_match(preds, answers)
    if scorer == "substring":
        return substring_match(preds, answers)
    if scorer == "iou":
        return grounding_accuracy(preds, answers, sizes)
    if scorer == "caption":
        return caption_scores(preds, answers, meteor)["mean"]
    raise ValueError(f"unknown scorer {scorer!r}")


# What each scorer needs beyond the core install: (import name, package, what provides it)
def missing_dependencies(scorer: str, meteor: str = "java") -> list[str]:
    """The dependencies ``scorer`` lacks on this machine, each as a phrase naming the package
    (empty: it can run). Caption scoring needs pycocoevalcap, and Java for METEOR unless
    ``meteor`` is "skip"."""
    import importlib.util
    import shutil

    if scorer != "caption":
        return []
    out = []
    if importlib.util.find_spec("pycocoevalcap") is None:
        out.append("the Python package pycocoevalcap (pip install pycocoevalcap)")
    if meteor == "java" and shutil.which("java") is None:
        out.append(
            "Java (a `java` on PATH) for METEOR; or set eval.caption_meteor=skip to score "
            "captions without METEOR"
        )
    return out


def check_scorers(b, ev) -> None:
    """Before any training: every scorer the datasets of all stages of benchmark section ``b``
    need can run here (with eval section ``ev``: enabled, caption_meteor), or a DependencyError
    (exit 2) naming the dataset and the package."""
    from fcit_hpc.benchmark.registry import DATASETS, stage_datasets
    from fcit_hpc.errors import DependencyError

    if b.suite == "synthetic":  # the embedded suite is scored by exact match
        return
    meteor = ev.caption_meteor
    names = dict.fromkeys(n for st in stage_datasets(b.setting, b.capability_order) for n in st)
    for name in names:
        missing = missing_dependencies(DATASETS[name].scorer, meteor) if ev.enabled else []
        if missing:
            raise DependencyError(
                f"benchmark dataset {name} ({b.suite} suite, {DATASETS[name].scorer} scorer) "
                f"needs {' and '.join(missing)}"
            )
