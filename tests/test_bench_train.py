"""`fcit bench train`: hf-shape models, the side-by-side run, and the check that both sides do the
same work (same loss, same LoRA update as a plain PEFT step)."""

import json
import os
import socket
import subprocess

import numpy as np
import pytest
import torch

from fcit_hpc.bench_train import (
    PlainLoop,
    add_peft,
    batch_shape,
    device_peak,
    load_peft_lora,
    peft_lora,
    plain_base,
    synthetic_batches,
    train_flops,
)
from fcit_hpc.cli import main
from fcit_hpc.config import load_config
from fcit_hpc.errors import ConfigError
from fcit_hpc.fed.comm import LocalComm
from fcit_hpc.fed.context import init_group_worlds
from fcit_hpc.model.build import build_model
from fcit_hpc.run import make_trainer, run_model
from fcit_hpc.runtime import LaunchInfo, make_runtime
from fcit_hpc.train.base import LocalOpt

from .conftest import BIN, ROOT

LLAVA_7B = ROOT / "configs" / "hf" / "llava-1.5-7b"


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A folder with only the config.json of a tiny LLaVA (Llama text, CLIP vision, 16 image
    tokens), as written by transformers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    path = tmp_path_factory.mktemp("tiny_llava")
    LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=300, vision_feature_layer=-2
    ).save_pretrained(path)
    return path


def _overrides(path, *more):
    return [
        "model.name=hf-shape",
        f"model.path={path}",
        "model.max_seq_len=16",
        "lora.lora_r=4",
        "lora.lora_alpha=8",
        "lora.lora_dropout=0.0",
        "lora.max_subspaces=1",
        "train.batch_size=2",
        "train.lr=0.01",
        "train.weight_decay=0.01",
        *more,
    ]


