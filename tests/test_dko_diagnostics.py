"""DKO diagnostics (issue 15): the small-cluster guard (method.min_cluster_frac), subspace purity,
the SSA gate's mass on the right subspaces, their place in state.h5 / metrics.jsonl / the report /
comparison.md."""

import json
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from fcit_hpc.config import config_from_yaml_text, load_config
from fcit_hpc.errors import ConfigError, StateError
from fcit_hpc.fed.server.metrics_log import MetricsLog
from fcit_hpc.methods import dko_diagnostics as dko
from fcit_hpc.methods.base import ACTIONS, FULL, MATCHED, NEW, SMALL, DkoDecision
from fcit_hpc.methods.disco import Disco, cosine, dko_assign
from fcit_hpc.state.schema import (
    CLIENT_DTYPE,
    ROUND_DTYPE,
    STATE_FILE,
    RunState,
    comparable_content,
    read_state,
    same_content,
    write_state,
)

from .conftest import ROOT, fcit, method_of, smoke_serial


def _t(*xs):
    return np.array(xs, dtype=np.float32)


def dko_assign_v0(G, counts, live, clients, tokens, samples, tau, full_policy="nearest"):
    """dko_assign as it was before the small-cluster guard (commit 1ae8c38), verbatim."""
    s_max = G.shape[0]
    decisions = []
    for cid, mu, m in zip(clients, tokens, samples, strict=True):
        sims = cosine(mu, G[:live]) if live else np.zeros(0)
        best = int(np.argmax(sims)) if live else -1
        best_sim = float(sims[best]) if live else float("nan")
        if live and best_sim >= tau:
            k, action = best, MATCHED
        elif live < s_max:
            k, action = live, NEW
            live += 1
        elif full_policy == "nearest":
            k, action = best, FULL
        else:
            raise RuntimeError("full")
        n = counts[k]
        G[k] = ((G[k].astype(np.float64) * n + mu.astype(np.float64) * m) / (n + m)).astype(G.dtype)
        counts[k] = n + m
        decisions.append(DkoDecision(cid, k, best_sim, action))
    return decisions, live


def _two_live():
    """Two live subspaces, tokens (1, 0) and (0, 1), 100 samples each, S_max = 4."""
    G = np.zeros((4, 2), np.float32)
    G[0], G[1] = (1, 0), (0, 1)
    return G, np.array([100.0, 100.0, 0, 0])


# ------------------------------------------------------------------------------- the guard
def test_tiny_far_client_joins_its_nearest_subspace():
    G, n = _two_live()
    far = _t(1, -1)  # cos 0.707 with S0, -0.707 with S1: below τ, nearest S0
    toks, samples = [_t(1, 0), _t(0, 1), far], [1000, 1000, 1]  # 1 / 2001 < 1e-3
    d, live = dko_assign(
        G, n, 2, [3, 5, 7], tokens=toks, samples=samples, tau=0.9, min_cluster_frac=1e-3
    )
    assert [(x.subspace, x.action) for x in d] == [(0, MATCHED), (1, MATCHED), (0, SMALL)]
    assert live == 2 and ACTIONS[SMALL] == "small->nearest"
    assert d[2].similarity == pytest.approx(np.sqrt(0.5), rel=1e-6)
    assert n.tolist() == [1101, 1100, 0, 0]  # merged into S0 as a match would be
    np.testing.assert_allclose(G[0], (np.array([1, 0]) * 1100 + far * 1) / 1101, rtol=1e-6)
    # without the guard it makes a subspace of its own
    G, n = _two_live()
    d, live = dko_assign(G, n, 2, [3, 5, 7], tokens=toks, samples=samples, tau=0.9)
    assert d[2].action == NEW and d[2].subspace == 2 and live == 3
    # at or above the share it is not small
    G, n = _two_live()
    d, _ = dko_assign(
        G, n, 2, [3, 5, 7], tokens=toks, samples=[1000, 1000, 3], tau=0.9, min_cluster_frac=1e-3
    )
    assert d[2].action == NEW  # 3 / 2003 >= 1e-3


def test_two_tiny_clients_sharing_a_new_subspace_are_not_merged():
    G, n = _two_live()
    far = _t(1, -1)
    toks, samples = [_t(1, 0), far, _t(0, 1), far], [1000, 1, 1000, 1]
    d, live = dko_assign(
        G, n, 2, [0, 1, 2, 3], tokens=toks, samples=samples, tau=0.9, min_cluster_frac=1e-3
    )
    assert [(x.subspace, x.action) for x in d] == [
        (0, MATCHED),
        (2, NEW),
        (1, MATCHED),
        (2, MATCHED),
    ]
    assert live == 3


