"""The FCIT benchmark layer: registry, LLaVA loaders, released layout, prepare, scorers."""

import json

import numpy as np
import pytest
from PIL import Image

from fcit_hpc.benchmark import scorers as sc
from fcit_hpc.benchmark.layout import LayoutData, prepare
from fcit_hpc.benchmark.llava_json import load_conversations, user_instruction
from fcit_hpc.benchmark.mini import GENERATORS, write_raw
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
    data = LayoutData(tmp_path, stages, "capability", 1.0, 3)
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
    # CLEVR-Math and super-CLEVR render the same kind of scene (same floor colour) ...
    im1 = np.asarray(Image.open(a / "images/CLEVR-Math/train_00000.png"))
    im2 = np.asarray(Image.open(a / "images/super-CLEVR/train_00000.png"))
    assert tuple(im1[0, 0]) == tuple(im2[0, 0]) == (170, 170, 170)
    # ... but their instructions differ
    q1 = load_conversations(a / "CLEVR-Math/train.json", 0, a)[0].instruction
    q2 = load_conversations(a / "super-CLEVR/train.json", 0, a)[0].instruction
    assert q1.split()[0] != q2.split()[0]


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
        prepare(tmp_path, tmp_path / "o", [["NotADataset"]], "task", 1.0, 2, 1, 0)


def test_empty_client_file(tmp_path):
    f = tmp_path / "client_0.json"
    f.write_text("[]")
    with pytest.raises(DataError, match="client_0.json: empty client file"):
        load_conversations(f, 0)
