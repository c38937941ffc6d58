"""Batched greedy evaluation: left-padded batches with a per-sample SSA gate α give, token for
token, what each sample gives alone (plain Hugging Face ``generate`` on the unpadded prompt, batch
1) and what a hand-written greedy loop without KV cache gives; the dealing of samples over ranks
and the batch size leave the predictions unchanged."""

import logging
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fcit_hpc.config import load_config
from fcit_hpc.data.images import load_image
from fcit_hpc.data.sample import Sample
from fcit_hpc.eval.generate import greedy_batch, local_samples, predict_local
from fcit_hpc.model.build import build_model
from fcit_hpc.model.tokenizer import ByteTokenizer
from fcit_hpc.seeds import EVAL_DEAL_STRIDE

MAX_NEW = 8
S_MAX, LIVE = 4, 3  # gates cover the first LIVE of S_MAX subspaces
INSTRUCTIONS = [  # prompt lengths from 3 to ~70 tokens
    "Add the two numbers: 12 + 30 =",
    "hi",
    "Reverse the letters of the word: kelp",
    "What is the colour of the square in the picture, and is it on the left or on the right?",
    "",
    "Sort these digits: 9 1 8 2 7 3",
    "Is 4 an even or an odd number?",
    "a b",
]
MODELS = {
    "tiny-llama": ["model.name=tiny-llama"],
    "tiny-llava": ["model.name=tiny-llava"],
    "embedded": ["model.name=embedded"],
}


@pytest.fixture(scope="module", autouse=True)
def torch_ssa_lora():
    """The SSA-LoRA op on its CPU path (what a CPU run takes, conftest's TRITON_INTERPRET would
    send it through the interpreted Triton kernel, which test_kernels checks against it). The
    kernels are imported first, under the interpreter: a @triton.jit function made while
    TRITON_INTERPRET is unset cannot be called by later interpreted tests."""
    import fcit_kernels.triton_ssa_lora  # noqa: F401

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        yield


class IdTokenizer:
    """The model's byte tokenizer, but ``decode`` gives the token ids themselves (so predictions
    compare token for token) and ``eos_token_id`` can be any token."""

    def __init__(self, tok: ByteTokenizer, eos: int):
        self.tok = tok
        self.eos_token_id = eos
        self.pad_token_id = tok.pad_token_id
        self.num_image_tokens = tok.num_image_tokens
        self.image_size = tok.image_size

    def prompt(self, instruction: str) -> list[int]:
        return self.tok.prompt(instruction)

    def decode(self, ids) -> str:
        return ",".join(str(int(i)) for i in ids)

    def pixels(self, path):
        return self.tok.pixels(path)


def _images(tmp_path, n: int) -> list[str | None]:
    """Random RGB images for all but the last sample (a sample without image gets grey)."""
    rng = np.random.default_rng(0)
    paths: list[str | None] = []
    for i in range(n - 1):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return [*paths, None]


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request, tmp_path_factory):
    """(model, adapter, byte tokenizer, samples, α [N, LIVE]) with random nonzero subspaces."""
    cfg = load_config(None, MODELS[request.param])
    model, adapter, tok = build_model(cfg.model, cfg.lora, S_MAX)
    g = torch.Generator().manual_seed(3)
    for k in range(S_MAX):
        adapter.set(k, torch.randn(adapter.numel, generator=g) * 0.05)  # A and B nonzero
    images = _images(tmp_path_factory.mktemp("images"), len(INSTRUCTIONS))
    samples = [Sample(x, "", 0, im) for x, im in zip(INSTRUCTIONS, images, strict=True)]
    alpha = torch.softmax(torch.randn(len(samples), LIVE, generator=g) * 2, dim=-1)
    return model, adapter, tok, samples, alpha


def _pixels(tok, sample: Sample) -> dict:
    return (
        {"pixel_values": load_image(sample.image, tok.image_size)[None]} if tok.image_size else {}
    )


@torch.no_grad()
def hf_alone(model, tok, sample: Sample, eos: int) -> list[int]:
    """Reference: Hugging Face greedy ``generate`` on the sample's prompt alone (batch 1, no
    padding), cut before the first ``eos``."""
    ids = torch.tensor([tok.prompt(sample.instruction)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        **_pixels(tok, sample),
    )
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(eos)] if eos in new else new


@torch.no_grad()
def loop_no_cache(model, tok, sample: Sample, eos: int) -> list[int]:
    """Reference: greedy by hand, the whole sequence through the model at every step (no KV cache,
    no padding, no ``generate``)."""
    ids = torch.tensor([tok.prompt(sample.instruction)])
    new: list[int] = []
    for _ in range(MAX_NEW):
        logits = model(input_ids=ids, use_cache=False, **_pixels(tok, sample)).logits
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