def test_first_subspace_is_created_even_by_a_tiny_client():
    G, n = np.zeros((3, 2), np.float32), np.zeros(3)
    d, live = dko_assign(
        G,
        n,
        0,
        [0, 1],
        tokens=[_t(0, 1), _t(1, 0)],
        samples=[1, 5000],
        tau=0.9,
        min_cluster_frac=1e-3,
    )
    assert [(x.subspace, x.action) for x in d] == [(0, NEW), (1, NEW)]  # live == 0: as usual
    assert live == 2


def test_full_subspaces_leave_the_full_policy_in_charge():
    G, n = _two_live()
    G, n = G[:2].copy(), n[:2].copy()  # S_max = 2, both in use: no subspace would be created
    toks, samples = [_t(1, 0), _t(1, -1)], [5000, 1]
    d, live = dko_assign(
        G, n, 2, [0, 1], tokens=toks, samples=samples, tau=0.9, min_cluster_frac=1e-3
    )
    assert d[1].action == FULL and d[1].subspace == 0 and live == 2


@pytest.mark.parametrize("seed", range(40))
def test_zero_frac_is_bitwise_the_old_dko(seed):
    rng = np.random.default_rng(seed)
    s_max, dim = int(rng.integers(1, 6)), int(rng.integers(2, 6))
    live = int(rng.integers(0, s_max + 1))
    G = rng.standard_normal((s_max, dim)).astype(np.float32)
    G[live:] = 0
    counts = np.where(np.arange(s_max) < live, rng.integers(1, 50, s_max), 0).astype(np.float64)
    k = int(rng.integers(1, 9))
    clients = sorted(rng.choice(100, k, replace=False).tolist())
    toks = [rng.standard_normal(dim).astype(np.float32) for _ in range(k)]
    samples = rng.integers(1, 30, k).tolist()
    tau = float(rng.uniform(-0.2, 0.95))
    G1, c1, G2, c2 = G.copy(), counts.copy(), G.copy(), counts.copy()
    d1, l1 = dko_assign(
        G1, c1, live, clients, tokens=toks, samples=samples, tau=tau, min_cluster_frac=0.0
    )
    d2, l2 = dko_assign_v0(G2, c2, live, clients, toks, samples, tau, "nearest")
    assert l1 == l2 and G1.tobytes() == G2.tobytes() and c1.tobytes() == c2.tobytes()
    assert [(x.client, x.subspace, x.action) for x in d1] == [
        (x.client, x.subspace, x.action) for x in d2
    ]
    assert np.array_equal([x.similarity for x in d1], [x.similarity for x in d2], equal_nan=True)
    # a guard that finds no tiny singleton changes nothing either
    G3, c3 = G.copy(), counts.copy()
    d3, l3 = dko_assign(
        G3, c3, live, clients, tokens=toks, samples=samples, tau=tau, min_cluster_frac=1e-9
    )
    assert (
        l3 == l2
        and G3.tobytes() == G2.tobytes()
        and [x.action for x in d3] == [x.action for x in d2]
    )


def test_disco_passes_the_configured_fraction():
    def state():
        G, n = _two_live()
        return SimpleNamespace(tokens=G, token_counts=n, num_subspaces=2)

    toks, samples = [_t(1, 0), _t(0, 1), _t(1, -1)], [1000, 1000, 1]
    on = method_of(Disco, load_config(None, ["method.name=disco"]))
    assert on.settings.min_cluster_frac == 1e-3  # the reference code's default
    st = state()
    assert on.assign(st, [0, 1, 2], toks, samples)[2].action == SMALL and st.num_subspaces == 2
    off = method_of(Disco, load_config(None, ["method.min_cluster_frac=0"]))
    st = state()
    assert off.assign(st, [0, 1, 2], toks, samples)[2].action == NEW and st.num_subspaces == 3


@pytest.mark.parametrize("bad", ["1", "1.5", "-0.1", "x"])
def test_bad_fraction_is_a_config_error_naming_the_field(bad):
    with pytest.raises(ConfigError, match="method.min_cluster_frac"):
        load_config(None, [f"method.min_cluster_frac={bad}"])


