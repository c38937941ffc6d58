"""MoELoRA and M-LoRA (every subspace trained at once, mixed by a router / by learned scales):
the layer against plain-torch references (dense ΔW per token, per-expert dropout masks, experts
that do and do not coincide with subspaces, bf16), which parameters get gradients, DeepSpeed =
torch, the server's split of a multi-subspace update, and whole runs (serial = 2 ranks, kill +
resume, bad expert counts, PEFT export)."""

import numpy as np
import pytest
import torch

from fcit_hpc.benchmark.synthetic import make_split
from fcit_hpc.config import load_config
from fcit_hpc.data.batches import make_batches
from fcit_hpc.errors import ConfigError
from fcit_hpc.fed.server.aggregate import RoundInfo, aggregate_round
from fcit_hpc.fed.strategies import FedAvg, ServerOptConfig
from fcit_hpc.fed.wire import pack_updates, unpack_updates
from fcit_hpc.methods import make_method
from fcit_hpc.model.build import build_model
from fcit_hpc.model.lora import SubspaceAdapter, SubspaceLoRALinear
from fcit_hpc.state.schema import RunState, comparable_content, read_state, same_content
from fcit_hpc.train.base import LocalOpt, Side
from fcit_hpc.train.torch_trainer import TorchTrainer

from .conftest import ROOT, fcit, mpiexec, smoke_serial

SMOKE = str(ROOT / "configs/smoke.yaml")
FCIT = str(ROOT / ".venv/bin/fcit")
MOE = ["method.name=moelora", "method.experts=2"]  # smoke: S_max 4 x r 4 -> 2 experts of rank 8
MLORA = ["method.name=mlora", "method.experts=4"]


def _layer(method: str, s_max=4, r=3, experts=2, dropout=0.0, scaling="scalar", seed=0):
    """A SubspaceLoRALinear (in 6, out 5) with random subspaces and mixer, all trainable."""
    cfg = load_config(
        None,
        [
            f"method.name={method}",
            f"method.experts={experts}",
            f"method.mlora_scaling={scaling}",
            f"lora.max_subspaces={s_max}",
            f"lora.lora_r={r}",
        ],
    )
    torch.manual_seed(seed)
    layer = SubspaceLoRALinear(torch.nn.Linear(6, 5), r, 2.0 * r, dropout, s_max=s_max)
    adapter = SubspaceAdapter([("l", layer)])
    m = make_method(cfg.method, cfg.lora)
    m.install(adapter)
    with torch.no_grad():
        for i in range(s_max):
            layer.lora_A[i].normal_()
            layer.lora_B[i].normal_()
        layer.mixer.weight.normal_()
    adapter.select(tuple(range(s_max)))
    layer.mixer.requires_grad_(True)
    return layer, adapter


def _dense_reference(layer, x, A, B, W_mix, method, experts):
    """y = W0 x + scaling · Σ_j g_j ⊙ (B_j A_j) x with every expert's B_j A_j formed as a dense
    [out, in] matrix (MoELoRA: g = softmax(x W_rᵀ) per token; M-LoRA: g = s_j)."""
    n = A.shape[0] // experts
    y = x @ layer.base.weight.t() + layer.base.bias
    g = torch.softmax(x @ W_mix.t(), -1) if method == "moelora" else None
    for j in range(experts):
        delta = B[:, j * n : (j + 1) * n] @ A[j * n : (j + 1) * n]  # [out, in]
        term = torch.einsum("oi,...i->...o", delta, x) * layer.scaling
        y = y + (term * g[..., j : j + 1] if g is not None else term * W_mix[j])
    return y