def _alone(model, adapter, tok, samples, alpha, eos: int, ref=hf_alone) -> list[list[int]]:
    out = []
    for i, s in enumerate(samples):
        adapter.set_activation(alpha[i : i + 1])
        out.append(ref(model, tok, s, eos))
    return out


def _batched(
    model, adapter, tok, samples, alpha, eos: int, size: int, decoder=None
) -> list[list[int]]:
    """Greedy in batches of ``size``: Hugging Face ``generate`` (decoder None) or ``decoder``."""
    idt = IdTokenizer(tok, eos)
    out = []
    for start in range(0, len(samples), size):
        part = samples[start : start + size]
        adapter.set_activation(alpha[start : start + size])
        texts = greedy_batch(
            model,
            idt,
            [s.instruction for s in part],
            MAX_NEW,
            images=[s.image for s in part],
            decoder=decoder,
        )
        out += [[int(t) for t in x.split(",")] if x else [] for x in texts]
    return out


def _eos_ending_rows_early(rows: list[list[int]]) -> int:
    """A token generated early (before the last step) by some rows but not all: taken as eos, it
    makes rows of one batch finish at different steps."""
    early = Counter(t for r in rows for t in set(r[: MAX_NEW - 2]))
    return max((n, t) for t, n in early.items() if n < len(rows))[1]


@pytest.fixture(scope="module")
def references(setup):
    """Batch-1 references (HF generate alone) with the byte tokenizer's eos and with an eos that
    ends rows at different steps."""
    model, adapter, tok, samples, alpha = setup
    plain = _alone(model, adapter, tok, samples, alpha, tok.eos_token_id)
    eos = _eos_ending_rows_early(plain)
    early = _alone(model, adapter, tok, samples, alpha, eos)
    assert len({len(r) for r in early}) > 1, early  # rows do finish at different steps
    return {tok.eos_token_id: plain, eos: early}


@pytest.mark.parametrize("size", [3, 4, 8])
def test_batched_equals_each_sample_alone(setup, references, size):
    model, adapter, tok, samples, alpha = setup
    for eos, alone in references.items():
        assert _batched(model, adapter, tok, samples, alpha, eos, size) == alone, (eos, size)
    adapter.set_activation(None)


def test_static_decoder_equals_generate(setup, references):
    """The static-cache decoder (one decoder reused over batch sizes and both end tokens, as a
    run keeps it) gives Hugging Face ``generate``'s tokens, batched as alone."""
    from fcit_hpc.eval.decode import StaticGreedyDecoder

    model, adapter, tok, samples, alpha = setup
    dec = StaticGreedyDecoder(model, adapter)
    assert not dec.graphs  # the CPU: the same path, eager
    for size in (3, 8):
        for eos, alone in references.items():
            got = _batched(model, adapter, tok, samples, alpha, eos, size, dec)
            assert got == alone, (eos, size)
    adapter.set_activation(None)
    assert dec.stats.captures == 0 and dec.stats.decode_steps > 0


def test_static_decoder_refuses_graphs_off_cuda(setup):
    from fcit_hpc.eval.decode import StaticGreedyDecoder

    with pytest.raises(ValueError, match="CUDA"):
        StaticGreedyDecoder(setup[0], setup[1], graphs=True)


def test_failed_capture_falls_back_to_eager(setup, references, monkeypatch, caplog):
    """A forward that cannot be captured (here: the graph cannot even be made) is decoded
    eagerly, with the same tokens, and said once in the log."""
    from fcit_hpc.eval.decode import StaticGreedyDecoder

    def no_graph():
        raise RuntimeError("operation not permitted when stream is capturing")

    # the warning reaches caplog whatever an earlier in-process run did to the "fcit" logger
    # (its level, propagation or a library's logging set-up disabling existing loggers)
    fcit_log = logging.getLogger("fcit")
    monkeypatch.setattr(fcit_log, "disabled", False)
    monkeypatch.setattr(fcit_log, "propagate", True)
    caplog.set_level(logging.WARNING, logger="fcit")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_graph)
    model, adapter, tok, samples, alpha = setup
    dec = StaticGreedyDecoder(model, adapter)
    dec.graphs = True  # as on CUDA
    eos = tok.eos_token_id
    assert _batched(model, adapter, tok, samples, alpha, eos, 4, dec) == references[eos]
    adapter.set_activation(None)
    assert not dec.graphs and dec.stats.captures == 0
    assert sum("not capturable" in r.message for r in caplog.records) == 1