def _fcit_free_port(*args):
    """``fcit`` as a plain process whose DeepSpeed world listens on a free port (this test
    process may hold the default one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, FCIT_DS_PORT_BASE=str(port))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [str(BIN / "fcit"), *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def test_llava_7b_config_is_the_published_architecture():
    """configs/hf/llava-1.5-7b builds LLaVA-1.5-7B: 7,063,427,072 parameters (Vicuna-7B with a
    32,064-token vocabulary, CLIP ViT-L/14-336, two-layer GELU projector)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    c = AutoConfig.from_pretrained(LLAVA_7B, local_files_only=True)
    t, v = c.text_config, c.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (4096, 11008, 32)
    assert (t.num_attention_heads, t.vocab_size) == (32, 32064)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == (1024, 24, 16)
    assert (v.image_size, v.patch_size, c.projector_hidden_act) == (336, 14, "gelu")
    assert (c.image_token_id, c.vision_feature_layer) == (32000, -2)
    assert c.vision_feature_select_strategy == "default"
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(c, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072
    # the bench's sample and FLOPs: 576 image + 128 text tokens; LoRA r 64 on gate/up/down
    shape = batch_shape(model, 128)
    assert (shape.seq_len, shape.image_tokens) == (704, 576)
    lora = 32 * 3 * 64 * (4096 + 11008)
    n_lm = 7_063_427_072 - 303_507_456 - 20_979_712 - 32064 * 4096  # less vision, projector, emb
    n_vis = 303_507_456 - 577 * 1024  # less its position embedding table
    want = 4 * (
        704 * (4 * n_lm + 6 * lora + 12 * 32 * 704 * 4096) + 2 * n_vis * 577 + 2 * 20_979_712 * 576
    )
    assert train_flops(model, lora, shape, 4) == pytest.approx(want, rel=1e-12)


def test_hf_shape_model_is_drawn_from_init_seed(tiny_llava):
    cfg = load_config(None, _overrides(tiny_llava))
    a, _, tok = build_model(cfg.model, cfg.lora, 1)
    b, _, _ = build_model(cfg.model, cfg.lora, 1)
    seeded = load_config(None, _overrides(tiny_llava, "model.init_seed=7"))
    c, _, _ = build_model(seeded.model, seeded.lora, 1)
    assert tok is None  # a config has no vocabulary
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    w = sa["model.language_model.layers.0.mlp.up_proj.base.weight"]
    assert w.std().item() == pytest.approx(0.02, rel=0.1) and torch.isfinite(w).all()
    assert torch.equal(
        sa["model.language_model.norm.weight"],
        torch.ones_like(sa["model.language_model.norm.weight"]),
    )
    bf = load_config(None, _overrides(tiny_llava, "train.precision=bf16"))
    rt = make_runtime(bf.train, bf.federation, 0, 1, launch=LaunchInfo())
    m, _, _ = run_model(bf, 1, rt)
    assert m.lm_head.weight.dtype == torch.bfloat16


def test_hf_shape_missing_config_names_the_field(tmp_path):
    cfg = load_config(None, _overrides(tmp_path))
    with pytest.raises(ConfigError, match="model.path: .*config.json not found"):
        build_model(cfg.model, cfg.lora, 1)


@pytest.mark.parametrize(
    "name,backend", [("hf-shape", "torch"), ("hf-shape", "deepspeed"), ("tiny-llava", "torch")]
)
def test_fcit_step_equals_plain_peft_step(tiny_llava, name, backend):
    """One step of fcit's trainer and one plain PEFT step from the same start on the same batch:
    the same loss and the same LoRA weights after AdamW (fp32), so the side-by-side compares the
    same work. (tiny-llava: fcit's own LLaVA, whose image token is id 3, not the vocabulary's
    end.)"""
    extra = [f"train.backend={backend}", "train.zero_stage=2"] if backend == "deepspeed" else []
    cfg = load_config(None, _overrides(tiny_llava, f"model.name={name}", *extra))
    rt = make_runtime(cfg.train, cfg.federation, 0, 1, launch=LaunchInfo())
    init_group_worlds(cfg.train.backend, LocalComm(), rt)
    model, adapter, _ = run_model(cfg, 1, rt)
    shape = batch_shape(model, cfg.model.max_seq_len)
    batches = synthetic_batches(shape, 2, 1, 0, device=rt.device)
    ids = batches[0]["input_ids"]
    assert (ids == shape.image_token_id).sum() == 2 * shape.image_tokens > 0
    start = adapter.init_vector(torch.Generator().manual_seed(0)).numpy()
    start[start == 0] = 0.01  # B != 0, so A gets a gradient too
    opt = LocalOpt(cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_ratio)
    res = make_trainer(cfg, rt).train(model, adapter, 0, start, batches=batches, opt=opt)

    plain = add_peft(plain_base(cfg, rt), cfg)
    params = peft_lora(plain, list(adapter.names))
    load_peft_lora(params, start)
    loss = PlainLoop(plain, params, cfg, rt).step(0, 1, batches[0])
    after = torch.cat([p.detach().reshape(-1) for p in params]).numpy()

    assert res.loss == pytest.approx(float(loss), rel=1e-5)
    lr = cfg.train.lr
    assert np.abs(res.vector - start).min() > 0.5 * lr  # every weight moved: a full Adam step
    np.testing.assert_allclose(res.vector, after, rtol=0, atol=1e-3 * lr)


def test_bench_train_prints_every_field(tiny_llava, tmp_path):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        "\n".join(
            [
                "model: {name: hf-shape, path: " + str(tiny_llava) + ", max_seq_len: 16}",
                "lora: {lora_r: 4, lora_alpha: 8, lora_dropout: 0.0, max_subspaces: 1}",
                "train: {backend: deepspeed, zero_stage: 2, batch_size: 2}",
            ]
        )
    )
    out = tmp_path / "bench.json"
    args = [str(cfg), "--steps", "2", "--warmup", "1", "--json", str(out), "train.precision=bf16"]
    p = _fcit_free_port("bench", "train", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    text = p.stdout
    for field in (
        "| tokens/s |",
        "| s/step |",
        "| s/step, median |",
        "| peak memory GB |",
        "| set-up s, first client |",
        "| set-up s, next client |",
        "| MFU % | n/a | n/a |",  # CPU: no peak
        "| mean loss |",
        "fcit (deepspeed ZeRO-2)",
        "plain HF + PEFT",
        "batch 2 x 32 tokens (16 image)",
        "set-up share of a client's local training at 100 steps per client (assumed",
        "steps per client on",
    ):
        assert field in text, (field, text)
    memory = next(line for line in text.splitlines() if line.startswith("| peak memory GB"))
    assert "n/a" not in memory  # VmHWM can be reset here
    r = json.loads(out.read_text())
    assert r["precision"] == "bf16" and r["tokens_per_step"] == 64
    assert len(r["fcit"]["steps"]) == len(r["plain"]["steps"]) == 2
    d = r["derived"]
    assert d["ratio_tokens_per_s"] > 0 and d["ratio_memory"] > 0
    assert 0 < d["setup_share_next"] < 1
    # the same start, batches and schedule: the losses agree (bf16 compute, fp32 LoRA branch in
    # PEFT)
    assert r["fcit"]["loss"] == pytest.approx(r["plain"]["loss"], rel=1e-2)


def test_bench_train_bad_flag_names_it(capsys):
    cfg = str(ROOT / "configs" / "llava15_7b_shape.yaml")
    assert main(["bench", "train", cfg, "--steps", "0"]) == 2
    assert "--steps: 0 is out of range" in capsys.readouterr().err
    assert main(["bench", "train", cfg, "--client-steps", "0"]) == 2
    assert "--client-steps: 0 is out of range" in capsys.readouterr().err
    assert main(["bench", "rounds", cfg]) == 2


def test_fcit_run_refuses_hf_shape(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = str(ROOT / "configs" / "llava15_7b_shape.yaml")
    assert main(["run", cfg, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.name: 'hf-shape'" in err and "fcit bench train" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "name,precision,peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "fp16", 835e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5e12),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7e12),
        ("Tesla V100-SXM2-16GB", "fp16", None),
    ],
)
def test_device_peaks(name, precision, peak):
    assert device_peak(name, precision) == peak