@pytest.mark.parametrize(
    "method,experts,scaling",
    [
        ("moelora", 2, "scalar"),  # an expert = 2 subspaces
        ("moelora", 4, "scalar"),  # an expert = a subspace
        ("moelora", 6, "scalar"),  # experts of rank 2 inside subspaces of rank 3
        ("mlora", 4, "scalar"),
        ("mlora", 2, "vector"),
    ],
)
def test_forward_and_gradients_match_plain_torch(method, experts, scaling):
    layer, adapter = _layer(method, experts=experts, scaling=scaling)
    x = torch.randn(3, 7, 6)
    A = torch.cat([a.detach() for a in layer.lora_A], 0).requires_grad_(True)
    B = torch.cat([b.detach() for b in layer.lora_B], 1).requires_grad_(True)
    W = layer.mixer.weight.detach().clone().requires_grad_(True)
    ref = _dense_reference(layer, x, A, B, W, method, experts)
    y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # gradients: every subspace and the mixer, nothing of the base linear
    y.square().sum().backward()
    ref.square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    grad_a = torch.cat([a.grad for a in layer.lora_A], 0)
    grad_b = torch.cat([b.grad for b in layer.lora_B], 1)
    torch.testing.assert_close(grad_a, A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_b, B.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.mixer.weight.grad, W.grad, rtol=1e-4, atol=1e-5)
    assert W.grad.abs().max() > 0
    # inference: frozen, and without gradients the fused SSA kernel where the gate fits it
    adapter.select(tuple(range(layer.s_max)), trainable=False)
    layer.mixer.requires_grad_(False)
    assert not any(p.requires_grad for p in layer.parameters())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref.detach(), rtol=1e-5, atol=1e-5)


def test_each_expert_has_its_own_dropout_mask():
    """CoIN applies the dropout module once per expert: independent masks, in expert order."""
    layer, _ = _layer("moelora", experts=4, dropout=0.5)
    x = torch.randn(2, 5, 6)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    g = torch.softmax(x @ layer.mixer.weight.t(), -1)
    ref = layer.base(x)
    for j in range(4):
        xd = torch.nn.functional.dropout(x, 0.5, training=True)
        term = xd @ layer.lora_A[j].t() @ layer.lora_B[j].t() * layer.scaling
        ref = ref + term * g[..., j : j + 1]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_bf16_input_float32_masters():
    layer, _ = _layer("moelora", experts=2)
    x = torch.randn(2, 4, 6)
    y32 = layer(x).detach()
    layer.base.to(torch.bfloat16)
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and layer.mixer.weight.dtype == torch.float32
    assert all(a.dtype == torch.float32 for a in layer.lora_A)
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)


def test_expert_count_must_divide_the_budget():
    with pytest.raises(ConfigError, match="method.experts"):
        load_config(None, ["method.name=moelora", "method.experts=0"])
    for name in ("moelora", "mlora"):
        cfg = load_config(None, [f"method.name={name}", "method.experts=3"])  # 8 x 8 = 64
        with pytest.raises(ConfigError, match="method.experts: 3 experts do not divide"):
            make_method(cfg.method, cfg.lora)


# --- local training ---------------------------------------------------------------------------


def _local(method: str):
    cfg = load_config(
        None,
        [
            f"method.name={method}",
            "method.experts=2",
            "lora.max_subspaces=3",
            "lora.lora_r=4",
            "lora.lora_dropout=0.0",
        ],
    )
    m = make_method(cfg.method, cfg.lora)
    model, adapter, tok = build_model(cfg.model, cfg.lora, m.num_slots())
    m.install(adapter)
    vecs, mixer = m.initial_weights(adapter, torch.Generator().manual_seed(0))
    vecs[:, -adapter.layers[-1].lora_B[0].numel() :] = 0.01  # non-zero B: every grad non-zero
    mixer = mixer + 0.05  # non-zero M-LoRA scales
    adapter.set_mixer(mixer)
    samples = make_split(1, 20, 0, "train")
    batches = make_batches(
        tok, samples, 4, 48, epochs=1, generator=torch.Generator().manual_seed(1)
    )
    opt = LocalOpt(lr=5e-3, weight_decay=0.01, warmup_ratio=0.2)
    return model, adapter, m, vecs.reshape(-1), mixer, batches, opt