def test_alone_equals_a_greedy_loop_without_kv_cache(setup, references):
    """The batch-1 reference itself against greedy by hand (so batch 8 equals it too)."""
    model, adapter, tok, samples, alpha = setup
    for eos, alone in references.items():
        assert _alone(model, adapter, tok, samples, alpha, eos, loop_no_cache) == alone, eos
    adapter.set_activation(None)


def test_alpha_is_per_sample(setup):
    """One prompt twice in a batch, gated one-hot on two different subspaces: each row gives what
    the prompt gives alone with its gate, and the two rows differ."""
    model, adapter, tok, samples, _ = setup
    pair = [samples[0], samples[0]]
    alpha = torch.eye(LIVE)[:2]  # [[1, 0, 0], [0, 1, 0]]
    eos = tok.eos_token_id
    saved = [adapter.get(k) for k in range(2)]
    try:
        for k in range(2):  # subspaces strong enough to change the trained model's answer too
            adapter.set(k, saved[k] * 4)
        batched = _batched(model, adapter, tok, pair, alpha, eos, 2)
        assert batched == _alone(model, adapter, tok, pair, alpha, eos)
        assert batched[0] != batched[1]
    finally:
        for k in range(2):
            adapter.set(k, saved[k])
        adapter.set_activation(None)


# ------------------------------------------------------------------ predict_local with DISCO's SSA
def _disco_ctx(size: int):
    from fcit_hpc.benchmark.suite import FederatedData
    from fcit_hpc.methods import make_method
    from fcit_hpc.model.identity import HashingEncoder, SampleEncoder

    cfg = load_config(
        None,
        [
            "method.name=disco",
            "method.identity_encoder=hashing",
            "benchmark.num_tasks=3",
            "benchmark.test_per_task=4",
            "eval.max_new_tokens=6",
            f"eval.batch_size={size}",
        ],
    )
    model, adapter, tok = build_model(cfg.model, cfg.lora, cfg.lora.max_subspaces)
    g = torch.Generator().manual_seed(5)
    for k in range(3):
        adapter.set(k, torch.randn(adapter.numel, generator=g) * 0.05)
    data = FederatedData(cfg.benchmark, num_clients=cfg.federation.num_clients, seed=cfg.seed)
    encoder = SampleEncoder(HashingEncoder(cfg.method.identity_dim))
    # global tokens: one test instruction per task, so the gate differs between tasks
    tokens = np.zeros((cfg.lora.max_subspaces, encoder.dim), np.float32)
    tokens[:3] = encoder.encode_samples([data.test[t][0] for t in range(3)])
    state = SimpleNamespace(num_subspaces=3, tokens=tokens)
    ctx = SimpleNamespace(
        eval=cfg.eval,
        comm=SimpleNamespace(rank=0, size=1),
        data=data,
        encoder=encoder,
        adapter=adapter,
        method=make_method(cfg.method, cfg.lora),
        model=model,
        tok=tok,
    )
    return ctx, state


def test_predict_local_same_at_every_batch_size_and_rank():
    from fcit_hpc.methods.disco import ssa_activation

    ctx, state = _disco_ctx(1)
    one = predict_local(ctx, state)
    assert [(t, i) for t, i, _ in one] == [(t, i) for t in range(3) for i in range(4)]
    feats = ctx.encoder.encode_samples([s for _, _, s in local_samples(ctx)])
    alpha = ssa_activation(feats, state.tokens[:3], 0.05, "softmax")
    assert np.abs(alpha[:4] - alpha[4:8]).max() > 0.5  # the gate differs between samples
    assert len({text for _, _, text in one}) > 1
    for size in (5, 12):
        ctx.eval.batch_size = size
        assert predict_local(ctx, state) == one, size
    ctx.eval.decoder = "hf"  # Hugging Face generate: the same predictions
    assert predict_local(ctx, state) == one
    ctx.eval.decoder = "static"
    st = ctx.decoder.stats
    assert st.batches == 12 + 3 + 1  # one decoder, kept over the calls
    assert ctx.decoder._cache is None  # its cache released after each evaluation
    # two ranks, batches of 3: each rank's share, predicted as on one rank
    for rank in (0, 1):
        ctx.comm = SimpleNamespace(rank=rank, size=2)
        ctx.eval.batch_size = 3
        share = predict_local(ctx, state)
        assert share == [p for p in one if (p[0] * EVAL_DEAL_STRIDE + p[1]) % 2 == rank]
