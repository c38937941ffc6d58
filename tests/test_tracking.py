"""Experiment logging: the TensorBoard event files, read with TensorBoard's own reader, hold
exactly the numbers of metrics.jsonl; a restart writes them afresh from the log; a tracker
switched on and not installed is a config error naming the field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fcit_hpc.config import load_config
from fcit_hpc.errors import ConfigError
from fcit_hpc.fed.server.tracking import TENSORBOARD_DIR, Trackers, check_trackers, scalars

from .conftest import ROOT


def read_events(run_dir: Path) -> dict[tuple[str, int], float]:
    """(tag, step) → value of every scalar in RUN_DIR/tensorboard, by TensorBoard's reader."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(
        str(run_dir / TENSORBOARD_DIR), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        for ev in acc.Tensors(tag):
            assert (tag, ev.step) not in out, f"{tag} step {ev.step} written twice"
            out[(tag, ev.step)] = tensor_util.make_ndarray(ev.tensor_proto).item()
    return out


def assert_events_equal_metrics(run_dir: Path, rounds: int) -> None:
    """Every number of metrics.jsonl (nested dicts flattened under the line's kind; round lines
    at step stage·rounds + round, other lines at their stage) is an event of the same value,
    and there is no other event."""
    want = {}
    for text in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(text)
        kind, stage = rec["kind"], rec["stage"]
        step = stage * rounds + rec["round"] if kind == "round" else stage
        stack = [(kind, rec)]
        while stack:
            prefix, obj = stack.pop()
            for k, v in obj.items():
                if k in ("kind", "stage", "round"):
                    continue
                if isinstance(v, dict):
                    stack.append((f"{prefix}/{k}", v))
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    want[(f"{prefix}/{k}", step)] = float(v)
    got = read_events(run_dir)
    assert set(got) == set(want)
    for key, v in want.items():
        assert got[key] == v or (math.isnan(v) and math.isnan(got[key])), key


def test_scalars_of_a_line():
    rec = {
        "kind": "round",
        "stage": 2,
        "round": 1,
        "loss": 0.5,
        "ok": True,
        "clients": [{"a": 1}],
        "phases": {"wall": 3, "train": {"sum": 1.5}},
        "epsilon": float("nan"),
    }
    step, vals = scalars(rec, 10)
    assert step == 21
    assert vals.keys() == {
        "round/loss",
        "round/phases/wall",
        "round/phases/train/sum",
        "round/epsilon",
    }
    assert scalars({"kind": "eval", "stage": 3, "accuracy": {"a": 0.25}}, 10) == (
        3,
        {"eval/accuracy/a": 0.25},
    )


def test_restart_writes_the_events_afresh(tmp_path):
    cfg = load_config(None, ["log.tensorboard=true"])
    lines = [
        json.dumps({"kind": "round", "stage": 0, "round": r, "loss": 1.0 / (r + 1)})
        for r in range(3)
    ]
    t = Trackers(cfg.log, tmp_path, 3)
    t.restart(lines[:1])
    t.line(lines[1])
    t.line(lines[2])  # a round a kill lost: the resumed run's log does not have it
    t.close()
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n")
    t = Trackers(cfg.log, tmp_path, 3)
    t.restart(lines[:2])
    t.close()
    assert read_events(tmp_path) == {("round/loss", 0): 1.0, ("round/loss", 1): 0.5}
    assert_events_equal_metrics(tmp_path, 3)


@pytest.mark.parametrize("field", ["mlflow", "wandb"])
def test_a_tracker_not_installed_is_a_config_error(field):
    import importlib.util

    if importlib.util.find_spec(field) is not None:
        pytest.skip(f"{field} is installed here: nothing to refuse")
    with pytest.raises(ConfigError, match=f"log.{field}: true, but the package"):
        check_trackers(load_config(None, [f"log.{field}=true"]).log)
    check_trackers(load_config(None).log)  # all off: nothing needed


@pytest.mark.slow
def test_fcit_run_refuses_before_writing_anything(tmp_path):
    import importlib.util

    from .conftest import fcit

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    out = tmp_path / "run"
    p = fcit("run", str(ROOT / "configs/smoke.yaml"), "--out", str(out), "log.mlflow=true")
    assert p.returncode == 2 and "log.mlflow: true, but the package 'mlflow'" in p.stderr
    assert not out.exists()
