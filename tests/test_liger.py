"""Liger kernels (``train.liger``): the switch's decisions and refusals, and on the CPU under the
Triton interpreter (conftest sets TRITON_INTERPRET=1) the ops that run there, fused linear
cross-entropy and RoPE, against the unfused model: the same loss and LoRA gradients in float32
(stated tolerance: 1e-5 relative on the loss, 1e-4 of the largest gradient entry; the fused loss
sums its chunks in another order), without the [tokens × vocab] logits."""

import numpy as np
import pytest
import torch

from fcit_hpc.config import load_config
from fcit_hpc.data.batches import make_batches
from fcit_hpc.data.sample import Sample
from fcit_hpc.errors import ConfigError
from fcit_hpc.model.liger import logits_kwargs, resolve_ops
from fcit_hpc.run import run_model
from fcit_hpc.runtime import LaunchInfo, make_runtime
from fcit_hpc.train.base import LocalOpt
from fcit_hpc.train.torch_trainer import TorchTrainer

from .test_packing import update_mismatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
INTERPRETED = ["train.liger_ops=[fused_linear_cross_entropy,rope]"]  # what the interpreter runs


def _train(*more):
    return load_config(None, list(more)).train


def test_switch_off_and_auto_on_the_cpu_apply_nothing():
    assert resolve_ops(_train("train.liger=off"), CUDA) == ()
    assert resolve_ops(_train("train.liger=auto"), CPU) == ()  # auto: CUDA only


def test_auto_on_cuda_takes_every_op_and_drops_the_fused_loss_under_zero3():
    assert resolve_ops(_train(), CUDA) == (
        "fused_linear_cross_entropy",
        "rms_norm",
        "swiglu",
        "rope",
    )
    z3 = _train("train.backend=deepspeed", "train.zero_stage=3", "train.precision=bf16")
    assert resolve_ops(z3, CUDA) == ("rms_norm", "swiglu", "rope")


def test_on_is_refused_with_the_reason():
    z3 = ["train.backend=deepspeed", "train.zero_stage=3", "train.precision=bf16"]
    with pytest.raises(ConfigError, match="train.liger_ops: fused_linear_cross_entropy .*ZeRO-3"):
        resolve_ops(_train("train.liger=on", *z3), CUDA)
    # the interpreter (liger-kernel 0.8.5) cannot run RMSNorm's kernel: a Python float argument
    with pytest.raises(ConfigError, match="train.liger_ops: rms_norm does not run under the"):
        resolve_ops(_train("train.liger=on"), CPU)


def test_on_without_a_gpu_or_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="train.liger: on needs a CUDA device"):
        resolve_ops(_train("train.liger=on"), CPU)


def test_not_installed_is_refused_for_on_and_skipped_for_auto(monkeypatch):
    import fcit_hpc.model.liger as liger

    monkeypatch.setattr(liger, "installed", lambda: False)
    assert resolve_ops(_train(), CUDA) == ()
    with pytest.raises(ConfigError, match=r"not installed .*fcit_hpc\[fast\]"):
        resolve_ops(_train("train.liger=on"), CUDA)


def test_bad_op_names_the_field():
    with pytest.raises(ConfigError, match="train.liger_ops: .*out of range"):
        load_config(None, ["train.liger_ops=[rmsnorm]"])


def _pair(name: str):
    """(config, fused model, its adapter, unfused model, its adapter, tokenizer), the same weights
    and LoRA start (B != 0)."""
    out = []
    for liger in ("on", "off"):
        over = [f"model.name={name}", "lora.lora_dropout=0.0", f"train.liger={liger}"]
        cfg = load_config(None, over + INTERPRETED)
        rt = make_runtime(cfg.train, cfg.federation, 0, 1, launch=LaunchInfo())
        model, adapter, tok = run_model(cfg, 1, rt)
        start = adapter.init_vector(torch.Generator().manual_seed(0)).numpy()
        start[start == 0] = 0.01
        adapter.set(0, start)
        adapter.select((0,), ())
        model.train()
        out.append((cfg, model, adapter, tok, start))
    return out


def _batch(tok, name, tmp_path, pack=False):
    """Two short samples of different lengths (the interpreter takes ~10 ms per kernel program:
    one per token and layer for RoPE, one per token for the loss)."""
    samples = [Sample("Colour?", "red", 0), Sample("Which shape is it?", "a circle", 0)]
    if name == "tiny-llava":
        from PIL import Image

        for i, s in enumerate(samples):
            p = tmp_path / f"{i}.png"
            Image.new("RGB", (32, 32), (50 * i, 9, 200 - 30 * i)).save(p)
            samples[i] = Sample(s.instruction, s.answer, s.task, str(p))
    return make_batches(
        tok, samples, 2, 48, epochs=1, generator=torch.Generator().manual_seed(0), pack=pack
    )[0]


@pytest.mark.parametrize("name", ["tiny-llama", pytest.param("tiny-llava", marks=pytest.mark.slow)])
def test_fused_loss_and_rope_match_the_unfused_model(name, tmp_path):
    (_, fused, fa, tok, _), (_, plain, pa, _, _) = _pair(name)
    try:
        assert fused.fcit_liger.ops == ("fused_linear_cross_entropy", "rope")
        batch = _batch(tok, name, tmp_path)
        out = fused(**batch)
        assert out.logits is None  # training: the loss without the logits
        ref = plain(**batch)
        assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-5)
        for g, r in zip(
            torch.autograd.grad(out.loss, fa.params(0)),
            torch.autograd.grad(ref.loss, pa.params(0)),
            strict=True,
        ):
            scale = float(r.abs().max())
            assert scale > 0
            torch.testing.assert_close(g, r, rtol=0, atol=1e-4 * scale)
        # a caller that needs the logits gets them, with the same loss
        with_logits = fused(**batch, **logits_kwargs(fused))
        assert with_logits.logits.shape[:2] == batch["input_ids"].shape
        assert float(with_logits.loss) == pytest.approx(float(ref.loss), rel=1e-5)
    finally:
        fused.fcit_liger.restore()


def test_restore_puts_back_the_rope_of_the_architecture():
    from transformers.models.llama import modeling_llama

    before = modeling_llama.apply_rotary_pos_emb
    (_, fused, *_), _ = _pair("tiny-llama")
    assert modeling_llama.apply_rotary_pos_emb is not before  # the library's process-wide patch
    fused.fcit_liger.restore()
    assert modeling_llama.apply_rotary_pos_emb is before


@pytest.mark.slow
def test_local_training_with_liger_and_packing_equals_unfused_padded(tmp_path):
    """A client's local training (2 steps, fp32): fused loss + RoPE + packing against the
    unfused, padded run."""
    (cfg, fused, fa, tok, start), (_, plain, pa, _, _) = _pair("tiny-llava")
    try:
        opt = LocalOpt(1e-2, 0.0, 0.0)
        samples_batches = {
            pack: [_batch(tok, "tiny-llava", tmp_path, pack)] * 2 for pack in (False, True)
        }
        a = TorchTrainer().train(fused, fa, 0, start, batches=samples_batches[True], opt=opt)
        b = TorchTrainer().train(plain, pa, 0, start, batches=samples_batches[False], opt=opt)
    finally:
        fused.fcit_liger.restore()
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert np.abs(b.vector - start).max() > 1e-3
    assert update_mismatch(a.vector, b.vector, start) < 1e-3
    batch = samples_batches[False][0]
    assert (batch["attention_mask"] == 0).any()  # the padded run had padding to skip
