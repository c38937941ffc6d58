"""fcit-mini: the embedded offline benchmark. 12 procedurally generated tasks, one per FCIT
dataset, mirroring its instruction style and answer form, with small rendered images.

Written as raw per-dataset LLaVA files (``RAW/<Dataset>/{train,test}.json`` + ``RAW/images``),
then partitioned by ``fcit data prepare`` into the release tree (the cache folder plays
``FCIT_data``), so the release loader path runs.

Instructions vary as in the real datasets: every task draws one of 9-10 question templates per
sample (uniformly, from the sample's rng) and fills it with varying content (colours, shapes,
names, numbers, option lists), so a client's identity token is no longer its task label. The
templates follow the released data's style: LLaVA suffixes ("Answer the question using a single
word or phrase.", "Answer with the option's letter from the given choices directly."), the
RefCOCO grounding prompt and its paraphrases, LLaVA's brief-caption prompts for Flickr30k,
FigureQA's and DVQA's question families, CLEVR-Math's "Subtract all ... How many objects are
left?". Tasks overlap where the real ones do: AOKVQA and ImageNet-R are multiple choice, IconQA
and ArxivQA partly or wholly (shuffled options, 2-4 of them; the answer is the correct option's
letter); ArxivQA, FigureQA and DVQA share chart phrasing ("According to the chart ..."); CLEVR-Math
and super-CLEVR share one scene renderer and scene words (objects, cube/block, sphere/ball, cone,
"in the scene"); FigureQA and DVQA share the bar-chart renderer. Answers keep each task's form
(letter, count, box, yes/no, value, word, caption) and every instruction with its answer fits the
default 160-byte text budget, so truncation never drops the question. Each generator returns
(image, question, answer, meta); ``meta`` names the template drawn (``template``), the question's
kind and, for multiple choice, the options and the correct one (tests use it).
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

RECIPE_VERSION = 2
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
EXTRA_SHAPES = ("star", "hexagon", "heart")  # distractor class names only, never drawn
# CLEVR-like names of the rendered shapes: the canonical word (answers) and its synonyms
SCENE_WORDS = {"square": ("cube", "block"), "circle": ("sphere", "ball"), "triangle": ("cone",)}
WORDS = ("maple", "river", "stone", "cloud", "ember", "frost", "lotus", "amber", "cedar", "delta")
FRUITS = ("apples", "pears", "plums", "figs", "lemons", "peaches", "limes", "kiwis")
NAMES = ("Tom", "Ana", "Lee", "Mia", "Sam", "Eva", "Max", "Zoe")
DAYS = {"M": "Monday", "T": "Tuesday"}
ORDINALS = ("first", "second", "third", "fourth")
LETTERS = "ABCDEF"
SHORT = "Answer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."


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


def _pick(r: np.random.Generator, seq):
    return seq[int(r.integers(len(seq)))]


def _template(r: np.random.Generator, templates) -> tuple[int, object]:
    """One of ``templates``, uniformly: (its index, the template)."""
    i = int(r.integers(len(templates)))
    return i, templates[i]


def _options(r: np.random.Generator, correct: str, pool, n: int, *, inline: bool = False):
    """``n`` options: ``correct`` and n - 1 other members of ``pool``, in a random order. Returns
    (the options' text, the correct letter, the options): one ``A. x`` line each, or one line
    ``Options: A. x B. y ...`` when ``inline``."""
    others = [p for p in pool if p != correct]
    picked = [others[int(i)] for i in r.choice(len(others), size=n - 1, replace=False)]
    opts = [[correct, *picked][int(i)] for i in r.permutation(n)]
    body = [f"{x}. {o}" for x, o in zip(LETTERS, opts, strict=False)]
    text = "Options: " + " ".join(body) if inline else "\n".join(body)
    return text, LETTERS[opts.index(correct)], opts


def _mc(i, kind, question, options) -> tuple[str, str, dict]:
    text, letter, opts = options
    meta = {"template": i, "kind": kind, "options": opts, "truth": opts[LETTERS.index(letter)]}
    return f"{question}\n{text}\n{MC}", letter, meta


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


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


def _scene_word(r: np.random.Generator, kind: str, plural: bool = False) -> str:
    w = _pick(r, SCENE_WORDS[kind])
    return w + "s" if plural else w


def _bars(r: np.random.Generator, k: int = 4):
    img, d = _canvas()
    vals = r.choice(np.arange(1, 10), size=k, replace=False).tolist()
    names = list(COLORS)[:k]
    for i, (v, c) in enumerate(zip(vals, names, strict=True)):
        x = 3 + i * 7
        d.rectangle((x, SIZE - 2 - 3 * v, x + 5, SIZE - 2), fill=COLORS[c])
    return img, vals, names


# ------------------------------------------------------------------ one generator per dataset
AOKVQA_Q = (
    ("color", "What color is the big object in the photo?"),
    ("color", "What is the color of the object shown?"),
    ("color", "Which color best describes the object?"),
    ("color", "The object in the image is what color?"),
    ("color", "What color would you call this object?"),
    ("shape", "What shape is the object in the photo?"),
    ("shape", "What is the shape of the large object?"),
    ("shape", "Which shape best describes the object?"),
    ("shape", "The object in the image looks like a what?"),
    ("shape", "What kind of shape is pictured here?"),
)


def g_aokvqa(r):
    """A-OKVQA: a question with 4 shuffled options, answered by the letter."""
    c, kind = _pick(r, list(COLORS)), _pick(r, SHAPES)
    img, d = _canvas()
    _shape(d, kind, (6, 6, 26, 26), COLORS[c])
    i, (asked, q) = _template(r, AOKVQA_Q)
    truth, pool = (c, list(COLORS)) if asked == "color" else (kind, SHAPES + EXTRA_SHAPES)
    q, a, meta = _mc(i, asked, q, _options(r, truth, pool, 4))
    return img, q, a, meta


ICONQA_FILL = (
    "How many {things} are there?",
    "How many {things} are on the frame?",
    "How many {color} {things} are there?",
    "Count the {things}. How many are there?",
    "What is the number of {things} shown?",
)
ICONQA_CHOOSE = (
    ("count", "How many {things} are there?"),
    ("parity", "Is the number of {things} even or odd?"),
    ("more", "Are there more than {k} {things}?"),
    ("fewer", "Are there fewer than {k} {things}?"),
)


def g_iconqa(r):
    """IconQA: icons on a 4 x 4 frame; fill-in-the-blank (the count) or choose-txt (a letter)."""
    n = int(r.integers(1, 7))
    kind, c = _pick(r, SHAPES), _pick(r, list(COLORS))
    img, d = _canvas()
    for cell in r.choice(16, size=n, replace=False):
        x, y = 1 + (cell % 4) * 8, 1 + (cell // 4) * 8
        _shape(d, kind, (x, y, x + 5, y + 5), COLORS[c])
    i, t = _template(r, ICONQA_FILL + ICONQA_CHOOSE)
    if isinstance(t, str):
        q = t.format(things=kind + "s", color=c)
        return img, f"{q}\n{SHORT}", str(n), {"template": i, "kind": "count", "count": n}
    asked, t = t
    k = int(r.integers(1, 7))
    q = t.format(things=kind + "s", k=k)
    if asked == "count":
        opts = _options(r, str(n), [str(v) for v in range(1, 10)], int(r.integers(2, 5)))
    elif asked == "parity":
        opts = _options(r, "even" if n % 2 == 0 else "odd", ["even", "odd"], 2)
    else:
        yes = n > k if asked == "more" else n < k
        opts = _options(r, "yes" if yes else "no", ["yes", "no"], 2)
    q, a, meta = _mc(i, asked, q, opts)
    meta.update(count=n, k=k)
    return img, q, a, meta


GROUNDING_Q = (
    "Please provide the bounding box coordinate of the region this sentence describes: {ref}.",
    "Locate {ref} in the image and give its bounding box coordinates.",
    "What are the bounding box coordinates of {ref}?",
    "Give the bounding box of the region described as: {ref}.",
    "Find {ref} and output its bounding box as [x1,y1,x2,y2].",
    "Where is {ref}? Answer with the bounding box coordinates.",
    "Output the bounding box coordinate of {ref}.",
    "Detect {ref} in this image. Provide the box coordinates.",
    'Which region does the phrase "{ref}" describe? Give its bounding box.',
)
GROUNDING_REF = ("the {c} block", "the {c} rectangle", "{c} box", "the {c} patch", "{c} rectangle")


def g_grounding(r):
    """RefCOCO-like: the normalised box of the one coloured rectangle."""
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
    i, t = _template(r, GROUNDING_Q)
    q = t.format(ref=_pick(r, GROUNDING_REF).format(c=c))
    return img, q, json.dumps(box).replace(" ", ""), {"template": i, "kind": "box"}


IMAGENET_R_Q = (
    "What is the object in the image?",
    "What object is shown in this picture?",
    "Which category does the object belong to?",
    "What is depicted in this rendition?",
    "What does this drawing show?",
    "Identify the object in the artwork.",
    "This image is a rendition of which object?",
    "What is the main subject of this image?",
    "Which class best describes the image?",
)


def g_imagenet_r(r):
    """ImageNet-R, asked as in the FCIT release: 4 shuffled class options, answered by letter."""
    kind = SHAPES[int(r.integers(3))]
    img, d = _canvas(tuple(int(v) for v in r.integers(180, 255, 3)))
    _shape(d, kind, (5, 5, 27, 27), tuple(int(v) for v in r.integers(0, 120, 3)))
    i, q = _template(r, IMAGENET_R_Q)
    q, a, meta = _mc(i, "class", q, _options(r, kind, SHAPES + EXTRA_SHAPES, 4))
    return img, q, a, meta


ARXIVQA_Q = (
    ("max", "Which curve rises fastest in the figure?"),
    ("max", "According to the figure, which is steepest?"),
    ("max", "According to the plot, which line ends highest?"),
    ("max", "Which plotted line has the largest slope?"),
    ("min", "Based on the plot, which curve grows slowest?"),
    ("min", "Which line in the figure ends lowest?"),
    ("min", "According to the chart, which is flattest?"),
    ("count", "How many curves are shown in the plot?"),
    ("count", "According to the figure, how many lines are plotted?"),
)


def g_arxivqa(r):
    """ArxivQA-like: 2-4 straight curves from one origin; options are colours (or counts)."""
    img, d = _canvas()
    k = int(r.integers(2, 5))
    slopes = r.choice([1, 2, 3, 4], size=k, replace=False).tolist()
    cols = ["red", "green", "blue", "purple"][:k]
    for s, c in zip(slopes, cols, strict=True):
        d.line([(2, SIZE - 3), (SIZE - 3, SIZE - 3 - 7 * s)], fill=COLORS[c], width=1)
    i, (asked, q) = _template(r, ARXIVQA_Q)
    inline = bool(r.integers(2))
    if asked == "count":
        opts = _options(r, str(k), [str(v) for v in range(1, 7)], 4, inline=inline)
    else:
        best = cols[int(np.argmax(slopes) if asked == "max" else np.argmin(slopes))]
        opts = _options(r, best, cols, k, inline=inline)
    q, a, meta = _mc(i, asked, q, opts)
    meta["slopes"] = dict(zip(cols, slopes, strict=True))
    return img, q, a, meta


FIGUREQA_Q = (
    ("max", "Is {X} the maximum?"),
    ("min", "Is {X} the minimum?"),
    ("gt", "Is {X} greater than {Y}?"),
    ("lt", "Is {X} less than {Y}?"),
    ("high_median", "Is {X} the high median?"),
    ("low_median", "Is {X} the low median?"),
    ("max", "Does {X} have the highest value?"),
    ("min", "Does {X} have the lowest value?"),
    ("gt", "According to the chart, is {X} greater than {Y}?"),
    ("max", "In this bar chart, is {X} the tallest bar?"),
)


def g_figureqa(r):
    """FigureQA: yes/no questions about a 4-bar chart (bars named by their colour)."""
    img, vals, names = _bars(r)
    x, y = (int(v) for v in r.choice(4, size=2, replace=False))
    i, (asked, t) = _template(r, FIGUREQA_Q)
    rank = sorted(vals)
    v = vals[x]
    yes = {
        "max": v == rank[-1],
        "min": v == rank[0],
        "gt": v > vals[y],
        "lt": v < vals[y],
        "high_median": v == rank[2],
        "low_median": v == rank[1],
    }[asked]
    q = t.format(X=names[x].capitalize(), Y=names[y].capitalize())
    return img, f"{q}\n{SHORT}", "yes" if yes else "no", {"template": i, "kind": asked}


DVQA_Q = (
    "What is the value of the {c} bar?",
    "What is the value of the largest bar?",
    "What is the value of the smallest bar?",
    "What is the sum of the values of {c} and {e}?",
    "What is the difference between the values of {c} and {e}?",
    "How many bars have values larger than {k}?",
    "How many bars have values smaller than {k}?",
    "What is the value of the {nth} bar from the left?",
    "According to the chart, what is the value of {c}?",
    "What is the difference between the largest and the smallest bar?",
)


def g_dvqa(r):
    """DVQA: numeric questions about the same bar charts as FigureQA."""
    img, vals, names = _bars(r)
    x, y = (int(v) for v in r.choice(4, size=2, replace=False))
    k = int(r.integers(1, 9))
    i, t = _template(r, DVQA_Q)
    ans = (
        vals[x],
        max(vals),
        min(vals),
        vals[x] + vals[y],
        abs(vals[x] - vals[y]),
        sum(v > k for v in vals),
        sum(v < k for v in vals),
        vals[x],
        vals[x],
        max(vals) - min(vals),
    )[i]
    q = t.format(c=names[x], e=names[y], k=k, nth=ORDINALS[x])
    return img, f"{q}\n{SHORT}", str(ans), {"template": i, "kind": "value"}


CLEVR_MATH_Q = (
    "Subtract all {color} objects. How many objects are left?",
    "Subtract all {shapes}. How many objects are left?",
    "Subtract all {color} {shapes}. How many objects are left?",
    "Subtract {k} {shapes}. How many objects are left?",
    "Add {k} {color} {shapes}. How many objects exist?",
    "Subtract all {shapes}. Subtract all {color} objects. How many objects are left?",
    "Subtract all {color} objects. Add {k} {shapes}. How many objects exist?",
    "How many objects are left in the scene after removing all {color} {shapes}?",
    "Remove all {shapes} from the scene. How many objects remain?",
    "Take away {k} objects from the scene. How many objects are left?",
)


def g_clevr_math(r):
    """CLEVR-Math: add/subtract objects of a scene, answer the count."""
    img, objs = _scene(r, int(r.integers(3, 6)))
    n = len(objs)
    kind, color, _ = objs[int(r.integers(n))]  # an object of the scene names the shape/colour
    shapes = _scene_word(r, kind, plural=True)
    i, t = _template(r, CLEVR_MATH_Q)
    n_kind = sum(o[0] == kind for o in objs)
    n_color = sum(o[1] == color for o in objs)
    n_both = sum(o[0] == kind and o[1] == color for o in objs)
    n_either = sum(o[0] == kind or o[1] == color for o in objs)
    k = int(r.integers(1, n_kind + 1)) if i == 3 else int(r.integers(1, n if i == 9 else 4))
    ans = (
        n - n_color,
        n - n_kind,
        n - n_both,
        n - k,
        n + k,
        n - n_either,
        n - n_color + k,
        n - n_both,
        n - n_kind,
        n - k,
    )[i]
    q = t.format(color=color, shapes=shapes, k=k)
    return img, f"{q}\n{SHORT}", str(ans), {"template": i, "kind": "count"}


SUPER_CLEVR_Q = (
    "What is the color of the leftmost {shape} in the scene?",
    "What color is the rightmost {shape}?",
    "What shape is the leftmost object in the scene?",
    "What is the shape of the rightmost object?",
    "What is the color of the object right of the leftmost {shape}?",
    "What color is the second object from the left in the scene?",
    "What shape is the {color} object furthest to the right?",
    "What color is the object left of the rightmost {color} {shape}?",
    "What is the color of the rightmost object in the scene?",
    "What shape is the second object from the right?",
)


def g_super_clevr(r):
    """super-CLEVR: the colour or the shape of an object picked by its place in the scene."""
    img, objs = _scene(r, int(r.integers(3, 6)))
    n = len(objs)
    i, t = _template(r, SUPER_CLEVR_Q)
    if i == 4:  # a shape whose leftmost instance is not the last object
        first = {}
        for j, o in enumerate(objs):
            first.setdefault(o[0], j)
        j = _pick(r, sorted(v for v in first.values() if v < n - 1))
    elif i == 7:  # the rightmost of its (colour, shape), not the first object
        last = {(o[1], o[0]): j for j, o in enumerate(objs)}
        j = _pick(r, sorted(v for v in last.values() if v > 0))
    else:
        j = int(r.integers(n))
    kind, color, _ = objs[j]
    of_kind = [o for o in objs if o[0] == kind]
    of_color = [o for o in objs if o[1] == color]
    answers = (  # an object's colour, or its shape by its canonical word
        lambda: of_kind[0][1],
        lambda: of_kind[-1][1],
        lambda: SCENE_WORDS[objs[0][0]][0],
        lambda: SCENE_WORDS[objs[-1][0]][0],
        lambda: objs[j + 1][1],
        lambda: objs[1][1],
        lambda: SCENE_WORDS[of_color[-1][0]][0],
        lambda: objs[j - 1][1],
        lambda: objs[-1][1],
        lambda: SCENE_WORDS[objs[-2][0]][0],
    )
    ans = answers[i]()
    q = t.format(shape=_scene_word(r, kind), color=color)
    return img, f"{q}\n{SHORT}", ans, {"template": i, "kind": "attribute"}


TABMWP_Q = (
    "Read the table. {name} bought {fruit} on Monday (M) and Tuesday (T). "
    "How many {fruit} did {name} buy in total?",
    "Look at the table. Then answer the question. How many {fruit} did {name} sell on {day}?",
    "{name} counted {fruit} each day. How many more were there on {big} than on {small}?",
    "The table shows how many {fruit} {name} ate on Monday (M) and Tuesday (T). What is the sum?",
    "Look at the table. What is the largest number in the table?",
    "Each of the {fruit} costs $2. How many dollars did {name} spend on {day}?",
    "{name} will buy as many {fruit} on Wednesday as on Tuesday. How many {fruit} in all three "
    "days?",
    "Look at the table. Then answer the question. What is the difference between the numbers for "
    "Monday and Tuesday?",
    "Read the table about {name}'s {fruit}. What is the smallest number in the table?",
    "Look at the table. If {name} gives away {k} of the {fruit} from {day}, how many are left "
    "from that day?",
)


def g_tabmwp(r):
    """TabMWP-like: a two-row table (M, T) and a word problem with a numeric answer."""
    img, d = _canvas((255, 255, 255))
    a, b = int(r.integers(1, 9)), int(r.integers(1, 9))
    d.text((1, 2), f"M {a}", fill=(0, 0, 0))
    d.text((1, 16), f"T {b}", fill=(0, 0, 0))
    name, fruit = _pick(r, NAMES), _pick(r, FRUITS)
    day = _pick(r, ("M", "T"))
    v = a if day == "M" else b
    i, t = _template(r, TABMWP_Q)
    k = int(r.integers(1, v + 1))
    big, small = ("Monday", "Tuesday") if a >= b else ("Tuesday", "Monday")
    ans = (a + b, v, abs(a - b), a + b, max(a, b), 2 * v, a + 2 * b, abs(a - b), min(a, b))
    ans = ans[i] if i < 9 else v - k
    q = t.format(name=name, fruit=fruit, day=DAYS[day], big=big, small=small, k=k)
    return img, q, str(ans), {"template": i, "kind": "number"}


FLICKR30K_Q = (
    "Provide a one-sentence caption for the provided image.",
    "Briefly describe the image.",
    "Write a short caption for this image.",
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Write a terse but informative summary of the picture.",
    "Render a clear and concise summary of the photo.",
)


def g_flickr30k(r):
    """Flickr30k: a caption of two stacked shapes, asked with LLaVA's brief-caption prompts."""
    img, d = _canvas()
    c1, c2 = r.choice(list(COLORS), size=2, replace=False).tolist()
    k1, k2 = SHAPES[int(r.integers(3))], SHAPES[int(r.integers(3))]
    _shape(d, k1, (8, 1, 23, 14), COLORS[c1])
    _shape(d, k2, (8, 17, 23, 30), COLORS[c2])
    i, q = _template(r, FLICKR30K_Q)
    caption = f"{_a(c1)} {c1} {k1} above {_a(c2)} {c2} {k2}"
    return img, q, caption, {"template": i, "kind": "caption"}


OCRVQA_Q = (
    ("title", "What is the title of this book?"),
    ("author", "Who wrote this book?"),
    ("author", "Who is the author of this book?"),
    ("title", "What is the name of this book?"),
    ("title?", "Is the title of this book {w}?"),
    ("author?", "Is this book written by {name}?"),
    ("title", "What word is printed at the top of the cover?"),
    ("author", "Whose name is on this book cover?"),
    ("title", "What title is shown on this book cover?"),
    ("author", "Which author's name appears on the cover?"),
)


def g_ocrvqa(r):
    """OCR-VQA: a book cover with a title and an author; who wrote it, what it is called."""
    img, d = _canvas((250, 240, 220))
    w, name = _pick(r, WORDS)[:5], _pick(r, NAMES)
    d.text((1, 3), w.upper(), fill=(20, 20, 20))
    d.text((1, 18), name.upper(), fill=(20, 20, 20))
    i, (asked, t) = _template(r, OCRVQA_Q)
    same = bool(r.integers(2))  # yes/no questions: the true title/author, or another one
    w2 = w if same else _pick(r, [x[:5] for x in WORDS if x[:5] != w])
    name2 = name if same else _pick(r, [x for x in NAMES if x != name])
    ans = {"title": w, "author": name}.get(asked, "yes" if same else "no")
    q = t.format(w=w2, name=name2)
    return img, f"{q}\n{SHORT}", ans, {"template": i, "kind": asked}


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


def samples(name: str, split: str, n: int, seed: int):
    """The first ``n`` samples of one task's split: (image, question, answer, meta) each, from the
    task's own rng (what ``write_raw`` writes)."""
    t = list(GENERATORS).index(name)
    rng = np.random.default_rng([seed, t, 0 if split == "train" else 1])
    gen = GENERATORS[name]
    return [gen(rng) for _ in range(n)]


def write_raw(raw: str | Path, train: int, test: int, seed: int) -> Path:
    """Write fcit-mini as raw per-dataset LLaVA files under ``raw``. Deterministic from the seed;
    skipped when the same recipe is already there."""
    raw = Path(raw)
    stamp = raw / "fcit_mini.json"
    h = recipe_hash(train, test, seed)
    if stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == h:
        return raw
    for t, name in enumerate(GENERATORS):
        for split, n in (("train", train), ("test", test)):
            recs = []
            for i, (img, q, a, _) in enumerate(samples(name, split, n, seed)):
                rel = f"images/{name}/{split}_{i:05d}.png"
                (raw / rel).parent.mkdir(parents=True, exist_ok=True)
                img.save(raw / rel)
                s = Sample(q, a, t, None, id=f"{name}-{split}-{i}")
                recs.append(to_conversation(s, rel) if split == "train" else to_test(s, rel))
            write_json(raw / name / f"{split}.json", recs)
    stamp.write_text(json.dumps({"recipe": h, "train": train, "test": test, "seed": seed}))
    return raw