@pytest.mark.parametrize("method", ["moelora", "mlora"])
def test_local_training_moves_subspaces_and_mixer_only_and_deepspeed_equals_torch(method):
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer

    model, adapter, m, start, mixer, batches, opt = _local(method)
    ks = m.trained_subspaces(0)
    assert ks == (0, 1, 2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    frozen = {n: v for n, v in frozen.items() if ".mixer." not in n}

    def run(trainer):
        side = Side(adapter.mixer_params(), opt.lr, mixer)
        adapter.set_mixer(mixer)
        return trainer.train(model, adapter, ks, start, batches=batches, opt=opt, sides=[side])

    ref = run(TorchTrainer())
    assert ref.vector.shape == start.shape and len(ref.sides) == 1
    numel = adapter.numel
    moved = np.abs(ref.vector - start).reshape(len(ks), numel).max(axis=1)
    assert (moved > 1e-4).all()  # every subspace trained
    assert np.abs(ref.sides[0] - mixer).max() > 1e-4  # the mixer trained
    for n, p in model.named_parameters():  # nothing else moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    ds = run(DeepSpeedTrainer(2, False, 4))
    np.testing.assert_allclose(ds.vector, ref.vector, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ds.sides[0], ref.sides[0], atol=1e-6, rtol=0)
    assert ds.loss == pytest.approx(ref.loss, abs=1e-6)


def test_server_splits_a_multi_subspace_update_and_averages_the_mixer():
    st = RunState(
        "",
        np.zeros((2, 3), np.float32),
        np.zeros((2, 1), np.float32),
        np.zeros(2),
        accuracy=np.zeros((1, 1)),
        num_subspaces=2,
        mixer=np.array([1.0, 2.0], np.float32),
    )
    # two clients train subspaces (0, 1) and the 2-value mixer; a third sends one subspace only
    deltas = [
        np.array([1, 1, 1, 2, 2, 2, 0.5, 0.0], np.float32),  # client 0, 10 samples
        np.array([3, 3, 3, 6, 6, 6, -0.5, 1.0], np.float32),  # client 1, 30 samples
        np.array([9, 9, 9, 0.0, 0.0], np.float32),  # client 2: wrong size
    ]
    rows = [(0, 0, 10, 1.0, 0.1, 1), (1, 0, 30, 1.0, 0.1, 1), (2, 0, 5, 1.0, 0.1, 1)]
    head, body = pack_updates(rows, deltas)
    plan = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]], np.int64)
    agg = aggregate_round(
        st,
        unpack_updates([head], [body]),
        FedAvg(ServerOptConfig()),
        RoundInfo(0, 0, plan, {}, token_bytes={}, bytes_down=0),
        subspaces_of=lambda k: (0, 1),
    )
    np.testing.assert_allclose(st.adapter[0], [2.5, 2.5, 2.5])  # (10·1 + 30·3) / 40
    np.testing.assert_allclose(st.adapter[1], [5.0, 5.0, 5.0])
    np.testing.assert_allclose(st.mixer, [1.0 - 0.25, 2.0 + 0.75])
    assert agg.client_rows["status"].tolist() == [0, 0, 2]  # WRONG_SHAPE


# --- whole runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_serial(tmp_path_factory):
    return smoke_serial(tmp_path_factory.mktemp("moe") / "run", *MOE)


@pytest.fixture(scope="module")
def mlora_serial(tmp_path_factory):
    return smoke_serial(tmp_path_factory.mktemp("mlora") / "run", *MLORA)


@pytest.mark.parametrize("which", ["moe", "mlora"])
def test_run_trains_every_subspace_and_the_mixer(which, moe_serial, mlora_serial, tmp_path):
    run = moe_serial if which == "moe" else mlora_serial
    st = read_state(run)
    cfg = load_config(run / "config.yaml")
    m = make_method(cfg.method, cfg.lora)
    _, adapter, _ = build_model(cfg.model, cfg.lora, m.num_slots())
    m.install(adapter)
    vecs, mixer = m.initial_weights(adapter, torch.Generator().manual_seed(0))
    assert st.done and st.num_subspaces == 4 and st.mixer.shape == mixer.shape
    assert (st.clients["subspace"] == 0).all()  # the assigned subspace; the update holds all 4
    b = adapter.layers[-1].lora_B[0].numel()
    assert all(np.count_nonzero(v[-b:]) for v in st.adapter)  # every B trained
    assert np.abs(st.mixer - mixer).max() > 1e-5  # the mixer trained (M-LoRA's from 0)
    assert np.isfinite(st.accuracy).all()
    # a mixer of the wrong size is refused on resume
    from fcit_hpc.errors import StateError
    from fcit_hpc.fed.server.run_state import check_state

    with pytest.raises(StateError, match="/global/mixer has"):
        check_state(st, m, adapter.numel, "x/state.h5", mixer_numel=st.mixer.size + 1)