def test_bad_fraction_exits_2():
    p = fcit("run", str(ROOT / "configs" / "smoke.yaml"), "method.min_cluster_frac=1")
    assert p.returncode == 2 and "method.min_cluster_frac" in p.stderr


# ------------------------------------------------------------------------- the metrics
def test_purity_formula():
    counts = np.array([[8, 2, 0], [0, 0, 5], [3, 3, 4], [0, 0, 0]], np.int64)
    per, weighted, plain = dko.purity(counts)
    np.testing.assert_allclose(per[:3], [0.8, 1.0, 0.4])
    assert np.isnan(per[3])  # no samples: no purity, and it counts in neither mean
    assert weighted == pytest.approx((8 + 5 + 4) / 25)
    assert plain == pytest.approx((0.8 + 1.0 + 0.4) / 3)
    assert dko.majority(counts).tolist() == [0, 2, 2, -1]
    assert dko.majority(np.array([[2, 2]])).tolist() == [0]  # ties: the lowest unit
    _, w, p = dko.purity(np.zeros((2, 3), np.int64))
    assert np.isnan(w) and np.isnan(p)


def test_gate_mass_formula():
    alpha = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    major = np.array([1, 0, 1])  # subspaces 0 and 2 are unit 1's, subspace 1 unit 0's
    np.testing.assert_allclose(dko.gate_mass(alpha, major, 1), [0.8, 0.9, 0.7])
    np.testing.assert_allclose(dko.gate_mass(alpha, major, 0), [0.2, 0.1, 0.3])
    np.testing.assert_allclose(dko.gate_mass(alpha, major, 2), [0, 0, 0])  # no subspace: 0
    np.testing.assert_allclose(dko.gate_mass(alpha, np.array([-1, 0, 1]), -1), [0, 0, 0])
    # overall: mean over the trained tasks with tests (task 2's unit has no samples yet)
    counts = np.array([[0, 5, 0], [4, 0, 0]])
    task_unit = np.array([0, 1, 2, 1])
    row = np.array([0.5, 0.9, 0.0, np.nan])  # task 3: no test samples
    assert dko.trained_tasks(counts, task_unit).tolist() == [True, True, False, True]
    assert dko.overall_gate_mass(row, counts, task_unit) == pytest.approx(0.7)


def test_stage_gate_mass_with_one_hot_tokens():
    tokens = np.eye(3, dtype=np.float32)[:2]  # two live subspaces
    counts = np.array([[9, 1], [0, 4], [0, 0]])  # S0: unit 0, S1: unit 1
    feats = [np.array([[1, 0, 0], [0, 1, 0]], np.float32), None]
    row = dko.stage_gate_mass(feats, tokens, counts, np.array([0, 1]), epsilon=0.05, mode="argmax")
    assert row[0] == pytest.approx(0.5) and np.isnan(row[1])
    row = dko.stage_gate_mass(
        feats, tokens[:0], counts, np.array([0, 1]), epsilon=0.05, mode="argmax"
    )
    assert row[0] == 0.0


def test_task_units_and_counts_from_client_records():
    assert dko.task_units([[0, 2], [1]], 4).tolist() == [0, 1, 0, -1]
    rows = np.zeros(4, CLIENT_DTYPE)
    rows["stage"] = [0, 0, 1, 1]
    rows["unit"] = [0, 1, 1, 1]
    rows["subspace"] = [0, 1, 1, -1]
    rows["samples"] = [3, 4, 5, 0]
    rows["status"] = [0, 0, 1, 3]  # the third is rejected (non-finite), the fourth a bad token
    assert dko.samples_from_clients(rows, 2, 2).tolist() == [[3, 0], [0, 4]]
    assert dko.samples_from_clients(rows, 2, 2, stage=0).tolist() == [[3, 0], [0, 4]]


# ----------------------------------------------------------------------------- the state
STAGES = [[0], [1]]  # two data units, one task each


def _state():
    st = RunState(
        config_yaml="seed: 0\n",
        adapter=np.zeros((3, 4), np.float32),
        tokens=np.ones((3, 2), np.float32),
        token_counts=np.zeros(3),
        accuracy=np.full((2, 2), np.nan),
        num_subspaces=2,
        method=dko.fresh("disco"),
    )
    rows = np.zeros(3, CLIENT_DTYPE)
    rows["unit"], rows["subspace"], rows["samples"] = [0, 1, 1], [0, 1, 0], [7, 5, 2**40]
    st.append_metrics(np.zeros(1, ROUND_DTYPE), rows)
    dko.init(st, "f", STAGES, 2)
    st.method.arrays["gate_mass"][0] = [0.25, np.nan]
    return st


