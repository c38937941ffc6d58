"""The FCIT release tree as published (``FCIT_data``): a miniature one written here by hand, read by
``benchmark.suite: released`` and run (Hom, Het, capability, multi-task; 1 and 2 ranks), with the
predictions files rescored; bad trees; ``fcit data prepare`` writing the same tree."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcit_hpc.benchmark import scorers as sc
from fcit_hpc.benchmark.layout import TREE_VERSION, LayoutData, prepare
from fcit_hpc.benchmark.llava_json import load_conversations, load_test
from fcit_hpc.benchmark.mini import recipe_hash, write_raw
from fcit_hpc.benchmark.registry import DATASETS, stage_datasets
from fcit_hpc.config import load_config
from fcit_hpc.errors import DataError
from fcit_hpc.state.schema import read_state

from .conftest import ROOT, fcit, mpiexec
from .published import PUBLISHED_HET_TASK

FCIT = str(ROOT / ".venv/bin/fcit") if (ROOT / ".venv/bin/fcit").exists() else "fcit"
SMOKE_MINI = str(ROOT / "configs/smoke_mini.yaml")
# answers the scorers can take (a box, yes/no, a caption); the others are unicode text
ANSWER = {
    "Grounding": "[0.1, 0.1, 0.6, 0.6]",
    "FigureQA": "yes",
    "DVQA": "7",
    "Flickr30k": "a red circle above a blue square",
}
MULTI_TURN_ANSWERS = ("eins", "zwei – ünïcødé ✓")


def _image(path: Path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)  # format from the suffix: PNG or JPEG


def _client_records(names: list[str], c: int, root: Path) -> list[dict]:
    """Client 0: two records per dataset (one with ``<image>`` at the end of the prompt); client 1:
    one multi-turn record per dataset, JPEG images; client 2: a single record."""
    recs = []
    for n in names if c < 2 else names[:1]:
        ext = "jpg" if c == 1 else "png"
        img = f"{n}/train_{c}.{ext}"
        _image(root / "datasets" / img, (10 * c, 200, 30))
        if c == 1:
            a1, a2 = MULTI_TURN_ANSWERS
            recs.append(
                {
                    "id": f"{n}-mt",
                    "image": img,
                    "conversations": [
                        {"from": "human", "value": f"<image>\nFirst question about {n}?"},
                        {"from": "gpt", "value": a1},
                        {"from": "human", "value": "Second question?"},
                        {"from": "gpt", "value": a2},
                    ],
                }
            )
            continue
        for k, prompt in enumerate([f"<image>\nWhat is in the {n} picture?", "Name it.\n<image>"]):
            if c == 2 and k:
                break
            recs.append(
                {
                    "id": f"{n}-{c}-{k}",
                    "image": img,
                    "conversations": [
                        {"from": "human", "value": prompt},
                        {"from": "gpt", "value": ANSWER.get(n, "grün")},
                    ],
                }
            )
    return recs


def _write_units(root: Path, group: str, kind: str, stages, clients: int = 3) -> None:
    for u, names in enumerate(stages):
        d = root / "partitioned_data" / group / kind / "1.0" / f"Task{u + 1}"
        d.mkdir(parents=True)
        for c in range(clients):
            (d / f"client_{c}.json").write_text(
                json.dumps(_client_records(names, c, root), ensure_ascii=False), encoding="utf-8"
            )


def write_release(root: Path) -> Path:
    """A miniature FCIT_data: seq, cap and both multask folders at β = 1.0, all 12 test sets."""
    _write_units(root, "Task-related", "seq", stage_datasets("task"))
    _write_units(root, "Capability-related", "cap", stage_datasets("capability"))
    # multi-task: two client files splitting the datasets, read as one client by the bound
    for group, setting in (("Task-related", "joint"), ("Capability-related", "joint-capability")):
        (names,) = stage_datasets(setting)
        d = root / "partitioned_data" / group / "multask" / "1.0" / "Task1"
        d.mkdir(parents=True)
        for c, part in enumerate((names[:3], names[3:])):
            (d / f"client_{c}.json").write_text(json.dumps(_client_records(part, 0, root)))
    (root / "partitioned_data" / "Task-related" / "seq" / "5.0").mkdir()
    for n in DATASETS:
        _image(root / "datasets" / n / "test_0.png", (0, 0, 255))
        _image(root / "datasets" / n / "test_1.jpg", (255, 0, 0))
        answer = ANSWER.get(n, "grün")
        tests = [
            {
                "question_id": 7,
                "image": f"{n}/test_0.png",
                "text": "<image>\nWhat?",
                "answer": answer,
            },
            {
                "id": f"{n}-t1",
                "image": f"{n}/test_1.jpg",
                "text": "Which?\n<image>",
                "answer": answer,
            },
            {"text": "No image, no id?", "answer": answer},
        ]
        f = root / "instructions" / n / "test.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps(tests, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_release(tmp_path_factory.mktemp("rel") / "FCIT_data")


# ------------------------------------------------------------------------------ reading the tree
def test_client_samples_kept_for_the_last_clients_only(release, monkeypatch):
    """A rank reading thousands of clients keeps only the last CLIENT_CACHE clients' samples; one
    read again is read from its file again, the same samples."""
    from fcit_hpc.benchmark import layout

    monkeypatch.setattr(layout, "CLIENT_CACHE", 2)
    data = LayoutData(release, stage_datasets("task"), "task", 1.0, num_clients=3)
    first = [data.client_samples(2, c) for c in range(3)]
    info = data._read.cache_info()
    assert info.currsize == 2 and info.misses == 3
    assert data.client_samples(2, 0) == first[0]  # dropped, read again: equal
    assert data._read.cache_info().misses == 4
    data.client_samples(2, 0).clear()  # a caller's list is its own
    assert data.client_samples(2, 0) == first[0]


def test_released_tree_reads_as_published(release):
    data = LayoutData(release, stage_datasets("task"), "task", 1.0, num_clients=3)
    img = str(release / "datasets")
    # stage 3 of the task order (Task3, unit 2) is IconQA
    got = [
        [(s.instruction, s.answer, s.image) for s in data.client_samples(2, c)] for c in range(3)
    ]
    assert got == [
        [
            ("What is in the IconQA picture?", "grün", f"{img}/IconQA/train_0.png"),
            ("Name it.", "grün", f"{img}/IconQA/train_0.png"),
        ],
        [
            ("First question about IconQA?", "eins", f"{img}/IconQA/train_1.jpg"),
            ("Second question?", "zwei – ünïcødé ✓", f"{img}/IconQA/train_1.jpg"),
        ],
        [("What is in the IconQA picture?", "grün", f"{img}/IconQA/train_2.png")],
    ]
    tests = data.test[data.task_of["FigureQA"]]
    assert [s.id for s in tests] == [7, "FigureQA-t1", 2]
    assert [s.instruction for s in tests] == ["What?", "Which?", "No image, no id?"]
    assert tests[1].image == f"{img}/FigureQA/test_1.jpg" and tests[2].image is None
    # capability: a stage is a group of datasets, its files under Capability-related/cap
    cap = LayoutData(release, stage_datasets("capability"), "capability", 1.0, num_clients=3)
    assert [s.image.split("/")[-2] for s in cap.client_samples(1, 0)] == [
        "ArxivQA",
        "ArxivQA",
        "FigureQA",
        "FigureQA",
        "DVQA",
        "DVQA",
    ]
    assert len(cap.test) == 12


def test_multitask_bound_holds_every_client_file_of_multask(release):
    (names,) = stage_datasets("joint")
    one = LayoutData(release, [names], "joint", 1.0, num_clients=1)
    # the first three datasets come from client_0.json, the rest from client_1.json
    assert [s.image.split("/")[-2] for s in one.client_samples(0, 0)[::2]] == names
    two = LayoutData(release, [names], "joint", 1.0, num_clients=2)
    assert len(two.client_samples(0, 0)) == 6 and len(two.client_samples(0, 1)) == 10
    (cap_names,) = stage_datasets("joint-capability")
    cap = LayoutData(release, [cap_names], "joint-capability", 1.0, num_clients=1)
    assert len(cap.client_samples(0, 0)) == 2 * 12


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[1, 2", "not valid JSON"),
        ('{"records": []}', "expected a JSON list of records"),
        ("[1]", "record 0: expected an object"),
        (
            '[{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}]',
            "record 0: turn 0: expected a human turn, got 'gpt'",
        ),
        (
            '[{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, '
            '{"from": "human", "value": "q2"}]}]',
            "record 0: the last human turn has no gpt answer",
        ),
    ],
)
def test_bad_client_file_names_the_file(tmp_path, text, fragment):
    f = tmp_path / "client_0.json"
    f.write_text(text)
    with pytest.raises(DataError, match=fragment) as e:
        load_conversations(f, 0)
    assert str(f) in str(e.value)


def test_bad_trees_name_the_missing_piece(release, tmp_path):
    with pytest.raises(
        DataError, match=r"seq/0\.5: missing β folder .*β folders there: 1\.0, 5\.0"
    ):
        LayoutData(release, stage_datasets("task"), "task", 0.5, num_clients=3)
    with pytest.raises(DataError, match=r"seq/1\.0/Task1/client_3\.json: missing client file"):
        LayoutData(release, stage_datasets("task"), "task", 1.0, num_clients=4)
    with pytest.raises(DataError, match="Capability-related/multask: missing folder"):
        LayoutData(tmp_path, [["AOKVQA"]], "joint-capability", 1.0, num_clients=1)


# ------------------------------------------------------------------------------------ runs on it
def _overrides(root: Path, *extra: str) -> list[str]:
    return [
        "benchmark.suite=released",
        f"benchmark.data_root={root}",
        "federation.num_clients=3",
        "federation.client_selection_frac=1.0",
        *extra,
    ]


def _run(root: Path, out: Path, *extra: str, ranks: int = 0):
    args = ["run", SMOKE_MINI, "--out", str(out), *_overrides(root, *extra)]
    return mpiexec(ranks, FCIT, *args) if ranks else fcit(*args)


def _rescored(run_dir: Path, root: Path) -> None:
    """Every predictions file, joined on question_id with its test file and scored with the
    dataset's scorer, gives the accuracy of the state."""
    st = read_state(run_dir)
    for s in range(st.accuracy.shape[0]):
        for t, name in enumerate(st.task_names):
            lines = (run_dir / "predictions" / f"stage{s}" / f"{name}.jsonl").read_text("utf-8")
            preds = {}
            for line in lines.splitlines():
                rec = json.loads(line)
                assert set(rec) == {"question_id", "text"}
                preds[rec["question_id"]] = rec["text"]
            tests = json.loads((root / "instructions" / name / "test.json").read_text("utf-8"))
            qids = [r.get("question_id", r.get("id", i)) for i, r in enumerate(tests)]
            assert list(preds) == qids == [7, f"{name}-t1", 2]
            p = [preds[q] for q in qids]
            want = sc.score(DATASETS[name].scorer, p, [r["answer"] for r in tests])
            assert want == st.accuracy[s, t], (s, name)
    assert not list((run_dir / "predictions").rglob("*.tmp"))


