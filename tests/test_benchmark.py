"""The FCIT benchmark layer: registry, LLaVA loaders, released layout, prepare, scorers, fcit-mini's
generators (templates, answers)."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from fcit_hpc.benchmark import mini
from fcit_hpc.benchmark import scorers as sc
from fcit_hpc.benchmark.layout import LayoutData, prepare
from fcit_hpc.benchmark.llava_json import load_conversations, user_instruction
from fcit_hpc.benchmark.mini import GENERATORS, samples, write_raw
from fcit_hpc.benchmark.registry import (
    CAPABILITY_GROUPS,
    DATASETS,
    TASK_ORDER,
    dataset,
    stage_datasets,
)
from fcit_hpc.errors import DataError

from .conftest import fcit


def test_registry_matches_protocol():
    assert len(DATASETS) == 12
    assert {n for g in CAPABILITY_GROUPS.values() for n in g} == set(DATASETS)
    assert TASK_ORDER == [
        "ImageNet-R",
        "ArxivQA",
        "IconQA",
        "CLEVR-Math",
        "OCRVQA",
        "Flickr30k",
        "FigureQA",
        "super-CLEVR",
    ]
    assert stage_datasets("capability")[1] == ["ArxivQA", "FigureQA", "DVQA"]
    assert stage_datasets("capability", "eval_scripts")[1] == ["Flickr30k", "OCRVQA"]
    assert {d.name: d.scorer for d in DATASETS.values() if d.scorer != "exact"} == {
        "Grounding": "iou",
        "FigureQA": "substring",
        "DVQA": "substring",
        "Flickr30k": "caption",
    }
    with pytest.raises(DataError, match="unknown dataset 'VQAv9'"):
        dataset("VQAv9")


def test_user_instruction_strips_image_and_system():
    assert user_instruction("<image>\nSystem: be nice\nWhat  is\nthis?") == "What is this?"


# ---------------------------------------------------------------- scorers on hand-made cases
def test_exact_and_substring():
    assert sc.exact_match(["Yes", " cat. ", "B"], ["yes", "Cat", "C"]) == pytest.approx(200 / 3)
    # FigureQA/DVQA rule: prediction is a substring of the answer, case-insensitive
    assert sc.substring_match(["yes", "No", "", "7"], ["Yes", "no", "yes", "17"]) == 75.0


@pytest.mark.parametrize(
    "text, box",
    [
        ("[0.1, 0.2, 0.5, 0.6]", [0.1, 0.2, 0.5, 0.6]),
        ("0.1 0.2 0.5 0.6", [0.1, 0.2, 0.5, 0.6]),
        ("The box is (0.5,0.6,0.1,0.2).", [0.1, 0.2, 0.5, 0.6]),
        ("[10, 20, 50, 60]", [0.1, 0.2, 0.5, 0.6]),  # pixels, image 100 x 100
        ("no box here 1 2", None),
    ],
)
def test_box_parser(text, box):
    got = sc.parse_box(text, 100, 100)
    assert got == (None if box is None else pytest.approx(box))


def test_grounding_iou_threshold():
    gt = "[0.0, 0.0, 0.5, 0.5]"
    # IoU of [0,0,.5,.5] with [0,0,.5,.35] = 0.7; with [0,0,.5,.25] = 0.5 (not > 0.5)
    preds = ["[0, 0, 0.5, 0.35]", "[0, 0, 0.5, 0.25]", "garbage"]
    assert sc.iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.25]) == pytest.approx(0.5)
    assert sc.grounding_accuracy(preds, [gt] * 3) == pytest.approx(100 / 3)


def test_caption_metrics_against_hand_computed_values():
    preds = ["a man is playing a guitar", "a woman cutting vegetables"]
    refs = [
        ["the man is playing a guitar", "a man is playing a guitar"],
        ["a woman is slicing cucumbers", "a woman is cutting cucumbers"],
    ]
    s = sc.caption_scores(preds, refs)
    # BLEU-1: clipped unigram matches 6 + 3 over 10 candidate words; brevity penalty with closest
    # reference lengths 6 and 5: exp(1 - 11/10)
    assert s["BLEU-1"] == pytest.approx(100 * 0.9 * np.exp(1 - 11 / 10), rel=1e-6)
    # ROUGE-L (beta 1.2): sentence 1 = 1; sentence 2 LCS 3 -> P = 3/4, R = 3/5
    p, r, b2 = 0.75, 0.6, 1.2**2
    assert s["ROUGE-L"] == pytest.approx(100 * (1 + (1 + b2) * p * r / (r + b2 * p)) / 2, rel=1e-6)
    assert 0 < s["METEOR"] < 100 and s["CIDEr"] > 0
    same = sc.caption_scores(["a red circle"], [["a red circle"]])
    assert same["BLEU-1"] == pytest.approx(100, rel=1e-6) and same["METEOR"] == pytest.approx(100)
    keys = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert s["mean"] == pytest.approx(np.mean([s[k] for k in keys]))


# -------------------------------------------- miniature release tree (more: tests/test_release.py)
def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)


ANSWERS = {
    "Grounding": "[0.1, 0.1, 0.6, 0.6]",
    "Flickr30k": "a red circle above a blue square",
    "FigureQA": "yes",
    "DVQA": "7",
}


def _write_released(root, clients=3):
    """Capability-related stages at β = 1.0, in the published tree."""
    stages = stage_datasets("capability")
    for u, names in enumerate(stages):
        for c in range(clients):
            recs = []
            for n in names:
                _img(root / "datasets" / "images" / n / f"{u}_{c}.png")
                recs.append(
                    {
                        "id": f"{n}-{c}",
                        "image": f"images/{n}/{u}_{c}.png",
                        "conversations": [
                            {"from": "human", "value": f"<image>\nQ about {n}"},
                            {"from": "gpt", "value": ANSWERS.get(n, "x")},
                        ],
                    }
                )
            f = root / f"partitioned_data/Capability-related/cap/1.0/Task{u + 1}/client_{c}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(recs))
        for n in names:
            _img(root / "datasets" / "images" / n / "t.png")
            (root / "instructions" / n).mkdir(parents=True)
            (root / "instructions" / n / "test.json").write_text(
                json.dumps(
                    [
                        {
                            "question_id": f"{n}-q{i}",
                            "image": f"images/{n}/t.png",
                            "text": f"Q {n}",
                            "answer": ANSWERS.get(n, f"ans{i}"),
                        }
                        for i in range(2)
                    ]
                )
            )
    return stages


def test_released_layout_all_12_datasets_load_and_score(tmp_path):
    stages = _write_released(tmp_path)
    data = LayoutData(tmp_path, stages, "capability", 1.0, num_clients=3)
    assert sorted(data.task_names) == sorted(DATASETS)
    assert len(data.client_samples(0, 2)) == 4 and data.client_samples(0, 2)[0].image == str(
        tmp_path / "datasets/images/AOKVQA/0_2.png"
    )
    for t, name in enumerate(data.task_names):
        tests = data.test[t]
        answers = [s.answer for s in tests]
        scorer = DATASETS[name].scorer
        if scorer == "caption":  # CIDEr's idf is 0 when every reference is the same caption
            assert sc.caption_scores(answers, answers)["BLEU-4"] == pytest.approx(100, rel=1e-6)
        else:
            assert sc.score(scorer, answers, answers) == pytest.approx(100, rel=1e-6)
        wrong = ["[0.7, 0.7, 0.9, 0.9]" if scorer == "iou" else "zzz"] * len(tests)
        assert sc.score(scorer, wrong, answers) < 50
    # the scorer a dataset uses makes a difference: "ye" is right only under the substring rule
    fig = data.task_names.index("FigureQA")
    assert (
        sc.score(DATASETS["FigureQA"].scorer, ["ye", "ye"], [s.answer for s in data.test[fig]])
        == 100
    )


def test_fcit_mini_is_deterministic_and_has_look_alike_pairs(tmp_path):
    a = write_raw(tmp_path / "a", 4, 1, seed=3)
    b = write_raw(tmp_path / "b", 4, 1, seed=3)
    for n in GENERATORS:
        assert (a / n / "train.json").read_text() == (b / n / "train.json").read_text()
        assert (a / "images" / n / "train_00002.png").read_bytes() == (
            b / "images" / n / "train_00002.png"
        ).read_bytes()
        # the files hold what samples() generates, with the whitespace collapsed
        got = load_conversations(a / n / "train.json", 0, a)
        want = samples(n, "train", 4, seed=3)
        assert [(s.instruction, s.answer) for s in got] == [
            (user_instruction(q), ans) for _, q, ans, _ in want
        ]
    # CLEVR-Math and super-CLEVR render the same kind of scene (same floor colour) ...
    im1 = np.asarray(Image.open(a / "images/CLEVR-Math/train_00000.png"))
    im2 = np.asarray(Image.open(a / "images/super-CLEVR/train_00000.png"))
    assert tuple(im1[0, 0]) == tuple(im2[0, 0]) == (170, 170, 170)
    # ... and share scene words, but their instructions differ (counting vs naming an attribute)
    q1 = {user_instruction(q) for _, q, _, _ in samples("CLEVR-Math", "train", 200, 3)}
    q2 = {user_instruction(q) for _, q, _, _ in samples("super-CLEVR", "train", 200, 3)}
    assert not q1 & q2
    scene = {"object", "scene", "cube", "block", "sphere", "ball", "cone"}
    words = [
        {w.strip("?.,").lower().removesuffix("s") for q in qs for w in q.split()} for qs in (q1, q2)
    ]
    assert scene <= words[0] & words[1]
    assert all("How many objects" in q for q in q1 if "Subtract" in q)


# content a template is filled with: digits, colours, shapes and scene words, titles, names, fruits
_CONTENT = re.compile(
    r"\b(?:"
    + "|".join(
        sorted(
            {*mini.COLORS, *mini.SHAPES, *mini.EXTRA_SHAPES, *mini.NAMES, *mini.FRUITS}
            | {w for ws in mini.SCENE_WORDS.values() for w in ws}
            | {w[:5] for w in mini.WORDS},
            key=len,
            reverse=True,
        )
    )
    + r")s?\b|\d+",
    re.IGNORECASE,
)
_OPTIONS = re.compile(r"(?:Options:(?: [A-F]\. \S+)+|(?:^|\n)[A-F]\. [^\n]*)")


def _skeleton(q: str) -> str:
    """A question with its option list and its variable content stripped."""
    return " ".join(_CONTENT.sub("_", _OPTIONS.sub(" ", q)).split())


def test_fcit_mini_has_at_least_8_templates_per_task():
    """200 samples per task: at least 8 templates drawn (the generators' template ids), each
    template's text skeleton (option lists, numbers, colours, names stripped) distinct from the
    others', and the templates drawn uniformly."""
    for n in GENERATORS:
        got = samples(n, "train", 200, seed=0)
        ids = Counter(m["template"] for _, _, _, m in got)
        assert len(ids) >= 8, (n, ids)
        assert min(ids.values()) >= 200 / len(ids) / 3, (n, ids)  # roughly uniform
        skel = {i: Counter() for i in ids}
        for _, q, _, m in got:
            skel[m["template"]][_skeleton(q)] += 1
        distinct = {c.most_common(1)[0][0] for c in skel.values()}
        assert len(distinct) == len(ids), (n, sorted(distinct))


_FORMS = {
    "AOKVQA": r"[A-D]",
    "IconQA": r"[A-D]|[1-9]",
    "Grounding": r"\[(?:0|0\.\d+|1\.0),(?:0|0\.\d+|1\.0),(?:0|0\.\d+|1\.0),(?:0|0\.\d+|1\.0)\]",
    "ImageNet-R": r"[A-D]",
    "ArxivQA": r"[A-D]",
    "FigureQA": r"yes|no",
    "DVQA": r"\d{1,2}",
    "CLEVR-Math": r"\d",
    "super-CLEVR": "|".join([*mini.COLORS, "cube", "sphere", "cone"]),
    "TabMWP": r"\d{1,2}",
    "Flickr30k": r"an? \w+ (?:square|circle|triangle) above an? \w+ (?:square|circle|triangle)",
    "OCRVQA": "|".join([*(w[:5] for w in mini.WORDS), *mini.NAMES, "yes", "no"]),
}


def test_fcit_mini_answers_keep_each_task_form_and_fit_the_text_budget():
    """Answers in each task's form (scored by its scorer), and instruction + answer within the
    default 160-byte budget (<bos>, "\n" and <eos> included), so truncation keeps the question."""
    for n in GENERATORS:
        got = samples(n, "test", 200, seed=1)
        for _, q, a, _ in got:
            assert re.fullmatch(_FORMS[n], a), (n, q, a)
            assert len(user_instruction(q).encode()) + len(a.encode()) + 3 <= 160, (n, q)
        answers = [a for _, _, a, _ in got]
        if DATASETS[n].scorer != "caption":
            assert sc.score(DATASETS[n].scorer, answers, answers) == 100


_RGB = {name: np.array(rgb) for name, rgb in mini.COLORS.items()}


def _nearest_colour(px) -> str:
    return min(_RGB, key=lambda c: np.abs(_RGB[c] - px).sum())


def _shape_of(mask) -> str:
    """square, circle or triangle from the share of its bounding box a shape fills."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def _truth_from_image(name, img, meta, q):
    """The correct option, read off the rendered image (not from the generator's bookkeeping)."""
    a = np.asarray(img).astype(int)
    if name == "AOKVQA":
        if meta["kind"] == "color":
            return _nearest_colour(a[16, 16])
        return _shape_of((a != 245).any(axis=2))
    if name == "ImageNet-R":  # background channels 180-254, the object's 0-119
        return _shape_of(a.mean(axis=2) < 150)
    if name == "ArxivQA":  # the curves start together and end apart on the right edge
        col = a[:, mini.SIZE - 3]
        ends = {}
        for y in range(mini.SIZE):
            if (col[y] != 245).any():
                ends.setdefault(_nearest_colour(col[y]), y)
        if meta["kind"] == "count":
            return str(len(ends))
        return (min if meta["kind"] == "max" else max)(ends, key=ends.get)
    if name == "IconQA":  # one icon per 8 x 8 cell of a 4 x 4 frame
        count = sum(
            (a[1 + 8 * r : 7 + 8 * r, 1 + 8 * c : 7 + 8 * c] != 245).any()
            for r in range(4)
            for c in range(4)
        )
        k = int(re.search(r"than (\d+)", q).group(1)) if "than" in q else None
        return {
            "count": str(count),
            "parity": "even" if count % 2 == 0 else "odd",
            "more": "yes" if k is not None and count > k else "no",
            "fewer": "yes" if k is not None and count < k else "no",
        }[meta["kind"]]
    raise AssertionError(name)


def test_fcit_mini_multiple_choice_answers_are_right_after_shuffling():
    """Options parsed from the question text; the answer is the letter of the option the image
    makes true, exactly one option is, and the correct letter moves around."""
    for n in ("AOKVQA", "ImageNet-R", "ArxivQA", "IconQA"):
        letters, sizes = Counter(), Counter()
        for img, q, a, meta in samples(n, "train", 200, seed=0):
            if "options" not in meta:
                assert n == "IconQA" and "Answer the question using" in q  # fill in the blank
                continue
            assert q.endswith("Answer with the option's letter from the given choices directly.")
            opts = re.findall(r"(?:^|\n|Options: | )([A-F])\. (\S+)", q)
            assert "".join(x for x, _ in opts) == "ABCDEF"[: len(opts)], q
            truth = _truth_from_image(n, img, meta, q)
            assert [o for _, o in opts].count(truth) == 1, (q, truth)
            assert a == opts[[o for _, o in opts].index(truth)][0], (q, a, truth)
            letters[a] += 1
            sizes[len(opts)] += 1
        assert len(letters) >= 2 and max(letters.values()) < sum(letters.values()) * 0.6
        if n in ("AOKVQA", "ImageNet-R"):
            assert set(letters) == set("ABCD") and set(sizes) == {4}
        else:  # ArxivQA and IconQA ask with 2-4 options
            assert set(sizes) >= {2, 4}, sizes


# ------------------------------------------------------------------------------ bad data
def _raw_one(tmp_path, train):
    raw = tmp_path / "raw"
    (raw / "ImageNet-R").mkdir(parents=True)
    (raw / "ImageNet-R" / "train.json").write_text(train)
    (raw / "ImageNet-R" / "test.json").write_text("[]")
    return raw


@pytest.mark.parametrize(
    "train, fragment",
    [
        ('{"a": 1}', "train.json: expected a JSON list of records"),
        ('[{"id": 1}]', "train.json: record 0: missing 'conversations'"),
        (
            '[{"id": 1, "image": "nope.png", "conversations": [{"from": "human", "value": "q"}, '
            '{"from": "gpt", "value": "a"}]}]',
            "train.json: record 0: image not found",
        ),
        ("[1, 2", "train.json: not valid JSON"),
    ],
)
def test_bad_raw_files_exit_2_naming_file_and_record(tmp_path, train, fragment):
    raw = _raw_one(tmp_path, train)
    p = fcit(
        "data",
        "prepare",
        "--raw",
        str(raw),
        "--out",
        str(tmp_path / "o"),
        "--datasets",
        "ImageNet-R",
        "--num-clients",
        "1",
        "--min-samples",
        "1",
    )
    assert p.returncode == 2
    assert fragment in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_bad_beta_and_unknown_dataset(tmp_path):
    p = fcit("data", "prepare", "--raw", str(tmp_path), "--out", str(tmp_path / "o"), "--beta", "0")
    assert p.returncode == 2 and "--beta: 0.0 is out of range" in p.stderr
    p = fcit("run", "configs/smoke.yaml", "benchmark.dirichlet_beta=-1")
    assert p.returncode == 2 and "benchmark.dirichlet_beta" in p.stderr
    with pytest.raises(DataError, match="unknown dataset"):
        prepare(
            tmp_path,
            tmp_path / "o",
            [["NotADataset"]],
            "task",
            beta=1.0,
            num_clients=2,
            min_samples=1,
            seed=0,
        )


def test_empty_client_file(tmp_path):
    f = tmp_path / "client_0.json"
    f.write_text("[]")
    with pytest.raises(DataError, match="client_0.json: empty client file"):
        load_conversations(f, 0)