def _load(run_dir):
    """What the server does with a stored state: read it, DISCO validates and prepares its own."""
    st = read_state(run_dir)
    disco, where = method_of(Disco, load_config(ROOT / "configs/smoke.yaml")), run_dir / STATE_FILE
    disco.validate_state(st.method, 4, where)
    disco.prepare_state(st, where, STAGES, 2)
    return st


def test_state_roundtrip_of_the_counts(tmp_path):
    st = _state()
    samples, task_unit, gate = dko.stored(st)
    assert samples.tolist() == [[7, 2**40], [0, 5], [0, 0]]
    write_state(tmp_path, st)
    with h5py.File(tmp_path / STATE_FILE) as f:  # DISCO's own group, nothing beside it
        assert set(f["method/disco"]) == {"samples", "task_unit", "gate_mass"} and "dko" not in f
    back = _load(tmp_path)
    b_samples, b_task_unit, b_gate = dko.stored(back)
    assert b_samples.dtype == np.int64 and b_samples.tobytes() == samples.tobytes()
    assert b_task_unit.tolist() == [0, 1] and b_gate.tobytes() == gate.tobytes()
    (tmp_path / "b").mkdir()
    write_state(tmp_path / "b", back)  # and once more: bitwise the same file content
    assert same_content(comparable_content(tmp_path), comparable_content(tmp_path / "b")) == []


def test_old_state_without_dko_loads_and_counts_come_from_the_client_records(tmp_path):
    st = _state()
    write_state(tmp_path, st)
    old = read_state(tmp_path)
    old.method = method_of(Disco, load_config(ROOT / "configs/smoke.yaml")).init_state(
        4
    )  # none stored
    dko.init(old, "f", STAGES, 2)
    assert dko.stored(old)[0].tobytes() == dko.stored(st)[0].tobytes()
    assert np.isnan(dko.stored(old)[2]).all()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda f: f.__delitem__("method/disco/task_unit"), "/method/disco arrays"),
        (lambda f: _replace(f, "samples", np.ones((2, 2), np.int64)), "/samples shape"),
        (lambda f: _replace(f, "samples", -np.ones((3, 2), np.int64)), "does not agree"),
        (lambda f: _replace(f, "samples", np.ones((3, 2))), "/samples is float64"),
        (lambda f: _replace(f, "task_unit", np.array([0, 2])), "/task_unit does not fit"),
        (lambda f: _replace(f, "gate_mass", np.zeros((1, 2))), "/gate_mass shape"),
    ],
)
def test_malformed_dko_is_refused_naming_the_file(tmp_path, edit, match):
    write_state(tmp_path, _state())
    with h5py.File(tmp_path / STATE_FILE, "a") as f:
        edit(f)
    with pytest.raises(StateError, match=match) as e:
        _load(tmp_path)
    assert str(tmp_path / STATE_FILE) in str(e.value)


def _replace(f, name, data):
    """Another well-formed dataset, with a valid checksum: DISCO's checks must refuse it."""
    import hashlib

    del f[f"method/disco/{name}"]
    d = f.create_dataset(f"method/disco/{name}", data=data)
    d.attrs["sha256"] = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def test_check_dko_refuses_counts_that_disagree_with_the_clients():
    st = _state()
    dko.stored(st)[0][0, 0] += 1
    with pytest.raises(StateError, match="does not agree with /metrics/clients"):
        dko.check(st, "state.h5", STAGES, 2)
    with pytest.raises(StateError, match="does not fit"):
        dko.check(_state(), "state.h5", [[0], [1], [0]], 2)
    old = _state()
    old.method = dko.fresh("disco")
    old.clients["unit"][0] = 5  # a foreign file: a unit the benchmark does not have
    with pytest.raises(StateError, match="state.h5: /metrics/clients holds data units"):
        dko.init(old, "state.h5", STAGES, 2)


# -------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cmp_run(tmp_path_factory):
    """configs/smoke.yaml as a comparison of Finetune and DISCO (one process)."""
    return smoke_serial(tmp_path_factory.mktemp("dko") / "cmp", "compare=[finetune,disco]")


def _lines(run, kind):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


