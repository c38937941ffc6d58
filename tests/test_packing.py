"""Packed, padding-free batches (``train.packing``): a batch's samples in one row with position ids
restarting per sample. Reference: every sample run alone, unpadded. In float64 the packed row's
per-sample losses and its LoRA gradient equal the one-at-a-time run's to rounding (stated
tolerance 1e-9 relative: the sums run in a different order); a training step with packing equals
the padded one in float32."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fcit_hpc.benchmark.synthetic import make_split
from fcit_hpc.config import load_config
from fcit_hpc.data.batches import (
    encode_sample,
    make_batches,
    pack_batch,
    packed_kwargs,
    real_tokens,
)
from fcit_hpc.data.sample import Sample
from fcit_hpc.errors import ConfigError
from fcit_hpc.model.build import build_model
from fcit_hpc.train.base import LocalOpt
from fcit_hpc.train.torch_trainer import TorchTrainer

RTOL64 = 1e-9


def update_mismatch(a, b, start) -> float:
    """‖a − b‖ / ‖b − start‖: how far two trained vectors' updates differ, relative to the update.
    Per entry, Adam's step divides by √v, so float32 rounding of a near-zero gradient can move a
    single weight by a share of lr; the update as a whole agrees to rounding (stated tolerance:
    1e-3)."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b - start))


def _samples(name: str, tmp_path, n: int = 4) -> list[Sample]:
    """Synthetic samples of different lengths; with an image each for the LLaVA model."""
    samples = make_split(1, n, 0, "train")
    if name != "tiny-llava":
        return samples
    from PIL import Image

    out = []
    for i, s in enumerate(samples):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), (60 * i, 255 - 50 * i, 7 * i)).save(path)
        out.append(Sample(s.instruction, s.answer, s.task, str(path)))
    return out


def _model(name: str, *more):
    cfg = load_config(None, [f"model.name={name}", "lora.lora_dropout=0.0", *more])
    model, adapter, tok = build_model(cfg.model, cfg.lora, 1)
    start = adapter.init_vector(torch.Generator().manual_seed(0)).numpy()
    start[start == 0] = 0.01  # B != 0: A gets a gradient too
    adapter.set(0, start)
    adapter.select((0,), ())
    return cfg, model, adapter, tok, start


def _ce_sum(logits, labels):
    """Σ next-token cross-entropy over the targets of one row [1, T, V] / [1, T]."""
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")


def _pixels(tok, samples):
    return {"pixel_values": torch.stack([tok.pixels(s.image) for s in samples]).double()}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llava"])