def test_plan_counts_every_subspace_a_mixture_client_uploads(moe_serial):
    """fcit plan's upload bytes for MoELoRA with 2 experts over S_max = 4 subspaces (each client
    uploads all 4, as the method's trained_subspaces says) against the run's own count, less the
    routers' float32 values every upload carries (the plan counts no mixer)."""
    from fcit_hpc.plan import Figures, predict_bytes

    st = read_state(moe_serial)
    cfg = load_config(moe_serial / "config.yaml")
    got = predict_bytes(cfg, Figures())
    routers = len(st.clients) * st.mixer.size * 4
    assert got["up"] == pytest.approx(int(st.rounds["bytes_sent"].sum()) - routers, rel=0.03)


@pytest.mark.mpi
def test_moelora_two_ranks_killed_and_resumed_equal_serial(moe_serial, tmp_path):
    """Every round at 2 ranks, one rank killed after its first client of stage 1, resumed: the
    state equals the serial run's bitwise (world size and resume at once)."""
    killed = tmp_path / "killed"
    kill = ["debug.kill_rank=1", "debug.kill_stage=1", "debug.kill_round=0"]
    p = mpiexec(2, FCIT, "run", SMOKE, "--out", str(killed), *MOE, *kill, timeout=120)
    assert p.returncode != 0 and not read_state(killed).done
    assert read_state(killed).stage == 1  # stopped part-way, after stage 0
    p = mpiexec(2, FCIT, "run", "--resume", str(killed))
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_content(comparable_content(moe_serial), comparable_content(killed)) == []


@pytest.mark.mpi
def test_mlora_two_ranks_equal_serial(mlora_serial, tmp_path):
    out = tmp_path / "p2"
    p = mpiexec(2, FCIT, "run", SMOKE, "--out", str(out), *MLORA)
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_content(comparable_content(mlora_serial), comparable_content(out)) == []


def test_bad_expert_count_exits_2(tmp_path):
    for experts, want in ((0, "must be >= 1"), (3, "do not divide")):
        out = tmp_path / f"e{experts}"
        p = fcit(
            "run", SMOKE, "--out", str(out), "method.name=moelora", f"method.experts={experts}"
        )
        assert p.returncode == 2, p.stderr[-2000:]
        assert "method.experts" in p.stderr and want in p.stderr
        assert not (out / "state.h5").exists()


def test_mlora_exports_one_exact_peft_adapter_moelora_none(mlora_serial, moe_serial, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    st = read_state(mlora_serial)
    cfg = load_config(mlora_serial / "config.yaml")
    m = make_method(cfg.method, cfg.lora)
    (out,) = m.export(cfg.model, st, tmp_path / "ad", None)
    model, adapter, tok = build_model(cfg.model, cfg.lora, m.num_slots())
    m.install(adapter)
    for k in range(m.num_slots()):
        adapter.set(k, st.adapter[k])
    adapter.set_mixer(st.mixer)
    m.set_inference(adapter, st, None)
    model.eval()  # no LoRA dropout
    ids = torch.tensor([tok.prompt("Add the two numbers: 3 + 4 =")])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ad" / "base", local_files_only=True)
    with torch.no_grad():
        ours = model(ids).logits
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, out).eval()(ids).logits
    assert (ours - plain).abs().max() > 1e-5  # the adapter changes the output
    torch.testing.assert_close(peft, ours, atol=1e-5, rtol=1e-5)
    p = fcit("export", str(moe_serial), "--out", str(tmp_path / "moe"))
    assert p.returncode == 2 and "per-token router" in p.stderr