@pytest.mark.mpi
@pytest.mark.slow
def test_hom_run_on_the_release_2_ranks(release, tmp_path):
    p = _run(release, tmp_path / "hom", ranks=2)
    assert p.returncode == 0, p.stderr[-3000:]
    st = read_state(tmp_path / "hom")
    assert st.accuracy.shape == (8, 8) and not np.isnan(st.accuracy).any()
    # clients trained what their files hold: 2 samples, 2 turn pairs, 1 sample
    rows = st.clients
    assert set(zip(rows["client"].tolist(), rows["samples"].tolist(), strict=True)) == {
        (0, 2),
        (1, 2),
        (2, 1),
    }
    _rescored(tmp_path / "hom", release)


@pytest.mark.slow
def test_het_reads_the_seq_units_of_the_table(release, tmp_path):
    p = _run(release, tmp_path / "het", "benchmark.scenario=het", "eval.enabled=false")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_state(tmp_path / "het").clients
    for stage in range(8):
        r = rows[rows["stage"] == stage]
        assert r["unit"].tolist() == PUBLISHED_HET_TASK[stage][:3]  # clients 0, 1, 2 = slots
    assert set(zip(rows["client"].tolist(), rows["samples"].tolist(), strict=True)) == {
        (0, 2),
        (1, 2),
        (2, 1),
    }


