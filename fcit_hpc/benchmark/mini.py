"""fcit-mini: the embedded offline benchmark. 12 procedurally generated tasks, one per FCIT
dataset, mirroring its instruction style and answer form, with small rendered images.

Written as raw per-dataset LLaVA files (``RAW/<Dataset>/{train,test}.json`` + ``RAW/images``),
then partitioned by ``fcit data prepare`` into the release tree (the cache folder plays
``FCIT_data``), so the release loader path runs.
CLEVR-Math and super-CLEVR share one scene renderer (their images look alike) but differ in
instructions; FigureQA and DVQA share the bar-chart renderer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fcit_hpc.benchmark.layout import TREE_VERSION
from fcit_hpc.benchmark.llava_json import to_conversation, to_test, write_json
from fcit_hpc.benchmark.registry import DATASETS
from fcit_hpc.cache import recipe_hash as _recipe_hash
from fcit_hpc.data.sample import Sample

RECIPE_VERSION = 1
SIZE = 32
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
SHAPES = ("square", "circle", "triangle")
WORDS = ("maple", "river", "stone", "cloud", "ember", "frost", "lotus", "amber", "cedar", "delta")
FRUITS = ("apples", "pears", "plums", "figs")
NAMES = ("Tom", "Ana", "Lee", "Mia")


def _canvas(bg=(245, 245, 245)):
    img = Image.new("RGB", (SIZE, SIZE), bg)
    return img, ImageDraw.Draw(img)


def _shape(d: ImageDraw.ImageDraw, kind: str, box, color) -> None:
    x1, y1, x2, y2 = box
    if kind == "square":
        d.rectangle(box, fill=color)
    elif kind == "circle":
        d.ellipse(box, fill=color)
    else:
        d.polygon([((x1 + x2) / 2, y1), (x1, y2), (x2, y2)], fill=color)


def _scene(r: np.random.Generator, n: int):
    """CLEVR-like scene: n objects (shape, color, x) on a grey floor, left to right."""
    img, d = _canvas((170, 170, 170))
    xs = sorted(r.choice(np.arange(1, SIZE - 7, 5), size=n, replace=False).tolist())
    objs = []
    for x in xs:
        kind = SHAPES[int(r.integers(3))]
        color = list(COLORS)[int(r.integers(len(COLORS)))]
        y = int(r.integers(8, SIZE - 8))
        _shape(d, kind, (x, y, x + 5, y + 5), COLORS[color])
        objs.append((kind, color, x))
    return img, objs


def _bars(r: np.random.Generator, k: int = 4):
    img, d = _canvas()
    vals = r.choice(np.arange(1, 10), size=k, replace=False).tolist()
    names = list(COLORS)[:k]
    for i, (v, c) in enumerate(zip(vals, names, strict=True)):
        x = 3 + i * 7
        d.rectangle((x, SIZE - 2 - 3 * v, x + 5, SIZE - 2), fill=COLORS[c])
    return img, vals, names


# ------------------------------------------------------------------ one generator per dataset
def g_aokvqa(r):
    c = list(COLORS)[int(r.integers(4))]
    img, d = _canvas()
    _shape(d, SHAPES[int(r.integers(3))], (6, 6, 26, 26), COLORS[c])
    opts = ["red", "green", "blue", "yellow"]
    q = (
        f"Question: What color is the big object in the photo? Options: A. {opts[0]} "
        f"B. {opts[1]} C. {opts[2]} D. {opts[3]}. Answer with the option's letter."
    )
    return img, q, "ABCD"[opts.index(c)]


def g_iconqa(r):
    n = int(r.integers(1, 7))
    img, d = _canvas()
    cells = r.choice(16, size=n, replace=False)
    for cell in cells:
        x, y = 1 + (cell % 4) * 8, 1 + (cell // 4) * 8
        _shape(d, "circle", (x, y, x + 5, y + 5), COLORS["orange"])
    return img, "How many icons are shown in the picture? Count them and answer.", str(n)


def g_grounding(r):
    img, d = _canvas()
    c = list(COLORS)[int(r.integers(len(COLORS)))]
    w, h = int(r.integers(8, 16)), int(r.integers(8, 16))
    x, y = int(r.integers(0, SIZE - w)), int(r.integers(0, SIZE - h))
    d.rectangle((x, y, x + w - 1, y + h - 1), fill=COLORS[c])
    box = [
        round(x / SIZE, 2),
        round(y / SIZE, 2),
        round((x + w) / SIZE, 2),
        round((y + h) / SIZE, 2),
    ]
    q = (
        "Please provide the bounding box coordinate of the region this sentence describes: "
        f"the {c} block."
    )
    return img, q, json.dumps(box).replace(" ", "")


def g_imagenet_r(r):
    kind = SHAPES[int(r.integers(3))]
    img, d = _canvas(tuple(int(v) for v in r.integers(180, 255, 3)))
    _shape(d, kind, (5, 5, 27, 27), tuple(int(v) for v in r.integers(0, 120, 3)))
    return img, "What is the object in the image? Answer with the class name.", kind


def g_arxivqa(r):
    img, d = _canvas()
    slopes = r.choice([1, 2, 3, 4], size=3, replace=False).tolist()
    cols = ["red", "green", "blue"]
    for s, c in zip(slopes, cols, strict=True):
        d.line([(2, SIZE - 3), (SIZE - 3, SIZE - 3 - 7 * s)], fill=COLORS[c], width=1)
    best = cols[int(np.argmax(slopes))]
    q = (
        "Based on the figure, which curve rises fastest? A. the red curve B. the green curve "
        "C. the blue curve. Answer with the letter."
    )
    return img, q, "ABC"[cols.index(best)]


def g_figureqa(r):
    img, vals, names = _bars(r)
    c = names[int(r.integers(4))]
    ans = "yes" if vals[names.index(c)] == max(vals) else "no"
    return img, f"Is {c.capitalize()} the maximum in this bar chart? Answer yes or no.", ans


def g_dvqa(r):
    img, vals, names = _bars(r)
    c = names[int(r.integers(4))]
    return img, f"What is the value of the {c} bar in the chart?", str(vals[names.index(c)])


def g_clevr_math(r):
    img, objs = _scene(r, int(r.integers(3, 6)))
    c = objs[int(r.integers(len(objs)))][1]
    left = sum(1 for _, col, _ in objs if col != c)
    return img, f"Subtract all {c} objects. How many objects are left?", str(left)


def g_super_clevr(r):
    img, objs = _scene(r, int(r.integers(3, 6)))
    kind, color, _ = objs[0]
    return img, f"What is the color of the leftmost {kind} in the scene?", color


def g_tabmwp(r):
    img, d = _canvas((255, 255, 255))
    a, b = int(r.integers(1, 9)), int(r.integers(1, 9))
    d.text((1, 2), f"M {a}", fill=(0, 0, 0))
    d.text((1, 16), f"T {b}", fill=(0, 0, 0))
    name, fruit = NAMES[int(r.integers(4))], FRUITS[int(r.integers(4))]
    q = (
        f"Read the table. {name} bought {fruit} on Monday (M) and Tuesday (T). "
        f"How many {fruit} did {name} buy in total?"
    )
    return img, q, str(a + b)


def g_flickr30k(r):
    img, d = _canvas()
    c1, c2 = r.choice(list(COLORS), size=2, replace=False).tolist()
    k1, k2 = SHAPES[int(r.integers(3))], SHAPES[int(r.integers(3))]
    _shape(d, k1, (8, 1, 23, 14), COLORS[c1])
    _shape(d, k2, (8, 17, 23, 30), COLORS[c2])
    return (
        img,
        "Provide a one-sentence caption for the provided image.",
        f"a {c1} {k1} above a {c2} {k2}",
    )


def g_ocrvqa(r):
    img, d = _canvas((250, 240, 220))
    w = WORDS[int(r.integers(len(WORDS)))]
    d.text((1, 10), w.upper()[:5], fill=(20, 20, 20))
    return img, "What is the title of this book?", w[:5]


GENERATORS = {
    "AOKVQA": g_aokvqa,
    "IconQA": g_iconqa,
    "Grounding": g_grounding,
    "ImageNet-R": g_imagenet_r,
    "ArxivQA": g_arxivqa,
    "FigureQA": g_figureqa,
    "DVQA": g_dvqa,
    "CLEVR-Math": g_clevr_math,
    "super-CLEVR": g_super_clevr,
    "TabMWP": g_tabmwp,
    "Flickr30k": g_flickr30k,
    "OCRVQA": g_ocrvqa,
}
assert set(GENERATORS) == set(DATASETS)


def recipe_hash(train: int, test: int, seed: int) -> str:
    """Names fcit-mini's cache folder: the recipe, this module's source and the version of the tree
    prepare writes there (a cache written with other folder names is never read)."""
    key = f"{RECIPE_VERSION}|{train}|{test}|{seed}|tree{TREE_VERSION}|"
    return _recipe_hash(key.encode(), __file__)


def write_raw(raw: str | Path, train: int, test: int, seed: int) -> Path:
    """Write fcit-mini as raw per-dataset LLaVA files under ``raw``. Deterministic from the seed;
    skipped when the same recipe is already there."""
    raw = Path(raw)
    stamp = raw / "fcit_mini.json"
    h = recipe_hash(train, test, seed)
    if stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == h:
        return raw
    for t, (name, gen) in enumerate(GENERATORS.items()):
        for split, n in (("train", train), ("test", test)):
            rng = np.random.default_rng([seed, t, 0 if split == "train" else 1])
            recs = []
            for i in range(n):
                img, q, a = gen(rng)
                rel = f"images/{name}/{split}_{i:05d}.png"
                (raw / rel).parent.mkdir(parents=True, exist_ok=True)
                img.save(raw / rel)
                s = Sample(q, a, t, None, f"{name}-{split}-{i}")
                recs.append(to_conversation(s, rel) if split == "train" else to_test(s, rel))
            write_json(raw / name / f"{split}.json", recs)
    stamp.write_text(json.dumps({"recipe": h, "train": train, "test": test, "seed": seed}))
    return raw
