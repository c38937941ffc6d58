"""Embedded synthetic text suite: 8 instruction tasks, deterministic from a seed.

Each task has its own instruction template, so tasks are told apart by instruction text (what the
identity tokens of DISCO are computed from), and a deterministic answer, so exact match scores it.
"""

from __future__ import annotations

import numpy as np

from fcit_hpc.data.sample import Sample

WORDS = (
    "kelp moss tiger river stone cloud maple ember frost lotus amber cedar delta falcon harbor "
    "ivory jungle kettle lemon meadow nectar orbit pepper quartz raven saddle timber umber velvet "
    "willow yarrow zephyr basil cobalt dune"
).split()


def _add(r: np.random.Generator):
    a, b = int(r.integers(0, 50)), int(r.integers(0, 50))
    return f"Add the two numbers: {a} + {b} =", str(a + b)


def _reverse(r):
    w = WORDS[int(r.integers(len(WORDS)))]
    return f"Reverse the letters of the word: {w}", w[::-1]


def _upper(r):
    w = WORDS[int(r.integers(len(WORDS)))]
    return f"Write this word in capital letters: {w}", w.upper()


def _count(r):
    w = WORDS[int(r.integers(len(WORDS)))] + WORDS[int(r.integers(len(WORDS)))]
    return f"How many times does the letter e appear in: {w}", str(w.count("e"))


def _next(r):
    a = int(r.integers(0, 98))
    return f"Which number comes right after {a}?", str(a + 1)


def _sort(r):
    d = [int(x) for x in r.integers(0, 10, size=3)]
    return f"Sort these digits in ascending order: {d[0]} {d[1]} {d[2]}", "".join(
        str(x) for x in sorted(d)
    )


def _parity(r):
    a = int(r.integers(0, 100))
    return f"Is {a} an even or an odd number?", "even" if a % 2 == 0 else "odd"


def _first(r):
    w = WORDS[int(r.integers(len(WORDS)))]
    return f"What is the first letter of the word: {w}", w[0]


TASKS = (
    ("add", _add),
    ("reverse", _reverse),
    ("upper", _upper),
    ("count", _count),
    ("next", _next),
    ("sort", _sort),
    ("parity", _parity),
    ("first", _first),
)
TASK_NAMES = tuple(name for name, _ in TASKS)


def make_split(task: int, n: int, seed: int, split: str) -> list[Sample]:
    """``n`` samples of ``task``; train and test draw from disjoint random streams."""
    salt = {"train": 0, "test": 1}[split]
    rng = np.random.default_rng([seed, task, salt])
    gen = TASKS[task][1]
    return [Sample(*gen(rng), task=task) for _ in range(n)]