@pytest.mark.slow
def test_capability_and_multitask_runs(release, tmp_path):
    p = _run(release, tmp_path / "cap", "benchmark.setting=capability")
    assert p.returncode == 0, p.stderr[-3000:]
    st = read_state(tmp_path / "cap")
    assert st.accuracy.shape == (4, 12) and sorted(st.task_names) == sorted(DATASETS)
    want = {
        (u, c): n
        for u, names in enumerate(stage_datasets("capability"))
        for c, n in ((0, 2 * len(names)), (1, 2 * len(names)), (2, 1))
    }
    rows = st.clients
    assert {(int(r["unit"]), int(r["client"])): int(r["samples"]) for r in rows} == want
    _rescored(tmp_path / "cap", release)
    p = _run(release, tmp_path / "mt", "compare=[multitask]", "benchmark.setting=capability")
    assert p.returncode == 0, p.stderr[-3000:]
    st = read_state(tmp_path / "mt" / "multitask" / "seed0")
    assert st.accuracy.shape == (1, 12)
    # the one client holds both multask client files: 2 records x 12 datasets
    assert st.clients["samples"].tolist() == [24] * len(st.clients)
    _rescored(tmp_path / "mt" / "multitask" / "seed0", release)


# ----------------------------------------------------------------------------- bad trees, exit 2
@pytest.mark.slow
def test_missing_beta_and_test_file_exit_2(release, tmp_path):
    p = _run(release, tmp_path / "b", "benchmark.dirichlet_beta=0.5")
    assert p.returncode == 2
    assert f"{release}/partitioned_data/Task-related/seq/0.5: missing β folder" in p.stderr
    assert "β folders there: 1.0, 5.0" in p.stderr
    broken = write_release(tmp_path / "broken")
    (broken / "instructions" / "OCRVQA" / "test.json").unlink()
    p = _run(broken, tmp_path / "t")
    assert p.returncode == 2
    assert (
        f"{broken}/instructions/OCRVQA/test.json: missing test file of dataset OCRVQA" in p.stderr
    )


