"""The evaluation's decoder on a CUDA device (`make test-gpu`, marker `gpu`): the decode step
replayed from a CUDA graph gives the eager step's tokens, batch after batch, with each row's SSA
gate; one graph serves every batch of a shape. The CPU twin (the same decoder, eager, against
Hugging Face ``generate``) is tests/test_generate.py::test_static_decoder_equals_generate."""

import pytest
import torch

from fcit_hpc.config import load_config
from fcit_hpc.eval.decode import StaticGreedyDecoder
from fcit_hpc.eval.generate import left_pad
from fcit_hpc.run import run_model
from fcit_hpc.runtime import make_runtime

pytestmark = pytest.mark.gpu
PROMPTS = [
    "Add the two numbers: 12 + 30 =",
    "hi",
    "Reverse the letters of the word: kelp",
    "Which tone fills the background of this picture?",
    "Sort these digits: 9 1 8 2 7 3",
    "a b",
]
LIVE = 3


def _embedded(precision: str):
    cfg = load_config(
        None, ["model.name=embedded", "train.device=cuda", f"train.precision={precision}"]
    )
    rt = make_runtime(cfg.train, cfg.federation, 0, 1)
    model, adapter, tok = run_model(cfg, 4, rt)
    g = torch.Generator().manual_seed(3)
    for k in range(4):
        adapter.set(k, torch.randn(adapter.numel, generator=g) * 0.05)
    return model, adapter, tok


def _decode(dec, adapter, tok, prompts, alpha, new: int) -> list[list[int]]:
    adapter.set_activation(alpha)
    ids, mask = left_pad([tok.prompt(p) for p in prompts], tok.pad_token_id, dec.device)
    pix = torch.stack([tok.pixels(None) for _ in prompts]).to(dec.device)
    return dec.generate(ids, mask, new, pixel_values=pix).tolist()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_decode_equals_eager_decode(precision):
    model, adapter, tok = _embedded(precision)
    g = torch.Generator().manual_seed(4)
    alphas = [torch.softmax(torch.randn(3, LIVE, generator=g) * 2, -1) for _ in range(3)]
    batches = [PROMPTS[:3], PROMPTS[3:], PROMPTS[1:4]]  # three batches of one shape (B 3)
    eager = StaticGreedyDecoder(model, adapter, graphs=False)
    graph = StaticGreedyDecoder(model, adapter, graphs=True)
    for prompts, alpha in zip(batches, alphas, strict=True):
        want = _decode(eager, adapter, tok, prompts, alpha, 12)
        got = _decode(graph, adapter, tok, prompts, alpha, 12)
        assert got == want, prompts
    adapter.set_activation(None)
    st = graph.stats
    assert st.captures == 1, st.keys  # one graph for the shape, replayed by every batch
    assert st.graph_steps == st.decode_steps - 1 > 0
    assert eager.stats.graph_steps == 0


def test_graph_follows_each_rows_gate():
    """The same prompt twice, gated one-hot on two subspaces: graph-replayed rows keep their own
    α (the static gate buffer is refilled per batch), as the eager step gives."""
    model, adapter, tok = _embedded("fp32")
    for k in range(2):
        adapter.set(k, adapter.get(k) * 4)
    eager = StaticGreedyDecoder(model, adapter, graphs=False)
    graph = StaticGreedyDecoder(model, adapter, graphs=True)
    pair = [PROMPTS[0], PROMPTS[0]]
    for alpha in (torch.eye(LIVE)[:2], torch.eye(LIVE)[[1, 0]]):
        want = _decode(eager, adapter, tok, pair, alpha, 10)
        assert _decode(graph, adapter, tok, pair, alpha, 10) == want
        assert want[0] != want[1]
    adapter.set_activation(None)
