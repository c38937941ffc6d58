"""The LLaVA multimodal projector trained beside LoRA (train.projector_lr) and averaged by the
server: aggregation, state, resume, world-size invariance, PEFT export, precision."""

import numpy as np
import pytest
import torch

from fcit_hpc.config import load_config
from fcit_hpc.errors import StateError
from fcit_hpc.fed.server.aggregate import RoundInfo, aggregate_round
from fcit_hpc.fed.strategies import strategy_from_config
from fcit_hpc.fed.wire import pack_updates, unpack_updates
from fcit_hpc.model.build import build_model
from fcit_hpc.model.projector import get_projector, projector_params
from fcit_hpc.run import run_model
from fcit_hpc.state.schema import RunState, comparable_content, read_state, same_content

from .conftest import ROOT, fcit, mpiexec

MINI = str(ROOT / "configs/smoke_mini.yaml")
FCIT = str(ROOT / ".venv/bin/fcit")


def test_projector_is_the_sample_weighted_mean_of_client_projectors():
    numel = 3
    st = RunState(
        "",
        np.zeros((2, numel), np.float32),
        np.zeros((2, 1), np.float32),
        np.zeros(2),
        accuracy=np.zeros((1, 1)),
        num_subspaces=2,
        projector=np.array([1.0, -1.0], np.float32),
    )
    # three clients, two subspaces: every accepted client's projector counts, whatever its
    # subspace; a rejected one (NaN) does not
    deltas = [
        np.array([1, 1, 1, 0.5, 0.0], np.float32),  # client 0, subspace 0, 10 samples
        np.array([2, 2, 2, -0.25, 1.0], np.float32),  # client 1, subspace 1, 30 samples
        np.array([9, 9, 9, np.nan, 7.0], np.float32),  # client 2, rejected
    ]
    rows = [(0, 0, 10, 1.0, 0.1, 1), (1, 1, 30, 1.0, 0.1, 1), (2, 1, 5, 1.0, 0.1, 1)]
    head, body = pack_updates(rows, deltas)
    updates = unpack_updates([head], [body])
    plan = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]], np.int64)
    info = RoundInfo(0, 0, plan, {}, token_bytes={}, bytes_down=0)
    strategy = strategy_from_config(load_config(None).federation)
    st.server_opt = strategy.init_state(st.adapter.shape)
    agg = aggregate_round(st, updates, strategy, info)
    want = np.array([1.0 + (10 * 0.5 + 30 * -0.25) / 40, -1.0 + (10 * 0.0 + 30 * 1.0) / 40])
    np.testing.assert_allclose(st.projector, want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(st.adapter[0], [1, 1, 1])  # the subspaces as before
    np.testing.assert_allclose(st.adapter[1], [2, 2, 2])
    assert agg.client_rows["status"].tolist() == [0, 0, 1]  # NON_FINITE


def test_a_short_update_without_its_projector_is_rejected():
    st = RunState(
        "",
        np.zeros((1, 3), np.float32),
        np.zeros((1, 1), np.float32),
        np.zeros(1),
        accuracy=np.zeros((1, 1)),
        num_subspaces=1,
        projector=np.zeros(2, np.float32),
    )
    head, body = pack_updates([(0, 0, 4, 1.0, 0.1, 1)], [np.ones(3, np.float32)])
    strategy = strategy_from_config(load_config(None).federation)
    st.server_opt = strategy.init_state(st.adapter.shape)
    info = RoundInfo(0, 0, np.array([[0, 0, 0]], np.int64), {}, token_bytes={}, bytes_down=0)
    agg = aggregate_round(st, unpack_updates([head], [body]), strategy, info)
    assert agg.client_rows["status"].tolist() == [2]  # WRONG_SHAPE
    assert not st.projector.any()


def test_bf16_model_keeps_a_float32_projector():
    from fcit_hpc.runtime import LaunchInfo, make_runtime

    cfg = load_config(MINI, ["train.precision=bf16"])
    rt = make_runtime(cfg.train, cfg.federation, 0, 1, launch=LaunchInfo())
    model, _, tok = run_model(cfg, 2, rt)
    assert all(p.dtype == torch.float32 for p in projector_params(model))
    assert model.model.language_model.layers[0].mlp.gate_proj.base.weight.dtype == torch.bfloat16
    ids = torch.tensor([tok.prompt("What is this?")])
    out = model(input_ids=ids, pixel_values=torch.zeros(1, 3, tok.image_size, tok.image_size))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


@pytest.mark.mpi
def test_trained_projector_world_size_resume_and_export(tmp_path):
    """A serial run against a 2-rank run killed mid-way and resumed: the same state bitwise,
    projector included; the projector moved; the PEFT export carries it."""
    serial = tmp_path / "serial"
    p = fcit("run", MINI, "--out", str(serial))
    assert p.returncode == 0, p.stderr[-3000:]
    st = read_state(serial)
    cfg = load_config(serial / "config.yaml")
    model, _, _ = build_model(cfg.model, cfg.lora, 8)
    start = get_projector(model).numpy()
    assert st.projector.shape == start.shape and st.projector.size > 0
    assert np.abs(st.projector - start).max() > 1e-5  # trained (lr 2e-5 over a few steps)

    out = tmp_path / "killed"
    kill = ["debug.kill_rank=1", "debug.kill_stage=2", "debug.kill_round=0"]
    p = mpiexec(2, FCIT, "run", MINI, "--out", str(out), *kill, timeout=300)
    assert p.returncode != 0
    assert not read_state(out).done  # stopped part-way
    p = mpiexec(2, FCIT, "run", "--resume", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_content(comparable_content(serial), comparable_content(out)) == []

    e = fcit("export", str(out), "--out", str(tmp_path / "ad"))
    assert e.returncode == 0, e.stderr[-2000:]
    from peft import PeftModel

    from fcit_hpc.model.build import build_base_model

    pm = PeftModel.from_pretrained(build_base_model(cfg.model), str(tmp_path / "ad" / "subspace_0"))
    merged = pm.merge_and_unload()
    np.testing.assert_array_equal(get_projector(merged).numpy(), st.projector)


def test_state_with_a_projector_of_the_wrong_size_is_refused():
    from fcit_hpc.fed.server.run_state import check_state
    from fcit_hpc.methods import make_method

    cfg = load_config(MINI)
    method = make_method(cfg.method, cfg.lora)
    st = RunState(
        "",
        np.zeros((method.num_slots(), 5), np.float32),
        np.zeros((8, 1), np.float32),
        np.zeros(8),
        accuracy=np.zeros((1, 1)),
        projector=np.zeros(3, np.float32),
        method=method.init_state(5),  # the method's own state fits: the projector is what does not
    )
    with pytest.raises(StateError, match="/global/projector has 3 values"):
        check_state(st, method, 5, "x/state.h5", projector_numel=7)