@pytest.mark.mpi
@pytest.mark.slow
def test_image_that_does_not_open_exits_2_from_the_rank_that_reads_it(tmp_path):
    """Client 1 (dealt to rank 1) has an image that is not an image: only rank 1 reads it, and the
    job still ends with exit 2 and the message naming the file."""
    root = write_release(tmp_path / "FCIT_data")
    bad = root / "datasets" / "ImageNet-R" / "train_1.jpg"
    bad.write_bytes(b"not a jpeg at all")
    args = ["federation.num_clients=2"]
    for ranks in (0, 2):
        p = _run(root, tmp_path / f"r{ranks}", *args, ranks=ranks)
        assert p.returncode == 2, p.stderr[-3000:]
        assert f"fcit: error: {bad}: cannot read image" in p.stderr


# ---------------------------------------------------------------------------------------- prepare
def _raw(tmp_path: Path) -> Path:
    """fcit-mini's raw files plus a hand-written ImageNet-R with a multi-turn record, a JPEG and
    unicode answers."""
    raw = write_raw(tmp_path / "raw", 8, 2, seed=1)
    _image(raw / "pics" / "a.jpg", (1, 2, 3))
    train = [
        {
            "id": "x0",
            "image": "pics/a.jpg",
            "conversations": [
                {"from": "human", "value": "Name it.\n<image>"},
                {"from": "gpt", "value": "grün"},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "ja ✓"},
            ],
        }
    ] * 5
    (raw / "ImageNet-R" / "train.json").write_text(json.dumps(train, ensure_ascii=False), "utf-8")
    test = [{"question_id": 3, "image": "pics/a.jpg", "text": "<image>\nWhat?", "answer": "grün"}]
    (raw / "ImageNet-R" / "test.json").write_text(json.dumps(test, ensure_ascii=False), "utf-8")
    return raw


def _content(samples) -> Counter:
    """(instruction, answer, image bytes) of samples: equal whatever folder the image is in."""
    return Counter(
        (s.instruction, s.answer, Path(s.image).read_bytes() if s.image else None) for s in samples
    )


