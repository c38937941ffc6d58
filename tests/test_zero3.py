"""DeepSpeed ZeRO-3 (``train.zero_stage: 3``): a client's local training gives the ZeRO-2 and
plain-torch result, alone and in a client group of two; the engine partitions the frozen base
over the group (each member holds half of it) and leaves the module whole and plain afterwards;
a whole run matches ZeRO-2.

Tolerance: ZeRO-3's hooks add autograd nodes, which reorders the sums of gradient contributions
in the backward pass (measured: gradients differ by 5e-10 from the plain backward after one
batch). Adam divides each gradient by its own running scale, so on a value whose gradient is
near zero that rounding moves the update visibly: after 5 steps at lr 5e-3, measured at most
1.4e-6 (DISCO), 1.0e-5 (MoELoRA, 7 of 13,824 values) and a difference of norm 8.8e-6 of the
update's norm; ZeRO-2 is bitwise equal to torch. Asserted: |Δ| ≤ ATOL3 = 5e-5 (1% of one Adam
step) and ‖Δ‖ ≤ REL3 = 1e-4 of the update's norm (:func:`assert_same_update`).

Run as a script under ``mpiexec -n 2`` (:func:`group_main`), this file trains one client in a
group of two ranks; the test below compares it with one rank.
"""

import os
import socket
import sys

import numpy as np
import pytest
import torch

from fcit_hpc.run import run_model

ATOL3 = 5e-5
REL3 = 1e-4
LINEAR = torch.nn.functional.linear  # DeepSpeed may replace it process-wide; it must not


def assert_same_update(got, ref, start) -> None:
    """``got`` is ``ref`` (both trained from ``start``) within ZeRO-3's tolerance (docstring)."""
    got, ref, start = (np.asarray(v, np.float64) for v in (got, ref, start))
    assert np.abs(ref - start).max() > 1e-3  # it did train
    np.testing.assert_allclose(got, ref, atol=ATOL3, rtol=0)
    assert np.linalg.norm(got - ref) <= REL3 * np.linalg.norm(ref - start)


def _hooks(model) -> list[int]:
    from fcit_hpc.train.ds_trainer import _HOOKS

    return [len(getattr(m, h)) for m in model.modules() for h in _HOOKS]


