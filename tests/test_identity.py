"""Identity encoders behind one interface: hashing, packaged MiniLM, HF CLIP text tower (local
path), open_clip (local checkpoint)."""

import json

import numpy as np
import pytest
import torch

from fcit_hpc.benchmark.llava_json import user_instruction
from fcit_hpc.benchmark.mini import GENERATORS, samples
from fcit_hpc.benchmark.synthetic import TASK_NAMES, make_split
from fcit_hpc.config import load_config
from fcit_hpc.model.identity import (
    CLIPTextEncoder,
    HashingEncoder,
    MiniLMEncoder,
    identity_token,
    make_encoder,
)


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _separation(enc):
    toks = []
    for t in range(len(TASK_NAMES)):
        s = [x.instruction for x in make_split(t, 40, 0, "train")]
        toks.append((identity_token(enc, s[:20]), identity_token(enc, s[20:])))
    within = np.mean([_cos(a, b) for a, b in toks])
    across = max(_cos(toks[i][0], toks[j][0]) for i in range(8) for j in range(8) if i != j)
    return within, across


@pytest.mark.parametrize("make", [lambda: HashingEncoder(256), MiniLMEncoder])
def test_tasks_separate_around_tau(make):
    """The 8-task synthetic suite (not fcit-mini, whose figures are descriptive) is built to
    separate around DKO's τ = 0.9."""
    within, across = _separation(make())
    assert within >= 0.95 and across <= 0.85, (within, across)


def test_fcit_mini_templates_blur_task_identity():
    """fcit-mini's instruction templates make identity tokens less of a task label than the one
    template per task of recipe 1 (within-task mean 0.996, across-task max 0.728 with MiniLM):
    the figures of `fcit data identity`, 4 clients x 20 samples per task."""
    from fcit_hpc.eval.identity_report import separation

    ins = {
        n: [user_instruction(q) for _, q, _, _ in samples(n, "train", 80, seed=0)]
        for n in GENERATORS
    }
    rep = separation(MiniLMEncoder(), ins)
    assert rep["within_mean"] < 0.996 and rep["across_max"] > 0.728, rep
    assert rep["within"][rep["loosest_task"]] == rep["within_min"]


def test_identity_report_prints_descriptive_figures(capsys):
    """`fcit data identity` prints the reference thresholds as descriptions, with the loosest
    task and the closest pair, and succeeds whatever the figures."""
    import argparse

    from fcit_hpc.cli import cmd_identity

    assert cmd_identity(argparse.Namespace(encoder="hashing", seed=0)) == 0
    out = capsys.readouterr().out.splitlines()
    within = next(ln for ln in out if ln.startswith("within-task:"))
    across = next(ln for ln in out if ln.startswith("across-task:"))
    assert "descriptive" in within and "descriptive" in across
    assert any(n in within.split("(")[0] for n in GENERATORS)
    assert across.split("(")[1].count("'") == 4  # the closest pair of tasks


def test_minilm_in_chunks_equals_all_at_once():
    """Chunks of 3 (each padded to its own longest text) against one batch of all 8 texts, from
    one word to past the 128-token truncation."""
    texts = [
        "x",
        "Reverse the letters of the word: kelp",
        "Add the two numbers: 12 + 30 =",
        "What is shown in the picture? " * 30,  # truncated at 128 tokens
        "ok",
        "Sort these digits in ascending order: 9 1 8 2 7 3 6 4 5",
        "Is 4 an even or an odd number?",
        "Name the colour.",
    ]
    enc = MiniLMEncoder(torch.device("cpu"), batch_size=len(texts))
    whole = enc.encode(texts)
    enc.batch_size = 3
    chunked = enc.encode(texts)
    assert chunked.shape == whole.shape == (8, enc.dim) and chunked.dtype == np.float32
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    assert enc.encode([]).shape == (0, enc.dim)


