"""The runtime (device, dtype, client groups, launcher environment) and the device and precision
paths of the local trainers, on the CPU."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fcit_hpc.benchmark.synthetic import make_split
from fcit_hpc.config import load_config
from fcit_hpc.data.batches import make_batches
from fcit_hpc.errors import ConfigError
from fcit_hpc.model.build import build_model
from fcit_hpc.run import run_model
from fcit_hpc.runtime import LaunchInfo, client_groups, launch_info, make_runtime
from fcit_hpc.train.base import LocalOpt, Shard, target_tokens, token_loss_sum
from fcit_hpc.train.torch_trainer import TorchTrainer

from .conftest import fcit

# --- launcher environment ------------------------------------------------------------------------


def test_launch_info_open_mpi():
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "SLURM_PROCID": "0",  # Open MPI's own variables win under srun too
        "SLURM_LOCALID": "0",
    }
    assert launch_info(env) == LaunchInfo(5, 8, 1, 4, launcher="openmpi")


def test_launch_info_mpich_hydra():
    env = {"PMI_RANK": "3", "PMI_SIZE": "6", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "3"}
    assert launch_info(env) == LaunchInfo(3, 6, 0, 3, launcher="mpich")


@pytest.mark.parametrize(
    "spec,node,local_size", [("4", 0, 4), ("2(x3),1", 2, 2), ("2(x3),1", 3, 1), ("3,1(x2)", 2, 1)]
)
def test_launch_info_slurm_tasks_per_node(spec, node, local_size):
    env = {
        "SLURM_PROCID": "7",
        "SLURM_NTASKS": "7",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(node),
        "SLURM_STEP_TASKS_PER_NODE": spec,
        "SLURM_TASKS_PER_NODE": "99",  # the step's list is the one that counts
    }
    assert launch_info(env) == LaunchInfo(7, 7, 0, local_size, launcher="slurm")


def test_launch_info_plain_process_and_bad_values():
    assert launch_info({}) == LaunchInfo(0, 1, 0, 1, launcher="none")
    bad = {"PMI_RANK": "x", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"}
    with pytest.raises(ValueError, match="PMI_RANK"):
        launch_info(bad)
    with pytest.raises(ValueError, match="tasks-per-node"):
        launch_info({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2(y3)"})


# --- client groups -------------------------------------------------------------------------------


def test_client_groups_split_worker_ranks_in_order():
    assert [g.ranks for g in client_groups(4, 2, True)] == [(0, 1), (2, 3)]
    assert [g.leader for g in client_groups(4, 2, True)] == [0, 2]
    assert [g.ranks for g in client_groups(5, 2, False)] == [(1, 2), (3, 4)]  # rank 0 serves
    assert [g.ranks for g in client_groups(3, 1, True)] == [(0,), (1,), (2,)]
    assert [g.ranks for g in client_groups(1, 1, False)] == [(0,)]
    with pytest.raises(ConfigError, match="train.gpus_per_client: 2 does not divide the 3"):
        client_groups(3, 2, True)
    with pytest.raises(ConfigError, match="rank 0 only serves"):
        client_groups(4, 2, False)


def test_plan_deals_clients_to_group_leaders():
    from fcit_hpc.fed.server.plan import plan_round

    class Sched:
        def unit_of(self, stage, round_, j):
            return stage

    cfg = load_config(None, ["federation.num_clients=10", "federation.client_selection_frac=0.5"])
    one = plan_round(cfg.federation, Sched(), seed=cfg.seed, stage=0, round_=0, world=4)
    cfg2 = load_config(
        None,
        ["federation.num_clients=10", "federation.client_selection_frac=0.5"]
        + ["train.gpus_per_client=2"],
    )
    two = plan_round(
        cfg2.federation, Sched(), seed=cfg2.seed, stage=0, round_=0, world=4, gpus_per_client=2
    )
    assert np.array_equal(one[:, :2], two[:, :2])  # the same clients and units
    assert one[:, 2].tolist() == [0, 1, 2, 3, 0] and two[:, 2].tolist() == [0, 2, 0, 2, 0]


# --- runtime -------------------------------------------------------------------------------------


def test_runtime_on_the_cpu():
    cfg = load_config(None, ["train.precision=bf16", "train.gpus_per_client=2"])
    rt = make_runtime(
        cfg.train, cfg.federation, 3, 4, launch=LaunchInfo(3, 4, 3, 4, launcher="openmpi")
    )
    assert rt.device == torch.device("cpu") and rt.dtype == torch.bfloat16
    assert rt.group.ranks == (2, 3) and not rt.is_leader and rt.leaders == [0, 2]
    assert rt.dist_backend == "gloo"
    rt0 = make_runtime(
        cfg.train, cfg.federation, 2, 4, launch=LaunchInfo(2, 4, 2, 4, launcher="openmpi")
    )
    assert rt0.is_leader


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error(tmp_path):
    cfg = load_config(None, ["train.device=cuda"])
    with pytest.raises(ConfigError, match="train.device: 'cuda' was asked for"):
        make_runtime(cfg.train, cfg.federation, 0, 1, launch=LaunchInfo())
    out = tmp_path / "run"
    p = fcit("run", "configs/smoke.yaml", "--out", str(out), "train.device=cuda")
    assert p.returncode == 2 and "train.device" in p.stderr, p.stderr[-2000:]
    assert not out.exists()  # nothing written


def test_bad_precision_names_the_field():
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="train.device"):
        load_config(None, ["train.device=tpu"])


# --- the loss of a client group ------------------------------------------------------------------


def _setup(*overrides):
    cfg = load_config(None, ["lora.lora_dropout=0.0", "lora.max_subspaces=2", *overrides])
    model, adapter, tok = build_model(cfg.model, cfg.lora, 2)
    start = adapter.init_vector(torch.Generator().manual_seed(0)).numpy()
    start[-adapter.layers[-1].lora_B[0].numel() :] = 0.01
    samples = make_split(1, 20, 0, "train")
    batches = make_batches(
        tok, samples, 4, 48, epochs=1, generator=torch.Generator().manual_seed(1)
    )
    return cfg, model, adapter, start, batches


@pytest.mark.parametrize("size", [2, 3, 5])
def test_group_shares_sum_to_the_batch_mean_loss(size):
    _, model, _, _, batches = _setup()
    batch = batches[0]  # 4 rows: with 5 members one of them has none (weight 0)
    ref = model(**batch).loss.double()  # Hugging Face's own mean token loss
    total = target_tokens(batch["labels"])
    parts = []
    for m in range(size):
        part, w = Shard(m, size).take(batch)
        labels = part.pop("labels")
        parts.append(token_loss_sum(model(**part).logits, labels).double() * w / total)
    assert float(sum(parts)) == pytest.approx(float(ref), rel=1e-6)


# --- precision -----------------------------------------------------------------------------------


def _runtime(cfg):
    return make_runtime(cfg.train, cfg.federation, 0, 1, launch=LaunchInfo())


def test_bf16_base_trains_float32_lora_close_to_fp32():
    opt = LocalOpt(lr=5e-3, weight_decay=0.0, warmup_ratio=0.2)
    cfg, model, adapter, start, batches = _setup()
    ref = TorchTrainer().train(model, adapter, 1, start, batches=batches, opt=opt)
    cfg16, model16, adapter16, start16, _ = _setup("train.precision=bf16")
    rt = _runtime(cfg16)
    model16, adapter16, _ = run_model(cfg16, 2, rt)
    assert model16.model.layers[0].mlp.gate_proj.base.weight.dtype == torch.bfloat16
    assert adapter16.params(1)[0].dtype == torch.float32  # fp32 master weights
    res = TorchTrainer(rt).train(model16, adapter16, 1, start, batches=batches, opt=opt)
    d_ref, d16 = ref.vector - start, res.vector - start
    assert np.abs(d_ref).max() > 1e-3
    # bf16 activations (8-bit mantissa): the update agrees in direction and size, not bitwise
    cos = float(d_ref @ d16 / np.linalg.norm(d_ref) / np.linalg.norm(d16))
    assert cos > 0.97 and abs(np.linalg.norm(d16) / np.linalg.norm(d_ref) - 1) < 0.1
    assert res.loss == pytest.approx(ref.loss, rel=0.02)


def test_fp16_trains_with_a_gradient_scaler():
    opt = LocalOpt(lr=5e-3, weight_decay=0.0, warmup_ratio=0.2)
    cfg, model, adapter, start, batches = _setup()
    ref = TorchTrainer().train(model, adapter, 1, start, batches=batches, opt=opt)
    cfg16 = load_config(None, ["lora.lora_dropout=0.0", "train.precision=fp16"])
    rt = _runtime(cfg16)
    model16, adapter16, _ = run_model(cfg16, 2, rt)
    res = TorchTrainer(rt).train(model16, adapter16, 1, start, batches=batches, opt=opt)
    d_ref, d16 = ref.vector - start, res.vector - start
    cos = float(d_ref @ d16 / np.linalg.norm(d_ref) / np.linalg.norm(d16))
    assert np.isfinite(res.vector).all() and cos > 0.97


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_bf16_keeps_float32_masters(stage):
    """The engine casts the module to bf16; the client's start reaches the optimizer's float32
    masters exactly, and the result is read from them. Afterwards the adapter is float32 again
    and holds the result (ZeRO-3: the module is whole and plain again)."""
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer

    cfg = load_config(None, ["lora.lora_dropout=0.0", "train.precision=bf16"])
    rt = _runtime(cfg)
    _, _, _, start, batches = _setup()
    model, adapter, _ = run_model(cfg, 2, rt)
    from fcit_hpc.train.ds_trainer import init_single_process_world

    init_single_process_world(0)
    trainer = DeepSpeedTrainer(stage, False, 4, runtime=rt)
    # lr 0: nothing moves, so the result is the start — exactly, not rounded to bf16
    still = trainer.train(model, adapter, 1, start, batches=batches, opt=LocalOpt(0.0, 0.0, 0.0))
    np.testing.assert_array_equal(still.vector, start)
    assert {p.dtype for p in adapter.params(0) + adapter.params(1)} == {torch.float32}
    assert model.model.layers[0].mlp.gate_proj.base.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(adapter.get(1).numpy(), start)
    rounded = torch.tensor(start).to(torch.bfloat16).float().numpy()
    assert not np.array_equal(rounded, start)  # the test can tell the two apart
    opt = LocalOpt(lr=5e-3, weight_decay=0.0, warmup_ratio=0.2)
    ds = trainer.train(model, adapter, 1, start, batches=batches, opt=opt)
    _assert_torch_update(cfg, rt, start, batches, opt, ds.vector)
    np.testing.assert_array_equal(adapter.get(1).numpy(), ds.vector)


def _assert_torch_update(cfg, rt, start, batches, opt, result) -> None:
    """``result`` - ``start`` is the torch trainer's update on a fresh model of ``cfg``: cos >
    0.99 and norms within 5% (bf16 compute differs between the two)."""
    model_t, adapter_t, _ = run_model(cfg, 2, rt)
    ref = TorchTrainer(rt).train(model_t, adapter_t, 1, start, batches=batches, opt=opt)
    d_ref, d_ds = ref.vector - start, result - start
    cos = float(d_ref @ d_ds / np.linalg.norm(d_ref) / np.linalg.norm(d_ds))
    assert cos > 0.99 and abs(np.linalg.norm(d_ds) / np.linalg.norm(d_ref) - 1) < 0.05


def test_a_collected_engine_leaves_the_next_clients_masters(monkeypatch):
    """Clients train the same parameters one engine after another, and the garbage collector
    calls a closed engine's destroy() again (``DeepSpeedEngine.__del__``) whenever it reaches
    it. Here it reaches the first client's engine while the second client trains: the second
    still trains from its start and reads its result from its own float32 masters, as the torch
    trainer does. (Before the fix the first optimizer's second destroy() cleared the masters'
    links on the shared parameters, and the second client's update had cos -0.07 to the
    reference.)"""
    import deepspeed

    from fcit_hpc.train import ds_trainer

    cfg = load_config(None, ["lora.lora_dropout=0.0", "train.precision=bf16"])
    rt = _runtime(cfg)
    _, _, _, start, batches = _setup()
    model, adapter, _ = run_model(cfg, 2, rt)
    ds_trainer.init_single_process_world(0)
    engines = []
    initialize = deepspeed.initialize

    def recorded(*args, **kwargs):
        out = initialize(*args, **kwargs)
        engines.append(out[0])
        return out

    monkeypatch.setattr(deepspeed, "initialize", recorded)
    trainer = ds_trainer.DeepSpeedTrainer(1, False, 4, runtime=rt)
    trainer.train(
        model, adapter, 1, start, batches=batches, opt=LocalOpt(0.0, 0.0, 0.0)
    )  # client 1
    first = engines[0]
    step = ds_trainer._DeepSpeedSession.step

    def collected_then_step(self, loss):
        first.__del__()  # what the collector does with the closed engine
        return step(self, loss)

    monkeypatch.setattr(ds_trainer._DeepSpeedSession, "step", collected_then_step)
    opt = LocalOpt(lr=5e-3, weight_decay=0.0, warmup_ratio=0.2)
    ds = trainer.train(
        model, adapter, 1, start, batches=batches, opt=opt
    )  # client 2, same parameters
    assert len(engines) == 2
    _assert_torch_update(cfg, rt, start, batches, opt, ds.vector)


_SHM_PROBE = """
from fcit_hpc.train import ds_trainer
unlink = ds_trainer._unlink_shm_workspace
seen = {}
def probe(member, size, master_addr, port):
    seen["file"] = ds_trainer.shm_workspace(member, master_addr, port)
    seen["made"] = seen["file"].exists()
    unlink(member, size, master_addr, port)
