"""EWC baseline: the penalty (hand-computed), the diagonal Fisher (against per-batch .grad), the
pull towards the anchor, DeepSpeed = torch with it, and whole runs (one Fisher consolidation per
stage, equal at 1 and 2 ranks and after a kill + resume)."""

import numpy as np
import pytest
import torch

from fcit_hpc.methods.ewc import ewc_term, ewc_terms, fisher_diagonal
from fcit_hpc.state.schema import read_state
from fcit_hpc.train.torch_trainer import TorchTrainer

from .conftest import assert_two_ranks_and_resume_equal_serial, smoke_serial
from .test_trainers import _setup, assert_deepspeed_matches_torch

EWC = ["method.name=ewc"]


def test_ewc_term_hand_computed():
    p = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    f = [torch.tensor([0.5, 2.0]), torch.tensor([[4.0]])]
    a = [torch.tensor([0.0, 1.0]), torch.tensor([[1.0]])]
    # 0.5·λ·(0.5·1 + 2·1 + 4·4) = 0.5·3·18.5
    assert float(ewc_term(p, f, a, 3.0)) == pytest.approx(0.5 * 3 * 18.5)


def test_fisher_diagonal_is_mean_squared_batch_gradient():
    model, adapter, start, batches, _ = _setup()
    got = fisher_diagonal(model, adapter, start, batches)
    ref = np.zeros_like(got, dtype=np.float64)
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        ref += np.concatenate([p.grad.detach().reshape(-1).numpy() ** 2 for p in adapter.params(0)])
    ref /= len(batches)
    assert got.shape == (adapter.numel,) and (got >= 0).all() and got.max() > 0
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-12)


def _drift(lam):
    model, adapter, start, batches, kw = _setup()
    fisher = np.ones(adapter.numel, np.float32)
    res = TorchTrainer().train(
        model,
        adapter,
        0,
        start,
        batches=batches,
        **kw,
        terms=lambda p: ewc_terms(adapter, p, fisher, start.copy(), lam=lam),
    )
    return float(np.linalg.norm(res.vector - start))


def test_penalty_pulls_towards_the_anchor():
    assert _drift(1000.0) < 0.5 * _drift(0.0)


def test_deepspeed_matches_torch_with_ewc():
    setup = _setup()
    adapter, start = setup[1], setup[2]
    fisher = np.random.default_rng(0).random(adapter.numel).astype(np.float32)
    anchor = start + 0.01
    terms = lambda p: ewc_terms(adapter, p, fisher, anchor, lam=50.0)  # noqa: E731
    assert_deepspeed_matches_torch(0, 1, setup, terms=terms)


@pytest.fixture(scope="module")
def ewc_serial(tmp_path_factory):
    return smoke_serial(tmp_path_factory.mktemp("ewc") / "run", *EWC)


def test_ewc_run_consolidates_every_stage(ewc_serial):
    st = read_state(ewc_serial)
    fisher, anchor = st.method.arrays["fisher"], st.method.arrays["anchor"]
    assert st.done and st.method.counters["stages"] == 2 and st.num_subspaces == 1
    assert fisher.shape == (st.adapter.shape[1],)
    assert np.isfinite(fisher).all() and (fisher >= 0).all()
    assert fisher.max() > 0
    np.testing.assert_array_equal(anchor, st.adapter[0])  # the last stage's adapter


@pytest.mark.mpi
def test_ewc_two_ranks_and_resume_equal_serial(ewc_serial, tmp_path):
    def stage0_consolidated(st):  # before the kill
        return st.method.counters["stages"] == 1

    assert_two_ranks_and_resume_equal_serial(ewc_serial, tmp_path, EWC, stage0_consolidated)
