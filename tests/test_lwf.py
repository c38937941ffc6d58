"""LwF baseline: the distillation term against an independent float64 computation (torch's
kl_div on the two models' logits), the teacher swap leaving training bitwise as it was, its
first stage equal to Finetune, and whole runs (equal at 1 and 2 ranks and after a kill +
resume)."""

import numpy as np
import pytest
import torch

from fcit_hpc.methods.lwf import Distillation, distill_sum
from fcit_hpc.state.schema import read_state
from fcit_hpc.train.base import target_tokens
from fcit_hpc.train.torch_trainer import TorchTrainer

from .conftest import assert_two_ranks_and_resume_equal_serial, smoke_serial
from .test_trainers import _setup

LWF = ["method.name=lwf", "method.lwf_lambda=2.0", "method.lwf_temperature=2.0"]


def _kl_reference(z, z_old, labels, temperature: float) -> float:
    """T² · Σ_target-tokens KL(softmax(z_old/T) ‖ softmax(z/T)), float64, via torch's kl_div."""
    mask = labels[:, 1:] != -100
    z = z[:, :-1][mask].double() / temperature
    z_old = z_old[:, :-1][mask].double() / temperature
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(z, -1), torch.log_softmax(z_old, -1), reduction="sum", log_target=True
    )
    return float(kl) * temperature**2


def test_distill_sum_is_the_tempered_kl_over_target_tokens():
    g = torch.Generator().manual_seed(0)
    z, z_old = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :4] = -100  # the prompt carries no target
    labels[2] = -100  # a row without any target
    got = float(distill_sum(z, z_old, labels, 2.0))
    assert got == pytest.approx(_kl_reference(z, z_old, labels, 2.0), rel=1e-5)
    assert float(distill_sum(z, z, labels, 2.0)) == pytest.approx(0.0, abs=1e-5)


def test_lwf_term_matches_the_two_models_logits():
    """The term of a batch = λ · T² · KL between the model with the previous adapter and the
    model being trained, on the batch's answer tokens; the teacher's forward leaves the trained
    subspace bitwise as it was."""
    model, adapter, start, batches, _ = _setup()
    prev = start + np.random.default_rng(1).normal(0, 0.2, start.shape).astype(np.float32)
    adapter.set(0, start)
    adapter.train_subspace(0)
    batch = batches[0]
    before = adapter.get(0).clone()
    term = Distillation(model, adapter, prev, 3.0, temperature=2.0)
    term.prepare(batch)
    assert torch.equal(adapter.get(0), before)
    got = float(term(batch, model(**batch).logits).detach())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        z = model(**inputs).logits
        adapter.set(0, prev)
        z_old = model(**inputs).logits
    assert target_tokens(batch["labels"]) > 0
    ref = 3.0 * _kl_reference(z, z_old, batch["labels"], 2.0)
    # float32 log-softmax differences of two close models against float64: ~1e-4 relative
    assert ref > 1e-6 and got == pytest.approx(ref, rel=1e-3)


def test_zero_weight_term_trains_bitwise_as_without():
    """A batch term of weight 0 (the teacher swapped in and out before every forward) leaves
    local training bitwise equal to training without it."""
    model, adapter, start, batches, kw = _setup()
    plain = TorchTrainer().train(model, adapter, 0, start, batches=batches, **kw)
    prev = start + 0.05
    term = Distillation(model, adapter, prev, 0.0, temperature=2.0)
    res = TorchTrainer().train(model, adapter, 0, start, batches=batches, **kw, batch_terms=[term])
    assert res.vector.tobytes() == plain.vector.tobytes() and res.loss == plain.loss
    strong = Distillation(model, adapter, prev, 50.0, temperature=2.0)
    pulled = TorchTrainer().train(
        model, adapter, 0, start, batches=batches, **kw, batch_terms=[strong]
    )
    assert pulled.vector.tobytes() != plain.vector.tobytes()


@pytest.fixture(scope="module")
def lwf_serial(tmp_path_factory):
    return smoke_serial(tmp_path_factory.mktemp("lwf") / "run", *LWF)


def test_lwf_run_keeps_the_previous_stage_and_stage0_is_finetune(lwf_serial, tmp_path):
    st = read_state(lwf_serial)
    assert st.done and st.method.name == "lwf" and st.num_subspaces == 1
    # the teacher of the next stage: the adapter at the end of the last stage
    assert st.method.arrays["previous"].tobytes() == st.adapter[0].tobytes()
    ft = read_state(smoke_serial(tmp_path / "ft", "method.name=finetune"))
    s0 = st.rounds["stage"] == 0
    for f in ("loss", "samples", "accepted", "num_subspaces"):
        assert st.rounds[f][s0].tobytes() == ft.rounds[f][s0].tobytes(), f
    c0 = st.clients["stage"] == 0
    assert st.clients["loss"][c0].tobytes() == ft.clients["loss"][c0].tobytes()
    assert st.accuracy[0].tobytes() == ft.accuracy[0].tobytes()
    # stage 1 distils from stage 0's model (from its round 1 on: in round 0 the clients start
    # at the teacher, where the KL and its gradient are 0): another final adapter
    assert st.adapter.tobytes() != ft.adapter.tobytes()


@pytest.mark.mpi
@pytest.mark.slow
def test_lwf_two_ranks_and_resume_equal_serial(lwf_serial, tmp_path):
    def teacher_stored(st):  # stage 0's adapter, before the kill
        return st.method.arrays["previous"].size > 0

    assert_two_ranks_and_resume_equal_serial(lwf_serial, tmp_path, LWF, teacher_stored)