ds_trainer._unlink_shm_workspace = probe
ds_trainer.init_single_process_world(0)
print("made", seen["made"], "left", seen["file"].exists())
"""


def test_deepspeed_world_leaves_no_shm_workspace():
    """DeepSpeed's CPU communication op creates a 69 MB allreduce workspace in /dev/shm for
    every world and never removes it (a test suite had left 17 GB of them in RAM); once the
    world is set up, its name is removed, while the process still runs."""
    out = subprocess.run(
        [sys.executable, "-c", _SHM_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "made True left False" in out.stdout, out.stdout[-2000:]


def test_world_of_one_is_reused_by_a_second_run():
    """Two DeepSpeed runs in one process (the GPU tests do that): each picks a free port for its
    world of one; the second reuses the first's world. A different group is still an error."""
    from fcit_hpc.train import ds_trainer

    ds_trainer.init_single_process_world(0)
    member, size, addr, port, backend = ds_trainer._WORLD
    if size == 1:
        ds_trainer.init_group_world(0, 1, "127.0.0.1", port + 1, backend=backend, local_rank=0)
    with pytest.raises(RuntimeError, match="torch.distributed already set up"):
        ds_trainer.init_group_world(0, 2, "127.0.0.1", port, backend=backend, local_rank=0)


def test_deepspeed_stage0_low_precision_is_refused():
    """ZeRO-0 + bf16 runs DeepSpeed's unfused optimizer: measured here, its update differs from
    the torch reference (norm ratio 0.86 where ZeRO-1/2 give 1.000), so it is not offered."""
    with pytest.raises(ConfigError, match="train.zero_stage: 0 with train.precision bf16"):
        load_config(None, ["train.backend=deepspeed", "train.precision=bf16"])
    load_config(None, ["train.backend=deepspeed", "train.precision=bf16", "train.zero_stage=2"])


