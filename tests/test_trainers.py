"""Both local trainers give the same parameters after the same local steps (CPU, fp32)."""

import numpy as np
import pytest
import torch

from fcit_hpc.benchmark.synthetic import make_split
from fcit_hpc.config import load_config
from fcit_hpc.data.batches import make_batches
from fcit_hpc.fed.strategies import FedProx, ServerOptConfig
from fcit_hpc.model.build import build_model
from fcit_hpc.model.steps import lr_at
from fcit_hpc.train.base import LocalOpt
from fcit_hpc.train.torch_trainer import TorchTrainer

# DeepSpeed's ZeRO wraps torch AdamW over flat fp32 partitions: same arithmetic, measured bitwise
# equal here; the stated tolerance leaves room for other BLAS builds.
ATOL = 1e-6


def _setup(prox=0.0):
    cfg = load_config(None, ["lora.lora_dropout=0.0", "method.name=disco", "lora.max_subspaces=3"])
    model, adapter, tok = build_model(cfg.model, cfg.lora, 3)
    start = adapter.init_vector(torch.Generator().manual_seed(0)).numpy()
    start[-adapter.layers[-1].lora_B[0].numel() :] = 0.01  # non-zero B so every grad is non-zero
    samples = make_split(1, 20, 0, "train")
    batches = make_batches(
        tok, samples, 4, 48, epochs=1, generator=torch.Generator().manual_seed(1)
    )
    kw = dict(opt=LocalOpt(lr=5e-3, weight_decay=0.01, warmup_ratio=0.2))
    if prox:  # FedProx's client term, as the strategy adds it
        kw["terms"] = FedProx(ServerOptConfig("fedprox", prox_mu=prox)).client_terms
    return model, adapter, start, batches, kw


def test_lr_schedule_warmup_then_cosine():
    total, base = 10, 1.0
    lrs = [lr_at(s, total, base, 0.2) for s in range(total)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # first cosine step, progress 0
    assert lrs[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))


def test_torch_trainer_trains_only_its_subspace():
    model, adapter, start, batches, kw = _setup()
    before = {k: adapter.get(k).clone() for k in range(3)}
    res = TorchTrainer().train(model, adapter, 1, start, batches=batches, **kw)
    assert not np.allclose(res.vector, start)
    for k in (0, 2):
        assert torch.equal(adapter.get(k), before[k])
    assert res.steps == len(batches) == 5


@pytest.mark.parametrize(
    "stage,offload,prox",
    [(0, False, 0.0), (1, False, 0.0), (2, False, 0.0), (2, True, 0.0), (2, False, 0.05)],
)
def test_deepspeed_matches_torch(stage, offload, prox):
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer

    model, adapter, start, batches, kw = _setup(prox)
    ref = TorchTrainer().train(model, adapter, 0, start, batches=batches, **kw)
    ds = DeepSpeedTrainer(stage, offload, 4).train(model, adapter, 0, start, batches=batches, **kw)
    assert np.abs(ref.vector - start).max() > 1e-3  # it did train
    np.testing.assert_allclose(ds.vector, ref.vector, atol=ATOL, rtol=0)
    assert ds.loss == pytest.approx(ref.loss, abs=1e-6)
    # a second client on the same rank starts afresh (new engine, new optimizer)
    ds2 = DeepSpeedTrainer(stage, offload, 4).train(model, adapter, 0, start, batches=batches, **kw)
    np.testing.assert_array_equal(ds2.vector, ds.vector)
    # the destroyed engines left no hook on the module (they would run on every later forward)
    from fcit_hpc.train.ds_trainer import deepspeed_hooks

    assert deepspeed_hooks(model) == []


def assert_deepspeed_matches_torch(k, stage, setup, **extra):
    """Train subspace k with both trainers from the same start (``extra``: context/terms)."""
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer

    model, adapter, start, batches, kw = setup
    ref = TorchTrainer().train(model, adapter, k, start, batches=batches, **kw, **extra)
    ds = DeepSpeedTrainer(stage, False, 4).train(
        model, adapter, k, start, batches=batches, **kw, **extra
    )
    assert np.abs(ref.vector - start).max() > 1e-3  # it did train
    np.testing.assert_allclose(ds.vector, ref.vector, atol=ATOL, rtol=0)


def test_deepspeed_unknown_stage_is_a_clear_error():
    """Stages 0–3 are offered (ZeRO-3: tests/test_zero3.py)."""
    from fcit_hpc.train.ds_trainer import DeepSpeedTrainer

    with pytest.raises(ValueError, match="train.zero_stage: 4 is not one of 0, 1, 2, 3"):
        DeepSpeedTrainer(4, False, 4)