@pytest.mark.parametrize("setting", ["task", "capability", "joint"])
def test_prepare_writes_the_release_tree(tmp_path, setting):
    raw, out = _raw(tmp_path), tmp_path / "FCIT_data"
    p = fcit(
        "data", "prepare", "--raw", str(raw), "--out", str(out), "--setting", setting,
        "--beta", "0.5", "--num-clients", "4", "--min-samples", "1",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    group, kind = {
        "task": ("Task-related", "seq"),
        "capability": ("Capability-related", "cap"),
        "joint": ("Task-related", "multask"),
    }[setting]
    stages = stage_datasets(setting)
    part = out / "partitioned_data" / group / kind / "0.5"
    assert sorted(d.name for d in part.iterdir()) == sorted(
        f"Task{u + 1}" for u in range(len(stages))
    )
    (out / "fcit_layout.json").unlink()  # prepare's own record: not needed to load
    data = LayoutData(out, stages, setting, 0.5, num_clients=4)
    for u, names in enumerate(stages):
        got = [s for c in range(4) for s in data.client_samples(u, c)]
        assert all(s.image.startswith(str(out / "datasets")) for s in got)
        want = [s for n in names for s in load_conversations(raw / n / "train.json", 0, raw)]
        assert _content(got) == _content(want)
    for n in data.task_names:
        assert _content(data.test[data.task_of[n]]) == _content(
            load_test(raw / n / "test.json", 0, raw)
        )
    # one multi-turn record became two single-turn records; the question id is kept
    if "ImageNet-R" in data.task_of:
        assert data.test[data.task_of["ImageNet-R"]][0].id == 3


def test_fcit_mini_is_read_as_a_release(tmp_path, monkeypatch):
    """fcit-mini's cache is a release tree: the same data as suite released at that folder."""
    from fcit_hpc.benchmark.suite import FederatedData, ensure_data, mini_root

    monkeypatch.setenv("FCIT_CACHE", str(tmp_path))
    cfg = load_config(SMOKE_MINI, ["benchmark.scenario=het"])
    n = cfg.federation.num_clients
    ensure_data(cfg.benchmark, num_clients=n, seed=cfg.seed)
    root = mini_root(cfg.benchmark, cfg.seed)
    assert (root / "partitioned_data" / "Task-related" / "seq" / "1.0" / "Task8").is_dir()
    mini = FederatedData(cfg.benchmark, num_clients=n, seed=cfg.seed)
    rel_cfg = load_config(SMOKE_MINI, ["benchmark.suite=released", f"benchmark.data_root={root}"])
    rel = FederatedData(rel_cfg.benchmark, num_clients=n, seed=cfg.seed)
    for u in range(8):
        for c in range(cfg.federation.num_clients):
            assert mini.client_samples(u, c) == rel.client_samples(u, c)
    assert mini.test == rel.test and mini.task_names == rel.task_names


def test_fcit_mini_cache_key_follows_the_tree_version(monkeypatch):
    import fcit_hpc.benchmark.mini as mini

    before = recipe_hash(30, 3, 0)
    monkeypatch.setattr(mini, "TREE_VERSION", TREE_VERSION + 1)
    assert recipe_hash(30, 3, 0) != before


def test_prepare_again_leaves_no_stale_client_files(tmp_path):
    raw = write_raw(tmp_path / "raw", 6, 1, seed=2)
    out = tmp_path / "FCIT_data"
    for clients in (4, 2):
        prepare(
            raw, out, [["OCRVQA"]], "task", beta=1.0, num_clients=clients, min_samples=1, seed=0
        )
    task1 = out / "partitioned_data" / "Task-related" / "seq" / "1.0" / "Task1"
    assert sorted(f.name for f in task1.iterdir()) == ["client_0.json", "client_1.json"]


def test_predictions_are_replaced_whole(tmp_path, monkeypatch):
    from fcit_hpc.data.sample import Sample
    from fcit_hpc.fed.server import predictions as pr

    tests = {0: [Sample("q", "a", 0, None, id=5), Sample("q", "a", 0, None, id="")]}
    pr.write_predictions(tmp_path, 1, ["OCRVQA"], tests, predictions=[["grün", "x"]])
    f = tmp_path / "predictions" / "stage1" / "OCRVQA.jsonl"
    first = f.read_text("utf-8")
    assert first == '{"question_id": 5, "text": "grün"}\n{"question_id": 1, "text": "x"}\n'

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(pr.os, "fsync", crash)
    with pytest.raises(OSError):
        pr.write_predictions(tmp_path, 1, ["OCRVQA"], tests, predictions=[["new", "new"]])
    assert f.read_text("utf-8") == first  # a crash while writing leaves the old file whole


def test_broken_client_file_of_the_last_stage_is_found_before_the_first_round(tmp_path):
    """Issue 26: a client file of a late stage that does not parse ends the run before the first
    round (exit 2 naming the file), not when that stage starts; the fresh run leaves nothing."""
    root = write_release(tmp_path / "FCIT_data")
    stages = stage_datasets("task")
    last = root / "partitioned_data" / "Task-related" / "seq" / "1.0" / f"Task{len(stages)}"
    (last / "client_2.json").write_text('[{"conversations": [}]')
    layout = LayoutData(root, stages, "task", 1.0, num_clients=3)  # structure only: files exist
    with pytest.raises(DataError, match=rf"Task{len(stages)}/client_2\.json"):
        layout.check_client_files()
    p = _run(root, tmp_path / "run")
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"fcit: error: {last / 'client_2.json'}" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()