def _base(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def assert_plain(model, base: dict, hooks: list[int]) -> None:
    """The module after a ZeRO-3 engine: plain parameters (no DeepSpeed attributes, whole
    values), plain parameter dicts, no hooks left, the frozen base bitwise unchanged, and
    torch.nn.functional.linear not replaced."""
    for n, p in model.named_parameters():
        assert type(p) is torch.nn.Parameter, n
        assert not [a for a in vars(p) if a.startswith(("ds_", "_z3"))], n
        if n in base:
            assert torch.equal(p.detach(), base[n]), n
    for m in model.modules():
        assert type(m._parameters) is dict, type(m)
        assert not [a for a in vars(m) if a.startswith("ds_")], type(m)
    from fcit_hpc.train.ds_trainer import deepspeed_hooks

    assert _hooks(model) == hooks and deepspeed_hooks(model) == []
    assert torch.nn.functional.linear is LINEAR


@pytest.mark.parametrize("offload,prox", [(False, 0.0), (True, 0.0), (False, 0.05)])
def test_zero3_matches_zero2_and_torch(offload, prox):
    """One rank: ZeRO-3 (with parameter and optimizer offload, with FedProx's term that reads the
    trained weights outside the forward pass) against ZeRO-2 and torch, on the same batches."""
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer
    from fcit_hpc.train.torch_trainer import TorchTrainer

    from .test_trainers import ATOL, _setup

    model, adapter, start, batches, kw = _setup(prox)
    base, hooks = _base(model), _hooks(model)
    ref = TorchTrainer().train(model, adapter, 0, start, batches=batches, **kw)
    z2 = DeepSpeedTrainer(2, offload, 4).train(model, adapter, 0, start, batches=batches, **kw)
    z3 = DeepSpeedTrainer(3, offload, 4).train(model, adapter, 0, start, batches=batches, **kw)
    assert np.abs(ref.vector - start).max() > 1e-3  # it did train
    np.testing.assert_allclose(z2.vector, ref.vector, atol=ATOL, rtol=0)
    assert_same_update(z3.vector, ref.vector, start)
    assert_same_update(z3.vector, z2.vector, start)
    assert z3.loss == pytest.approx(ref.loss, abs=1e-6)
    assert_plain(model, base, hooks)
    np.testing.assert_array_equal(adapter.get(0).numpy(), z3.vector)  # the trained values
    # a second client on the same rank: a new engine on the restored module, the same result
    again = DeepSpeedTrainer(3, offload, 4).train(model, adapter, 0, start, batches=batches, **kw)
    np.testing.assert_array_equal(again.vector, z3.vector)
    assert_plain(model, base, hooks)


def test_zero3_with_context_subspaces_and_ortho_term():
    """O-LoRA: frozen context subspaces act in the forward pass and the orthogonality term reads
    them outside it (the adapter stays whole on every member)."""
    from fcit_hpc.methods.olora import ortho_terms

    from .test_olora import _vec
    from .test_trainers import _setup

    setup = _setup()
    adapter = setup[1]
    ctx = {0: _vec(adapter, 4), 1: _vec(adapter, 5)}
    terms = lambda p: ortho_terms(adapter, 2, ctx, 0.5)  # noqa: E731
    _assert_stage3_matches_torch(2, setup, context=ctx, terms=terms)


def test_zero3_with_ewc_term():
    from fcit_hpc.methods.ewc import ewc_terms

    from .test_trainers import _setup

    setup = _setup()
    adapter, start = setup[1], setup[2]
    fisher = np.random.default_rng(0).random(adapter.numel).astype(np.float32)
    terms = lambda p: ewc_terms(adapter, p, fisher, start + 0.01, lam=50.0)  # noqa: E731
    _assert_stage3_matches_torch(0, setup, terms=terms)


def _assert_stage3_matches_torch(k, setup, **extra):
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer
    from fcit_hpc.train.torch_trainer import TorchTrainer

    model, adapter, start, batches, kw = setup
    base, hooks = _base(model), _hooks(model)
    ref = TorchTrainer().train(model, adapter, k, start, batches=batches, **kw, **extra)
    z3 = DeepSpeedTrainer(3, False, 4).train(
        model, adapter, k, start, batches=batches, **kw, **extra
    )
    assert_same_update(z3.vector, ref.vector, start)
    assert_plain(model, base, hooks)


@pytest.mark.parametrize("method", ["moelora", "mlora"])
def test_zero3_with_mixer_side_group(method):
    """Several subspaces at once, mixed by a trained mixer (a side group with its own result)."""
    from fcit_hpc.train.base import Side
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer
    from fcit_hpc.train.torch_trainer import TorchTrainer

    from .test_mixtures import _local

    model, adapter, m, start, mixer, batches, opt = _local(method)
    ks = m.trained_subspaces(0)
    frozen = {n: v for n, v in _base(model).items() if ".mixer." not in n}
    hooks = _hooks(model)

    def run(trainer):
        adapter.set_mixer(mixer)
        side = Side(adapter.mixer_params(), opt.lr, mixer)
        return trainer.train(model, adapter, ks, start, batches=batches, opt=opt, sides=[side])

    ref = run(TorchTrainer())
    z3 = run(DeepSpeedTrainer(3, False, 4))
    assert_same_update(z3.vector, ref.vector, start)
    assert_same_update(z3.sides[0], ref.sides[0], mixer)
    assert_plain(model, frozen, hooks)
    np.testing.assert_array_equal(
        torch.cat([p.detach().reshape(-1) for p in adapter.mixer_params()]).numpy(), z3.sides[0]
    )


def test_zero3_with_gradient_checkpointing():
    """Activations recomputed in the backward pass: the recomputation gathers the base again."""
    from fcit_hpc.config import load_config
    from fcit_hpc.runtime import LaunchInfo, make_runtime
    from fcit_hpc.train.base import LocalOpt
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer, init_single_process_world
    from fcit_hpc.train.torch_trainer import TorchTrainer

    from .test_trainers import _setup

    model, adapter, start, batches, kw = _setup()
    opt = LocalOpt(lr=5e-3, weight_decay=0.0, warmup_ratio=0.2)
    ref = TorchTrainer().train(model, adapter, 1, start, batches=batches, opt=opt)
    over = ["lora.lora_dropout=0.0", "method.name=disco", "lora.max_subspaces=3"]
    cfg = load_config(None, [*over, "train.gradient_checkpointing=true"])
    rt = make_runtime(cfg.train, cfg.federation, 0, 1, launch=LaunchInfo())
    model_c, adapter_c, _ = run_model(cfg, 3, rt)
    init_single_process_world(0)
    z3 = DeepSpeedTrainer(3, False, 4, runtime=rt).train(
        model_c, adapter_c, 1, start, batches=batches, opt=opt
    )
    assert_same_update(z3.vector, ref.vector, start)


# --- a client group of two ranks -----------------------------------------------------------------


def group_main(out: str, port: int) -> None:
    """Under ``mpiexec -n 2``: both ranks form one client group (G = 2) and train one client
    with ZeRO-3, then with ZeRO-2; each rank saves its results and, for ZeRO-3, how much of the
    base model it held while the engine was alive."""
    from mpi4py import MPI

    from fcit_hpc.config import load_config
    from fcit_hpc.runtime import LaunchInfo, make_runtime
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer, _adapter_params, init_group_world
    from tests.test_trainers import _setup

    rank = MPI.COMM_WORLD.Get_rank()
    cfg = load_config(None, ["train.gpus_per_client=2"])
    rt = make_runtime(
        cfg.train, cfg.federation, rank, 2, launch=LaunchInfo(rank, 2, rank, 2, launcher="openmpi")
    )
    assert rt.group.ranks == (0, 1)
    init_group_world(rank, 2, "127.0.0.1", port, backend="gloo", local_rank=rank)
    model, adapter, start, batches, kw = _setup()
    base, hooks = _base(model), _hooks(model)
    lora = {id(p) for p in _adapter_params(model)}
    held: dict = {}

    def tick():  # once the engine is built, then after every step
        if held:
            return
        for p in model.parameters():
            kind = "lora" if id(p) in lora else "base"
            full, local, now = held.get(kind, (0, 0, 0))
            held[kind] = (full + p.ds_numel, local + p.ds_tensor.numel(), now + p.data.numel())

    z3 = DeepSpeedTrainer(3, False, 4, runtime=rt).train(
        model, adapter, 0, start, batches=batches, tick=tick, **kw
    )
    assert_plain(model, base, hooks)
    z2 = DeepSpeedTrainer(2, False, 4, runtime=rt).train(
        model, adapter, 0, start, batches=batches, **kw
    )
    np.savez(
        os.path.join(out, f"rank{rank}.npz"),
        z3=z3.vector,
        z3_loss=z3.loss,
        z2=z2.vector,
        base=np.array(held["base"]),
        lora=np.array(held["lora"]),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.mpi
def test_zero3_group_of_two_holds_half_the_base_and_matches_one_rank(tmp_path):
    """G = 2 under mpiexec: each member holds half of the frozen base (its partition; the base
    tensors themselves are empty between uses) and the whole adapter; the client's result
    equals G = 1 (ZeRO-3, ZeRO-2, torch) up to the order of the sums, and the two members
    agree bitwise."""
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer
    from fcit_hpc.train.torch_trainer import TorchTrainer

    from .conftest import mpiexec
    from .test_trainers import _setup

    p = mpiexec(2, sys.executable, __file__, str(tmp_path), str(_free_port()))
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    for r in (r0, r1):
        full, local, now = r["base"]
        assert 0.5 <= local / full < 0.51, (local, full)  # half, up to each tensor's padding
        assert now == 0  # released between uses
        full, local, now = r["lora"]
        assert now == full  # the adapter stays whole on every member
    np.testing.assert_array_equal(r0["z3"], r1["z3"])
    model, adapter, start, batches, kw = _setup()
    ref = TorchTrainer().train(model, adapter, 0, start, batches=batches, **kw)
    one = DeepSpeedTrainer(3, False, 4).train(model, adapter, 0, start, batches=batches, **kw)
    for got in (r0["z3"], r0["z2"]):
        assert_same_update(got, ref.vector, start)
    assert_same_update(r0["z3"], one.vector, start)
    assert_same_update(r0["z3"], r0["z2"], start)
    assert float(r0["z3_loss"]) == pytest.approx(ref.loss, rel=1e-6)


# --- whole runs ----------------------------------------------------------------------------------


def test_smoke_run_with_zero3_matches_zero2(tmp_path):
    """``fcit run configs/smoke.yaml`` with ZeRO-3 against ZeRO-2 (measured: bitwise equal)."""
    from fcit_hpc.state.schema import read_state

    from .conftest import smoke_serial

    ds = ["train.backend=deepspeed"]
    a = read_state(smoke_serial(tmp_path / "z2", *ds, "train.zero_stage=2"))
    b = read_state(smoke_serial(tmp_path / "z3", *ds, "train.zero_stage=3"))
    assert np.abs(a.adapter).max() > 1e-2  # trained
    np.testing.assert_allclose(b.adapter, a.adapter, atol=ATOL3, rtol=0)
    np.testing.assert_allclose(b.accuracy, a.accuracy, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(b.clients["loss"], a.clients["loss"], rtol=1e-5)
    np.testing.assert_array_equal(b.clients["subspace"], a.clients["subspace"])
    assert a.num_subspaces == b.num_subspaces


def test_multimodal_run_with_zero3_matches_zero2(tmp_path):
    """fcit-mini on a tiny LLaVA: the vision tower is partitioned too, the projector trains beside
    LoRA as a side group (whole on every member), identity tokens come from the model."""
    from fcit_hpc.state.schema import read_state

    from .conftest import run_ok

    ds = ["train.backend=deepspeed"]
    a = read_state(run_ok("smoke_mini.yaml", tmp_path / "z2", *ds, "train.zero_stage=2"))
    b = read_state(run_ok("smoke_mini.yaml", tmp_path / "z3", *ds, "train.zero_stage=3"))
    assert a.projector.size and np.abs(a.adapter).max() > 1e-2
    np.testing.assert_allclose(b.adapter, a.adapter, atol=ATOL3, rtol=0)
    np.testing.assert_allclose(b.projector, a.projector, atol=ATOL3, rtol=0)
    np.testing.assert_allclose(b.accuracy, a.accuracy, atol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(b.clients["subspace"], a.clients["subspace"])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_on_the_gpu_matches_zero2(tmp_path, precision):
    """On a CUDA device (nccl world, ``make test-gpu``): ZeRO-3 with parameter and optimizer
    offload against ZeRO-2, in float32 and bf16."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with `make test-gpu` on a GPU)")
    from fcit_hpc import cli
    from fcit_hpc.state.schema import read_state

    from .conftest import ROOT

    common = ["train.device=cuda", f"train.precision={precision}", "lora.lora_dropout=0"]
    common += ["train.backend=deepspeed", "eval.enabled=false"]  # the adapters are compared
    states = []
    for name, extra in (
        ("z2", ["train.zero_stage=2"]),
        ("z3", ["train.zero_stage=3", "train.offload=true"]),
    ):
        out = tmp_path / name
        assert (
            cli.main(["run", str(ROOT / "configs/smoke.yaml"), "--out", str(out), *common, *extra])
            == 0
        )
        states.append(read_state(out))
    a, b = (st.adapter.reshape(-1) for st in states)
    assert np.abs(a).max() > 1e-2
    if precision == "fp32":
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    else:  # bf16 activations: the rounding of reordered sums is bf16's
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    group_main(sys.argv[1], int(sys.argv[2]))
