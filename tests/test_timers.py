"""Phase timers (fcit_hpc/timers.py): exclusive nesting, carving, the reduction over ranks, the
prefill/decode split of ``generate``, their place in metrics.jsonl / report.md / a resume's
rewritten log; scorer dependencies found at start-up; ``fcit plan``'s arithmetic."""

import json
import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from fcit_hpc import timers
from fcit_hpc.benchmark import scorers
from fcit_hpc.config import load_config
from fcit_hpc.errors import DependencyError
from fcit_hpc.fed.server.metrics_log import MetricsLog
from fcit_hpc.state.schema import read_state

from .conftest import ROOT


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(timers.time, "perf_counter", c)
    timers.reset()
    return c


def _sections(cfg):
    """What the scorer check reads of a config: its benchmark and eval sections."""
    return cfg.benchmark, cfg.eval


def test_nested_phases_are_exclusive_and_add_up(clock):
    t = timers.timer()
    with timers.phase("eval"):
        clock.t += 1.0
        with timers.phase("autotune"):
            clock.t += 2.5
        clock.t += 0.5
        t.carve("eval_decode", 0.25)  # a split measured inside: out of eval, into decode
    with timers.phase("train"):
        clock.t += 4.0
    v = timers.take()
    got = dict(zip(timers.PHASES, v[: len(timers.PHASES)], strict=True))
    assert got["autotune"] == 2.5
    assert got["eval"] == 1.0 + 0.5 - 0.25
    assert got["eval_decode"] == 0.25
    assert got["train"] == 4.0
    assert v[-1] == 8.0  # wall since reset: the phases cover all of it
    assert sum(got.values()) == v[-1]
    assert not timers.take()[: len(timers.PHASES)].any()  # taken: zeroed


def test_timers_are_per_thread():
    """A ThreadComm world's ranks are threads: each keeps its own seconds."""
    seen = {}

    def rank(r):
        timers.reset()
        with timers.phase("train"):
            time.sleep(0.01 * (r + 1))
        seen[r] = timers.take()[timers.INDEX["train"]]

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert 0.01 <= seen[0] < seen[1]


def test_reduce_ranks_is_sum_and_max_per_phase():
    rng = np.random.default_rng(0)
    n = len(timers.PHASES) + len(timers.COUNTERS) + len(timers.GAUGES) + 1
    per_rank = [rng.uniform(0, 3, n) for _ in range(3)]
    per_rank[1][timers.INDEX["report"]] = 0.0
    for v in per_rank:
        v[timers.INDEX["aggregate"]] = 0.0  # no rank spent time there: left out
    got = timers.reduce_ranks(per_rank)
    m = np.stack(per_rank)
    for name in ("train", "eval_decode"):
        i = timers.INDEX[name]
        assert got[name]["sum"] == pytest.approx(m[:, i].sum(), abs=1e-4)
        assert got[name]["max"] == pytest.approx(m[:, i].max(), abs=1e-4)
    assert "aggregate" not in got
    assert got["wall"] == pytest.approx(per_rank[0][-1], abs=1e-4)  # rank 0's
    assert got["prefill_tokens"] == int(m[:, len(timers.PHASES)].sum())
    gauge = len(timers.PHASES) + len(timers.COUNTERS)  # peak memory: every rank's, in order
    assert got["peak_rss_mib"] == [round(float(x), 1) for x in m[:, gauge]]
    assert got["rss_mib"] == [round(float(x), 1) for x in m[:, gauge + 1]]
    tot = timers.totals([got, got])
    assert tot["train"]["max"] == pytest.approx(2 * got["train"]["max"])


def test_combine_adds_times_and_keeps_the_later_gauges():
    n = len(timers.PHASES) + len(timers.COUNTERS) + len(timers.GAUGES) + 1
    a, b = np.arange(n, dtype=np.float64), np.full(n, 10.0)
    got = timers.combine(a, b)
    g = len(timers.PHASES) + len(timers.COUNTERS)
    np.testing.assert_array_equal(got[:g], a[:g] + 10)
    np.testing.assert_array_equal(got[g : g + len(timers.GAUGES)], 10.0)  # a level, not a sum
    assert got[-1] == a[-1] + 10


def test_memory_gauges_are_the_process_peak_and_current_rss():
    """The gauges against an independent reading (/proc's VmHWM, VmRSS, Linux); in a small fresh
    process, 200 MiB touched raise the peak by as much, and once freed leave the peak where it
    is while the current RSS falls back."""
    import re
    from pathlib import Path

    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc on this system (the gauges read getrusage there)")

    def vm(key: str) -> float:
        return int(re.search(rf"{key}:\s+(\d+) kB", status.read_text()).group(1)) / 1024

    gauge = len(timers.PHASES) + len(timers.COUNTERS)
    v = timers.take()
    assert v[gauge] == pytest.approx(vm("VmHWM"), abs=2.0)
    assert v[gauge + 1] == pytest.approx(vm("VmRSS"), abs=8.0)
    code = (
        "import importlib.util as u, sys, numpy as np; s = u.spec_from_file_location('t', "
        "sys.argv[1]); t = u.module_from_spec(s); s.loader.exec_module(t); g = len(t.PHASES) + "
        "len(t.COUNTERS); a = t.take()[g : g + 2]; b = np.ones(200 << 17); c = t.take()[g : g "
        "+ 2]; del b; d = t.take()[g : g + 2]; print(*a, *c, *d)"
    )
    cmd = [sys.executable, "-c", code, timers.__file__]  # the module alone: no torch import peak
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    peak0, _, peak1, rss1, peak2, rss2 = map(float, out.stdout.split())
    assert 195 <= peak1 - peak0 <= 230 and peak2 == pytest.approx(peak1, abs=1.0)
    assert rss1 - rss2 >= 190  # freed: the current RSS falls, the peak stays


