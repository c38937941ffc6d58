"""O-LoRA baseline: frozen earlier subspaces act while the stage's own one trains (checked against
a plain-torch forward), the orthogonality loss (a hand-computed value, and it does make the new
subspace more orthogonal), DeepSpeed = torch with it, and whole runs (one subspace per stage,
equal at 1 and 2 ranks, a clear error when there are fewer subspaces than stages)."""

import numpy as np
import pytest
import torch

from fcit_hpc.methods.olora import ortho_term, ortho_terms
from fcit_hpc.state.schema import comparable_content, read_state, same_content
from fcit_hpc.train.torch_trainer import TorchTrainer

from .conftest import ROOT, fcit, mpiexec, smoke_serial
from .test_trainers import _setup, assert_deepspeed_matches_torch

SMOKE = str(ROOT / "configs/smoke.yaml")
OLORA = ["method.name=olora"]


def _vec(adapter, seed, b=0.02):
    v = adapter.init_vector(torch.Generator().manual_seed(seed)).numpy()
    v[v == 0] = b  # non-zero B: every subspace contributes
    return v


def test_forward_with_frozen_context_matches_plain_torch():
    model, adapter, start, batches, _ = _setup()
    ctx = {0: _vec(adapter, 10), 1: _vec(adapter, 11)}
    for i, v in ctx.items():
        adapter.set(i, v)
    adapter.set(2, _vec(adapter, 12))
    adapter.train_subspace(2, (0, 1))
    layer = adapter.layers[0]
    x = torch.randn(3, 5, layer.base.in_features)
    ref = layer.base(x)
    for i in (0, 1, 2):
        ref = (
            ref + (x @ layer.lora_A[i].detach().t() @ layer.lora_B[i].detach().t()) * layer.scaling
        )
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
    # only the trained subspace gets gradients
    layer(x).sum().backward()
    assert layer.lora_A[2].grad is not None and layer.lora_B[2].grad is not None
    assert all(layer.lora_A[i].grad is None for i in (0, 1))
    with pytest.raises(ValueError, match="frozen context"):
        adapter.train_subspace(1, (0, 1))


def test_ortho_term_hand_computed():
    a_new = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    a_old = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    # A_old A_new^T = [[1, 0], [0, 3]] -> squared sum 10; second layer orthogonal -> 0
    b_new = torch.tensor([[0.0, 1.0]])
    b_old = torch.tensor([[5.0, 0.0]])
    val = ortho_term([a_new, b_new], [[a_old], [b_old]], 0.5)
    assert float(val) == pytest.approx(0.5 * 10)


def test_orthogonality_loss_makes_the_new_subspace_orthogonal():
    def overlap(lam):
        model, adapter, start, batches, kw = _setup()
        ctx = {0: _vec(adapter, 3)}
        TorchTrainer().train(
            model,
            adapter,
            1,
            start,
            batches=batches,
            **kw,
            context=ctx,
            terms=lambda p: ortho_terms(adapter, 1, ctx, lam),
        )
        olds = [[m.lora_A[0].detach()] for m in adapter.layers]
        news = [m.lora_A[1].detach() for m in adapter.layers]
        return float(ortho_term(news, olds, 1.0))

    assert overlap(50.0) < 0.5 * overlap(0.0)


def test_deepspeed_matches_torch_with_context_and_ortho():
    setup = _setup()
    adapter = setup[1]
    ctx = {0: _vec(adapter, 4), 1: _vec(adapter, 5)}
    terms = lambda p: ortho_terms(setup[1], 2, ctx, 0.5)  # noqa: E731
    assert_deepspeed_matches_torch(2, 2, setup, context=ctx, terms=terms)


@pytest.fixture(scope="module")
def olora_serial(tmp_path_factory):
    return smoke_serial(tmp_path_factory.mktemp("olora") / "run", *OLORA)


def test_olora_run_one_subspace_per_stage(olora_serial):
    st = read_state(olora_serial)
    assert st.done and st.num_subspaces == 2
    ok = st.clients[st.clients["status"] == 0]
    assert (ok["subspace"] == ok["stage"]).all() and set(ok["stage"]) == {0, 1}
    # a fresh subspace has B = 0: the two trained ones have non-zero B, the unused slots do not
    nonzero = [np.count_nonzero(v) for v in st.adapter]
    assert len(nonzero) == 4 and nonzero[2] == nonzero[3]
    assert min(nonzero[:2]) > nonzero[2]
    assert np.isfinite(st.accuracy).all()


@pytest.mark.mpi
def test_olora_two_ranks_equal_serial(olora_serial, tmp_path):
    out = tmp_path / "p2"
    p = mpiexec(2, str(ROOT / ".venv/bin/fcit"), "run", SMOKE, "--out", str(out), *OLORA)
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_content(comparable_content(olora_serial), comparable_content(out)) == []


def test_olora_needs_a_subspace_per_stage(tmp_path):
    out = tmp_path / "few"
    p = fcit("run", SMOKE, "--out", str(out), *OLORA, "lora.max_subspaces=1")
    assert p.returncode == 2
    assert "lora.max_subspaces" in p.stderr and "O-LoRA" in p.stderr
    assert not (out / "state.h5").exists()