@pytest.mark.slow
def test_smoke_run_holds_the_diagnostics(cmp_run):
    run = cmp_run / "disco" / "seed0"
    st = read_state(run)
    with h5py.File(run / STATE_FILE) as f:
        assert {"samples", "task_unit", "gate_mass"} == set(f["method/disco"])
    assert dko.stored(st)[0].shape == (4, 2) and st.num_subspaces == 2
    # independently, from the client records of metrics.jsonl: per subspace x unit samples
    counts = np.zeros((4, 2), np.int64)
    for r in _lines(run, "round"):
        for c in r["clients"]:
            if c["status"] == "accepted":
                counts[c["subspace"], c["unit"]] += c["samples"]
    assert counts.tolist() == dko.stored(st)[0].tolist()
    top, total = counts.max(1).sum(), counts.sum()
    summary = _lines(run, "summary")[-1]
    assert summary["purity"] == pytest.approx(top / total) == st.summary["purity"]
    recs = _lines(run, "dko")
    assert [r["stage"] for r in recs] == [0, 1]
    last = recs[-1]
    assert last["num_subspaces"] == 2 and last["units"] == ["add", "reverse"]
    assert [s["per_unit"] for s in last["subspaces"]] == counts[:2].tolist()
    assert last["purity"] == pytest.approx(top / total, abs=1e-4)
    assert set(last["gate_mass"]) == {"add", "reverse"}
    g = dko.stored(st)[2]
    assert not np.isnan(g).any() and ((g >= 0) & (g <= 1 + 1e-6)).all()
    assert summary["gate_mass"] == pytest.approx(g[-1].mean())
    assert last["gate_mass_mean"] == pytest.approx(g[-1].mean(), abs=1e-4)
    # stage 0 trained only "add": the mean is over that task alone
    assert recs[0]["gate_mass_mean"] == pytest.approx(g[0, 0], abs=1e-4)
    rep = (run / "report.md").read_text()
    assert "## DKO diagnostics" in rep and "| S1 |" in rep and "Gate mass on the right" in rep
    # the log regenerated from the state (what a resume does) has the same dko lines
    before = (run / "metrics.jsonl").read_text()
    method = method_of(Disco, config_from_yaml_text(st.config_yaml))
    MetricsLog(run / "rewritten.jsonl").rewrite(st, st.task_names, method)
    again = [json.loads(x) for x in (run / "rewritten.jsonl").read_text().splitlines()]
    assert [r for r in again if r["kind"] == "dko"] == recs
    assert (run / "metrics.jsonl").read_text() == before
    # Finetune reports nothing: no diagnostics, no summary entries, no dko lines, "–" in the table
    ft = cmp_run / "finetune" / "seed0"
    with h5py.File(ft / STATE_FILE) as f:
        assert "dko" not in f and "method" not in f
    assert "purity" not in read_state(ft).summary and _lines(ft, "dko") == []
    assert "DKO diagnostics" not in (ft / "report.md").read_text()
    table = (cmp_run / "comparison.md").read_text().splitlines()
    assert table[0].endswith("| subspaces | Purity | Gate mass |")
    ft_row = next(x for x in table if x.startswith("| Finetune"))
    disco_row = next(x for x in table if x.startswith("| DISCO"))
    assert ft_row.endswith("| 1 | – | – |")
    assert disco_row.endswith(f"| 2 | {top / total:.2f} | {summary['gate_mass']:.2f} |")


@pytest.mark.slow
def test_stop_and_resume_keeps_the_diagnostics_bitwise(cmp_run, tmp_path):
    ref = cmp_run / "disco" / "seed0"
    out = tmp_path / "stopped"
    stop = ["debug.kill_rank=0", "debug.kill_stage=1", "debug.kill_round=0"]
    p = fcit("run", str(ROOT / "configs" / "smoke.yaml"), "--out", str(out), *stop,
             "debug.kill_signal=TERM")  # fmt: skip
    assert p.returncode == 75, p.stderr[-3000:]
    assert dko.stored(read_state(out))[0].sum() > 0
    p = fcit("run", "--resume", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = comparable_content(ref), comparable_content(out)
    a = {k: v for k, v in a.items() if not k.startswith("/@config_yaml")}
    b = {k: v for k, v in b.items() if not k.startswith("/@config_yaml")}
    assert same_content(a, b) == []
    assert _lines(out, "dko") == _lines(ref, "dko")