def test_bench_train_rows_per_variant_on_variable_lengths(tiny_llava, tmp_path, capsys):
    """Variable lengths: the padded rows carry padding, packing's row none; every variant trains
    the same samples to the same loss; Liger is refused here with its reason (no GPU; under the
    interpreter that conftest sets, the op it cannot run)."""
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("# text tokens per sample\n4\n16\n9\n2\n12\n")
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        "model: {name: hf-shape, path: " + str(tiny_llava) + ", max_seq_len: 16}\n"
        "lora: {lora_r: 4, lora_alpha: 8, lora_dropout: 0.0, max_subspaces: 1}\n"
        "train: {batch_size: 2}\n"
    )
    out = tmp_path / "bench.json"
    args = ["--steps", "2", "--warmup", "1", "--lengths", f"file:{lengths}", "--json", str(out)]
    assert main(["bench", "train", str(cfg), *args, "--variants", "packing,liger"]) == 0
    text = capsys.readouterr().out
    assert f"lengths: 5 lengths from {lengths} (text tokens 2..16) (+16 image)" in text
    assert "| fcit (torch) + liger | refused: train.liger" in text
    r = json.loads(out.read_text())
    assert r["variants"] == ["plain", "fcit", "liger", "packing"]
    sides, d = r["sides"], r["derived"]
    # 3 batches of 2 samples, text tokens 4 16 | 9 2 | 12 4 (the file again from the top), +16
    # image tokens each; timed after the warm-up: 25 + 18 padded to 2 x 25, 28 + 20 to 2 x 28
    assert sides["fcit"]["tokens"] == [53.0, 45.5] == sides["plain"]["tokens"]
    assert sides["packing"]["tokens"] == [45.5, 45.5]
    assert r["real_tokens_per_step"] == 45.5
    for key in ("fcit", "packing"):
        assert sides[key]["loss"] == pytest.approx(sides["plain"]["loss"], rel=1e-5)
    assert d["packing"]["real_tokens_per_s"] == pytest.approx(
        45.5 / sides["packing"]["step_s"], rel=1e-9
    )


@pytest.mark.parametrize(
    "spec,error",
    [
        ("uniform:1:4", "2 <= LO <= HI"),
        ("uniform:9:4", "2 <= LO <= HI"),
        ("uniform:x", "2 <= LO <= HI"),
        ("lognormal:3", "want fixed, uniform:LO:HI or file:PATH"),
        ("file:/nonexistent/lengths.txt", "cannot read"),
    ],
)
def test_bad_lengths_name_the_flag(spec, error):
    from fcit_hpc.bench_lengths import parse_lengths

    with pytest.raises(ConfigError, match=f"--lengths: .*{error}"):
        parse_lengths(spec)


def test_lengths_file_names_the_bad_line(tmp_path):
    from fcit_hpc.bench_lengths import parse_lengths

    p = tmp_path / "l.txt"
    p.write_text("12\n\n7x\n")
    with pytest.raises(ConfigError, match=r"--lengths: .*l.txt:3: '7x' is not an integer"):
        parse_lengths(f"file:{p}")
    p.write_text("12\n30\n")
    assert parse_lengths(f"file:{p}").draw(5, 99, 0) == [12, 30, 12, 30, 12]
    u = parse_lengths("uniform:3:5").draw(200, 99, 0)
    assert set(u) == {3, 4, 5}
    assert parse_lengths("fixed").draw(2, 99, 0) == [99, 99]


def test_unknown_variant_names_the_flag(capsys):
    cfg = str(ROOT / "configs" / "llava15_7b_shape.yaml")
    assert main(["bench", "train", cfg, "--variants", "liger,fast"]) == 2
    assert "--variants: unknown 'fast'" in capsys.readouterr().err