def test_generation_clock_splits_prefill_and_decode():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 40, (3, 7))
    timers.reset()
    t0 = time.perf_counter()
    with timers.phase("eval"):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            streamer=timers.GenerationClock(),
        )
    elapsed = time.perf_counter() - t0
    v = timers.take()
    rec = timers.reduce_ranks([v])
    steps = out.shape[1] - ids.shape[1]
    assert steps == 5
    assert rec["prefill_tokens"] == 3 * 7  # the prompt positions
    assert rec["decode_tokens"] == 3 * (steps - 1)  # the first token comes with the prefill
    pre, dec = v[timers.INDEX["eval_prefill"]], v[timers.INDEX["eval_decode"]]
    assert pre > 0 and dec > 0
    assert pre + dec + v[timers.INDEX["eval"]] == pytest.approx(elapsed, abs=5e-3)


def _lines(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_records_its_phases(serial_run, tmp_path):
    rows = _lines(serial_run)
    rounds = [r for r in rows if r["kind"] == "round"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert rounds and evals
    for r in rounds + evals:
        ph = r["phases"]
        covered = sum(v["max"] for v in ph.values() if isinstance(v, dict))
        # one rank: the phases are exclusive slices of the record's wall time
        assert covered <= ph["wall"] + 1e-3
    for r in rounds:
        ph = r["phases"]
        assert {"train", "setup", "identity", "aggregate", "state_write"} <= set(ph)
        assert r["seconds"] <= ph["wall"] + 1e-3  # the round's own clock lies inside
    assert "startup" in rounds[0]["phases"]
    for r in evals:
        assert {"eval_prefill", "eval_decode"} <= set(r["phases"])
        assert r["phases"]["prefill_tokens"] > 0
    rep = (serial_run / "report.md").read_text()
    assert "## Where the time went (phase timers)" in rep and "| eval_decode |" in rep
    assert "evaluation's share of the wall time" in rep
    # a resume regenerates the log from the state: the phases of the stored rounds stay
    copy = tmp_path / "metrics.jsonl"
    copy.write_text((serial_run / "metrics.jsonl").read_text())
    st = read_state(serial_run)
    MetricsLog(copy).rewrite(st, st.task_names)
    again = [json.loads(x) for x in copy.read_text().splitlines()]
    assert [r for r in again if r["kind"] in ("round", "eval")] == [
        r for r in rows if r["kind"] in ("round", "eval")
    ]


def test_missing_caption_scorer_is_found_at_start(monkeypatch, tmp_path):
    import importlib.util
    import shutil

    from fcit_hpc.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pycocoevalcap" else real(name, *a),
    )
    out = tmp_path / "run"
    cfg = str(ROOT / "configs/default.yaml")
    assert main(["run", cfg, "--out", str(out)]) == 2
    assert not out.exists()  # nothing written
    with pytest.raises(DependencyError, match="Flickr30k.*pycocoevalcap"):
        scorers.check_scorers(*_sections(load_config(cfg)))
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no Java
    with pytest.raises(DependencyError, match="Flickr30k.*Java.*caption_meteor=skip"):
        scorers.check_scorers(*_sections(load_config(cfg)))
    scorers.check_scorers(
        *_sections(load_config(cfg, ["eval.caption_meteor=skip"]))
    )  # opted out: fine
    scorers.check_scorers(
        *_sections(load_config(str(ROOT / "configs/smoke.yaml")))
    )  # synthetic: exact


def test_caption_score_without_meteor_is_the_mean_of_the_rest():
    pytest.importorskip("pycocoevalcap")
    preds = ["a red square on a blue circle", "two shapes"]
    refs = [["a red square above a blue circle"], ["two green shapes stacked"]]
    got = scorers.caption_scores(preds, refs, meteor="skip")
    assert "METEOR" not in got
    rest = [v for k, v in got.items() if k != "mean"]
    assert len(rest) == 6 and got["mean"] == pytest.approx(sum(rest) / 6)
    assert scorers.score("caption", preds, refs, meteor="skip") == got["mean"]


# ------------------------------------------------------------------------------------ fcit plan
def test_plan_matches_a_hand_computation():
    from fcit_hpc.plan import Figures, plan

    cfg = load_config(str(ROOT / "configs/smoke.yaml"))
    fig = Figures()
    vals = dict(
        startup_s=3.0,
        setup_s_per_client=0.5,
        train_s_per_sample=0.1,
        identity_s_per_sample=0.01,
        round_fixed_s=0.2,
        prefill_s_per_position=0.001,
        decode_s_per_token=0.02,
        eval_other_s_per_sample=0.05,
        eval_fixed_s=0.7,
        eval_identity_s_per_sample=0.03,
        prompt_positions_per_sample=30.0,
        decode_tokens_per_sample=4.0,
    )
    for k, v in vals.items():
        fig.set(k, v, "test")
    p = plan(cfg, 2, fig)
    # smoke: 2 tasks = 2 stages, 2 rounds, 10 clients x 0.3 = 3 per round, 40 samples a task
    # over 10 clients = 4 each, 1 epoch; 2 ranks both host clients: 2 on the busiest; 2 x 4 tests
    client = 0.5 + 4 * 1 * 0.1 + 4 * 0.01
    train = 2 * 2 * (2 * client + 0.2)
    ev = 2 * (math.ceil(8 / 2) * (30 * 0.001 + 4 * 0.02 + 0.05 + 0.03) + 0.7)
    assert p["wall_s"] == pytest.approx(3.0 + train + ev)
    (run,) = p["runs"]
    assert run["seconds"]["train"] == pytest.approx(train)
    assert run["seconds"]["eval"] == pytest.approx(ev)
    assert p["figures"]["train_s_per_sample"] == {"value": 0.1, "source": "test"}
    assert p["figures"]["train_samples_per_task"]["source"] == "default"
    # Finetune uploads no identity token: no identity costs, no token bytes
    ft = plan(load_config(str(ROOT / "configs/smoke.yaml"), ["method.name=finetune"]), 2, fig)
    client_ft = 0.5 + 4 * 1 * 0.1
    assert ft["runs"][0]["seconds"]["train"] == pytest.approx(2 * 2 * (2 * client_ft + 0.2))


def test_plan_bytes_match_a_measured_run(serial_run):
    """The wire model against what the smoke run counted (metrics: bytes_sent / bytes_recv)."""
    from fcit_hpc.plan import Figures, predict_bytes

    st = read_state(serial_run)
    cfg = load_config(str(ROOT / "configs/smoke.yaml"))
    got = predict_bytes(cfg, Figures())
    assert got["up"] == pytest.approx(int(st.rounds["bytes_sent"].sum()), rel=0.03)
    assert got["down"] == pytest.approx(int(st.rounds["bytes_recv"].sum()), rel=0.03)


def test_plan_reads_figures_and_rejects_bad_input(serial_run, tmp_path, capsys):
    from fcit_hpc.cli import main
    from fcit_hpc.plan import load_figures

    fig = load_figures([str(serial_run)])
    assert fig.source["train_s_per_sample"].endswith("(phase timers)")
    bench = tmp_path / "train.json"
    bench.write_text(
        json.dumps(
            {"tokens_per_step": 512, "batch_size": 4, "fcit": {"step_s": 0.2, "setup_next_s": 0.3}}
        )
    )
    fig = load_figures([str(serial_run), str(bench)])  # later wins
    assert fig["train_s_per_sample"] == pytest.approx(0.05)
    assert fig.source["setup_s_per_client"] == str(bench)
    smoke = str(ROOT / "configs/smoke.yaml")
    assert main(["plan", smoke, "--gpus", "2", "--figures", str(serial_run)]) == 0
    text = capsys.readouterr().out
    assert "predicted wall time" in text and "(phase timers)" in text
    (tmp_path / "x.json").write_text("{}")
    assert main(["plan", smoke, "--figures", str(tmp_path / "x.json")]) == 2
    assert main(["plan", smoke, "--figures", str(tmp_path / "none")]) == 2
    assert main(["plan", smoke, "--gpus", "0"]) == 2


def test_plan_of_the_7b_task_config_on_gpus_uses_the_h200_figures():
    from fcit_hpc.plan import load_figures, lora_numel, model_dims, plan

    over = ["method.encoder_path=x", "benchmark.data_root=x", "model.path=configs/hf/llava-1.5-7b"]
    cfg = load_config(str(ROOT / "configs/llava15_7b_task.yaml"), over)
    fig = load_figures([], cfg)
    assert fig.source["train_s_per_sample"].startswith("GPU-NOTES.md")
    assert fig["train_s_per_sample"] == pytest.approx(704 / (11452 * 4))  # 4 GPUs a client
    p = plan(cfg, 8, fig)
    # LLaVA-1.5-7B: 32 layers, hidden 4096, FFN 11008; r = 8 on gate/up/down
    assert lora_numel(cfg, model_dims(cfg)) == 8 * 3 * (4096 + 11008) * 32
    n = 8 * 10 * 5  # stages x rounds x clients
    down = 4 * 8 * (8 * 3 * (4096 + 11008) * 32 + 768)  # S_max subspaces + CLIP tokens
    assert p["runs"][0]["bytes"]["down"] == n * down