def test_minilm_is_the_normalised_mean_of_its_token_states():
    """Each text's feature against the formula, one text at a time (no padding), in float64: the
    mean of the model's last hidden states over the (at most 128) tokens, L2-normalised."""
    enc = MiniLMEncoder(torch.device("cpu"), batch_size=4)
    texts = ["x", "Add the two numbers: 12 + 30 =", "Name the colour.", "Why? " * 100]
    f = enc.encode(texts)
    for i, t in enumerate(texts):
        b = enc.tok(t, truncation=True, max_length=128, return_tensors="pt")
        assert b["input_ids"].shape[1] <= 128
        with torch.no_grad():
            h = enc.model(**b).last_hidden_state[0].double()
        ref = h.mean(0) / h.mean(0).norm()
        np.testing.assert_allclose(f[i], ref.numpy(), atol=1e-5)


def test_hashing_is_deterministic_and_normalised():
    e = HashingEncoder(64)
    a = e.encode(["Add the two numbers: 1 + 2 =", "x"])
    assert np.array_equal(a, e.encode(["Add the two numbers: 1 + 2 =", "x"]))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)


def _write_clip_tokenizer(d):
    chars = [chr(c) for c in range(33, 127)]
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def test_hf_clip_text_tower_from_local_path(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    n = _write_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    tok.save_pretrained(tmp_path)
    cfg = CLIPTextConfig(
        vocab_size=n,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        eos_token_id=n - 1,
        bos_token_id=n - 2,
        pad_token_id=n - 1,
    )
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(tmp_path)
    enc = make_encoder(
        load_config(
            None, ["method.identity_encoder=clip", f"method.encoder_path={tmp_path}"]
        ).method,
        torch.device("cpu"),
    )
    assert isinstance(enc, CLIPTextEncoder) and enc.dim == 32
    texts = ["What is the first letter", "Sort these digits " * 40]  # second exceeds 77 tokens
    f = enc.encode(texts)
    enc.batch_size = 1  # one text per chunk (no padding)
    np.testing.assert_allclose(enc.encode(texts), f, atol=1e-5)
    # reference: the model's pooled output = hidden state at the EOS token, computed by hand
    model = CLIPTextModel.from_pretrained(tmp_path).eval()
    for i, t in enumerate(texts):
        ids = tok(t, truncation=True, max_length=77, return_tensors="pt")["input_ids"]
        assert ids.shape[1] <= 77
        with torch.no_grad():
            h = model(input_ids=ids).last_hidden_state[0]
        eos = int((ids[0] == n - 1).nonzero()[0])
        np.testing.assert_allclose(f[i], h[eos].numpy(), atol=1e-5)


def test_open_clip_from_local_checkpoint(tmp_path):
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 16,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    (tmp_path / "fcit-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "fcit-tiny-clip.json")
    torch.manual_seed(0)
    m = open_clip.create_model("fcit-tiny-clip")
    ckpt = tmp_path / "tiny.pt"
    torch.save(m.state_dict(), ckpt)
    enc = make_encoder(
        load_config(
            None,
            [
                "method.identity_encoder=open_clip",
                f"method.encoder_path={ckpt}",
                "method.open_clip_model=fcit-tiny-clip",
            ],
        ).method
    )
    assert enc.dim == 16
    texts = ["Reverse the letters of the word: kelp", "Is 4 an even or an odd number?"]
    tok = open_clip.get_tokenizer("fcit-tiny-clip")
    with torch.no_grad():
        ref = m.eval().encode_text(tok(texts)).numpy()
    np.testing.assert_allclose(enc.encode(texts), ref, atol=1e-5)
    enc.batch_size = 1
    np.testing.assert_allclose(enc.encode(texts), ref, atol=1e-5)


def test_encoder_path_required():
    from fcit_hpc.errors import ConfigError

    with pytest.raises(ConfigError, match="method.encoder_path: required"):
        load_config(None, ["method.identity_encoder=clip"])
