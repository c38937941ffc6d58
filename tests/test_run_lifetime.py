"""What lives for the whole run instead of being rebuilt per round: the evaluation's decoder
(static cache, CUDA graph) and the identity tokens of clients selected again. (The evaluation
runs once per stage whatever the round count: fcit_hpc.fed.loop.run_federated, docs/gpu.md.)"""

from collections import OrderedDict
from types import SimpleNamespace

import numpy as np

from fcit_hpc.config import load_config
from fcit_hpc.fed import client as fed_client
from fcit_hpc.fed.client import compute_tokens, identity_token
from fcit_hpc.fed.compress import Compression
from fcit_hpc.fed.wire import unpack_tokens


class CountingEncoder:
    """A deterministic encoder (feature = instruction length and first byte) counting calls."""

    dim = 2

    def __init__(self):
        self.calls = 0

    def encode_samples(self, samples) -> np.ndarray:
        self.calls += 1
        rows = [[len(s.instruction), ord(s.instruction[:1] or " ")] for s in samples]
        return np.array(rows, np.float32)


def _ctx(nan_clients=()):
    from fcit_hpc.data.sample import Sample

    data = {
        (u, c): [Sample(f"q{u}{c}{i}" * (i + 1), "a", u) for i in range(3 + c)]
        for u in range(2)
        for c in range(4)
    }
    return SimpleNamespace(
        seed=0,
        debug=SimpleNamespace(nan_token_clients=list(nan_clients), bad_token_clients=[]),
        privacy=SimpleNamespace(token_noise=0.0),
        data=SimpleNamespace(client_samples=lambda u, c: data[(u, c)]),
        encoder=CountingEncoder(),
        identity_cache=OrderedDict(),
        compress=Compression(load_config(None).compress),
    ), data


def test_identity_tokens_encoded_once_per_client():
    ctx, data = _ctx(nan_clients=[1])
    plan = np.array([[0, 0, 0], [1, 0, 0], [2, 1, 0]], np.int64)  # (client, unit, rank)
    first = compute_tokens(ctx, plan)
    assert ctx.encoder.calls == 3
    again = compute_tokens(ctx, plan)  # the same clients selected in a later round
    assert ctx.encoder.calls == 3
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # the reference: the mean feature of each client's samples, computed here
    mu, n = identity_token(ctx, 0, 0)
    feats = np.array([[len(s.instruction), ord(s.instruction[0])] for s in data[(0, 0)]])
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6)
    assert n == len(data[(0, 0)])
    # the debug NaN of client 1 went into its message (each round), not into the cache
    assert np.isfinite(ctx.identity_cache[(0, 1)][0]).all()
    for msg in (first, again):
        ups = {u.client: u for u in unpack_tokens([msg[0]], [msg[1]])}
        assert np.isnan(ups[1].values[0]) and np.isfinite(ups[0].values).all()
        assert [ups[c].samples for c in (0, 1, 2)] == [3, 4, 5]


def test_identity_cache_keeps_the_last_clients_only(monkeypatch):
    """10,000 clients must not leave 10,000 tokens on a rank: the least recently used goes."""
    monkeypatch.setattr(fed_client, "IDENTITY_CACHE", 3)
    ctx, _ = _ctx()
    for c in (0, 1, 2):
        identity_token(ctx, 0, c)
    identity_token(ctx, 0, 0)  # used again: now the most recent
    identity_token(ctx, 1, 3)  # a fourth client: the least recent (0, 1) goes
    assert list(ctx.identity_cache) == [(0, 2), (0, 0), (1, 3)]
    calls = ctx.encoder.calls
    mu, _ = identity_token(ctx, 0, 1)  # encoded again, the same token as before
    assert ctx.encoder.calls == calls + 1 and len(ctx.identity_cache) == 3
    fresh, _ = _ctx()
    np.testing.assert_array_equal(mu, identity_token(fresh, 0, 1)[0])


def test_decoder_kept_for_the_run():
    from fcit_hpc.eval.generate import run_decoder

    cfg = load_config(None, ["model.name=tiny-llama"])
    from fcit_hpc.model.build import build_model

    model, adapter, _ = build_model(cfg.model, cfg.lora, 2)
    ctx = SimpleNamespace(eval=cfg.eval, model=model, adapter=adapter)
    dec = run_decoder(ctx)
    assert dec is not None and run_decoder(ctx) is dec and not dec.graphs
    cfg.eval.decoder = "hf"
    assert run_decoder(ctx) is None