def _ompi(local: int, local_size: int) -> dict:
    return {
        "OMPI_COMM_WORLD_RANK": str(local),
        "OMPI_COMM_WORLD_SIZE": str(local_size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(local),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
    }


def _srun(local: int, tasks: int, **extra: str) -> dict:
    return {
        "SLURM_PROCID": str(local),
        "SLURM_NTASKS": str(tasks),
        "SLURM_LOCALID": str(local),
        "SLURM_NODEID": "0",
        "SLURM_STEP_TASKS_PER_NODE": str(tasks),
        **extra,
    }


# (what, launcher environment, GPUs torch sees, gpus_per_client, ranks_per_gpu, expected index)
PLACEMENTS = [
    ("plain process, one GPU", {}, 1, 1, 1, 0),
    ("mpirun, 4 ranks, 4 GPUs", _ompi(1, 4), 4, 1, 1, 1),
    ("mpirun, 8 ranks, 4 GPUs, 2 allowed", _ompi(5, 8), 4, 1, 2, 1),
    (
        "mpirun, CUDA_VISIBLE_DEVICES=0 exported, 2 allowed",
        {**_ompi(1, 2), "CUDA_VISIBLE_DEVICES": "0"},
        1,
        1,
        2,
        0,
    ),
    (
        "mpirun in an allocation: Open MPI's local rank, not the batch step's SLURM_LOCALID",
        {
            **_ompi(2, 4),
            **_srun(0, 1),
            "CUDA_VISIBLE_DEVICES": "0,1,2,3",
            "SLURM_GPUS_ON_NODE": "4",
        },
        4,
        1,
        1,
        2,
    ),
    (
        "srun --gpus-per-task=1: each task sees its own GPU",
        _srun(3, 4, CUDA_VISIBLE_DEVICES="3", SLURM_GPUS_ON_NODE="4", SLURM_GPUS_PER_TASK="1"),
        1,
        1,
        1,
        0,
    ),
    (
        "srun --gpus-per-task=1 of a SLURM without SLURM_GPUS_ON_NODE",
        _srun(2, 4, CUDA_VISIBLE_DEVICES="2", SLURM_GPUS_PER_TASK="1"),
        1,
        1,
        1,
        0,
    ),
    (
        "srun --gpu-bind=single:1",
        _srun(1, 2, CUDA_VISIBLE_DEVICES="1", SLURM_GPUS_ON_NODE="2", SLURM_GPU_BIND="single:1"),
        1,
        1,
        1,
        0,
    ),
    (
        "srun --gpus-per-node=4, no binding: SLURM_LOCALID over the node's GPUs",
        _srun(3, 4, CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_GPUS_ON_NODE="4"),
        4,
        1,
        1,
        3,
    ),
    (
        "a client group of 4 (train.gpus_per_client=4), one GPU per member",
        _srun(2, 4, CUDA_VISIBLE_DEVICES="2", SLURM_GPUS_ON_NODE="4", SLURM_GPUS_PER_TASK="1"),
        1,
        4,
        1,
        0,
    ),
    (
        "the allocation's 2 GPUs of a node with 8, no CUDA_VISIBLE_DEVICES",
        _srun(1, 2, SLURM_GPUS_ON_NODE="2"),
        8,
        1,
        1,
        1,
    ),
]


@pytest.mark.parametrize(
    "what,env,visible,g,share,want", PLACEMENTS, ids=[p[0] for p in PLACEMENTS]
)
def test_gpu_placement_from_launcher_variables(what, env, visible, g, share, want):
    """A rank's GPU as a pure function of the launcher's variables and the device count."""
    from fcit_hpc.runtime import gpu_index

    assert gpu_index(launch_info(env), env, visible, g, ranks_per_gpu=share) == want


# (what, launcher environment, GPUs torch sees, gpus_per_client, ranks_per_gpu, message parts)
OVERSUBSCRIBED = [
    (
        "mpirun, 8 ranks on 4 GPUs",
        _ompi(5, 8),
        4,
        1,
        1,
        ["train.ranks_per_gpu: 1", "8 ranks (openmpi launch) on 4 GPUs", "train.ranks_per_gpu=2"],
    ),
    (
        "CUDA_VISIBLE_DEVICES=0 exported to 2 ranks",
        {**_ompi(0, 2), "CUDA_VISIBLE_DEVICES": "0"},
        1,
        1,
        1,
        ["2 ranks (openmpi launch) on 1 GPUs", "CUDA_VISIBLE_DEVICES='0'"],
    ),
    (
        "srun --gpu-bind=map_gpu:0,0: two tasks bound to one GPU",
        _srun(1, 2, CUDA_VISIBLE_DEVICES="0", SLURM_GPUS_ON_NODE="1", SLURM_GPU_BIND="map_gpu:0,0"),
        1,
        1,
        1,
        ["2 ranks (slurm launch) on 1 GPUs", "SLURM_GPU_BIND='map_gpu:0,0'"],
    ),
    (
        "3 ranks per GPU where 2 are allowed",
        _srun(5, 6, CUDA_VISIBLE_DEVICES="0,1", SLURM_GPUS_ON_NODE="2"),
        2,
        1,
        2,
        ["train.ranks_per_gpu: 2", "6 ranks", "3 per GPU", "train.ranks_per_gpu=3"],
    ),
    (
        "a client group sharing GPUs, whatever ranks_per_gpu allows",
        _ompi(3, 4),
        2,
        2,
        2,
        ["train.gpus_per_client: 2 GPUs per client", "a GPU each", "at most 2 ranks per node"],
    ),
    (
        "srun --gpus-per-task=2: one rank cannot drive two",
        _srun(0, 2, CUDA_VISIBLE_DEVICES="0,1", SLURM_GPUS_ON_NODE="4", SLURM_GPUS_PER_TASK="2"),
        2,
        1,
        1,
        ["given 2 GPUs of its own", "--gpus-per-task=1", "train.gpus_per_client"],
    ),
    (
        "no GPU at all",
        {"CUDA_VISIBLE_DEVICES": ""},
        0,
        1,
        1,
        ["train.device: 'cuda'", "sees no CUDA"],
    ),
]


@pytest.mark.parametrize(
    "what,env,visible,g,share,parts", OVERSUBSCRIBED, ids=[p[0] for p in OVERSUBSCRIBED]
)
def test_more_ranks_per_gpu_than_asked_is_a_config_error(what, env, visible, g, share, parts):
    from fcit_hpc.runtime import gpu_index

    with pytest.raises(ConfigError) as e:
        gpu_index(launch_info(env), env, visible, g, ranks_per_gpu=share)
    for part in parts:
        assert part in str(e.value), (part, str(e.value))


def test_ranks_per_gpu_is_a_checked_config_field():
    assert load_config(None, ["train.ranks_per_gpu=2"]).train.ranks_per_gpu == 2
    with pytest.raises(ConfigError, match="train.ranks_per_gpu"):
        load_config(None, ["train.ranks_per_gpu=0"])


def test_gradient_checkpointing_gives_the_same_update():
    """Recomputing activations in the backward pass changes memory, not the update."""
    opt = LocalOpt(lr=5e-3, weight_decay=0.0, warmup_ratio=0.2)
    cfg, model, adapter, start, batches = _setup()
    ref = TorchTrainer().train(model, adapter, 1, start, batches=batches, opt=opt)
    cfg_c = load_config(None, ["lora.lora_dropout=0.0", "train.gradient_checkpointing=true"])
    rt = _runtime(cfg_c)
    model_c, adapter_c, _ = run_model(cfg_c, 2, rt)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model_c.modules())
    res = TorchTrainer(rt).train(model_c, adapter_c, 1, start, batches=batches, opt=opt)
    assert np.abs(ref.vector - start).max() > 1e-3
    np.testing.assert_allclose(res.vector, ref.vector, atol=1e-6, rtol=0)


def test_deterministic_switch():
    from fcit_hpc.runtime import apply_runtime

    cfg = load_config(None, ["train.deterministic=true"])
    before = torch.are_deterministic_algorithms_enabled()
    try:
        apply_runtime(_runtime(cfg))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_host_summary_groups_ranks_by_host_as_ranges():
    from fcit_hpc.fed.comm import run_threads
    from fcit_hpc.fed.context import gather_hosts, host_summary

    assert host_summary(["n1", "n1", "n2", "n2", "n1", "n3"]) == (
        "n1: ranks 0-1,4; n2: ranks 2-3; n3: rank 5"
    )
    assert host_summary(["a"] * 3) == "a: ranks 0-2"
    import socket

    got = run_threads(3, gather_hosts)  # rank 0 gets every rank's host name, the others None
    assert got == [[socket.gethostname()] * 3, None, None]