def test_packed_row_equals_each_sample_alone_float64(name, tmp_path):
    cfg, model, adapter, tok, _ = _model(name)
    model.double()
    samples = _samples(name, tmp_path)
    max_len = cfg.model.max_seq_len + tok.num_image_tokens
    rows = [encode_sample(tok, s, max_len) for s in samples]
    assert len({len(x) for x, _ in rows}) > 1  # lengths differ: padding would be real
    params = adapter.params(0)

    alone_loss, alone_grad = [], [torch.zeros_like(p) for p in params]
    for i, (x, y) in enumerate(rows):
        batch = {"input_ids": torch.tensor([x]), "labels": torch.tensor([y])}
        if tok.num_image_tokens:
            batch.update(_pixels(tok, samples[i : i + 1]))
        loss = _ce_sum(model(**batch, use_cache=False).logits, batch["labels"])
        for g, d in zip(alone_grad, torch.autograd.grad(loss, params), strict=True):
            g += d
        alone_loss.append(loss.detach())

    batch = pack_batch(rows)
    assert batch["input_ids"].shape == (1, sum(len(x) for x, _ in rows))
    assert "attention_mask" not in batch and real_tokens(batch) == batch["input_ids"].numel()
    if tok.num_image_tokens:
        batch.update(_pixels(tok, samples))
        n_img = int((batch["input_ids"] == tok.image_token_id).sum())
        assert n_img == len(rows) * tok.num_image_tokens
    out = model(**batch, **packed_kwargs(batch))
    ends = np.cumsum([0] + [len(x) for x, _ in rows])
    packed = [
        _ce_sum(out.logits[:, a:b], batch["labels"][:, a:b])
        for a, b in zip(ends[:-1], ends[1:], strict=True)
    ]
    torch.testing.assert_close(
        torch.stack(packed).detach(), torch.stack(alone_loss), rtol=RTOL64, atol=0
    )
    # the row's loss counts no target across a boundary: the sum of the samples' sums
    total = _ce_sum(out.logits, batch["labels"])
    torch.testing.assert_close(total.detach(), sum(alone_loss), rtol=RTOL64, atol=0)
    for g, a in zip(torch.autograd.grad(total, params), alone_grad, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(g, a, rtol=RTOL64, atol=RTOL64 * float(a.abs().max()))


def test_packing_does_not_leak_across_samples():
    """Changing the first sample changes nothing of the second sample's logits in the row."""
    _, model, _, tok, _ = _model("tiny-llama")
    a, b, c = (encode_sample(tok, s, 48) for s in make_split(2, 3, 1, "train"))
    with torch.no_grad():
        ab = model(**pack_batch([a, b]), use_cache=False).logits[:, len(a[0]) :]
        cb = model(**pack_batch([c, b]), use_cache=False).logits[:, len(c[0]) :]
    torch.testing.assert_close(ab, cb, rtol=1e-5, atol=1e-5)


def test_packed_step_equals_padded_step(tmp_path):
    """One client's local training (3 steps, fp32) with and without packing: the same losses and
    the same trained subspace (mean token loss over the same targets)."""
    out = {}
    for pack in (False, True):
        cfg, model, adapter, tok, start = _model("tiny-llava", f"train.packing={pack}")
        samples = _samples("tiny-llava", tmp_path, 6)
        gen = torch.Generator().manual_seed(3)
        batches = make_batches(tok, samples, 2, 48, epochs=1, generator=gen, pack=cfg.train.packing)
        if pack:
            assert all(b["input_ids"].shape[0] == 1 for b in batches)
            assert all("attention_mask" not in b for b in batches)
        opt = LocalOpt(1e-2, 0.0, 0.0)
        out[pack] = TorchTrainer().train(model, adapter, 0, start, batches=batches, opt=opt)
    assert out[True].loss == pytest.approx(out[False].loss, rel=1e-5)
    assert np.abs(out[False].vector - start).max() > 1e-3
    assert update_mismatch(out[True].vector, out[False].vector, start) < 1e-3


def test_packing_refuses_client_groups():
    with pytest.raises(ConfigError, match="train.packing: .*gpus_per_client 2"):
        load_config(None, ["train.packing=true", "train.gpus_per_client=2"])


@pytest.mark.slow
def test_methods_that_run_the_model_themselves_see_the_packing(tmp_path):
    """EWC's Fisher and LwF's teacher forward run the model on the client's batches outside the
    trainer's forward: packed batches give what padded ones give (float32)."""
    from fcit_hpc.methods.ewc import fisher_diagonal
    from fcit_hpc.methods.lwf import Distillation

    cfg, model, adapter, tok, start = _model("tiny-llama")
    samples = _samples("tiny-llama", tmp_path, 4)
    prev = start + 0.01 * np.random.default_rng(0).standard_normal(start.size).astype(np.float32)
    fisher, trained = {}, {}
    for pack in (False, True):
        batches = make_batches(
            tok, samples, 2, 48, epochs=1, generator=torch.Generator().manual_seed(3), pack=pack
        )
        fisher[pack] = fisher_diagonal(model, adapter, start, batches)
        term = Distillation(model, adapter, prev, 1.0, temperature=2.0)
        opt = LocalOpt(1e-2, 0.0, 0.0)
        trained[pack] = TorchTrainer().train(
            model, adapter, 0, start, batches=batches, opt=opt, batch_terms=[term]
        )
    np.testing.assert_allclose(
        fisher[True], fisher[False], rtol=1e-4, atol=1e-6 * fisher[False].max()
    )
    assert fisher[False].max() > 0
    assert trained[True].loss == pytest.approx(trained[False].loss, rel=1e-5)
    assert update_mismatch(trained[True].vector, trained[False].vector, start) < 1e-3
