"""DISCO units: the subspace LoRA layer, DKO rules, SSA variants."""

import numpy as np
import pytest
import torch

from fcit_hpc.errors import ConfigError
from fcit_hpc.methods.disco import FULL, MATCHED, NEW, cosine, dko_assign, ssa_activation
from fcit_hpc.model.lora import (
    SsaGate,
    SubspaceAdapter,
    SubspaceLoRALinear,
    inject_subspace_lora,
)


def _layer(S=3, r=4, fin=16, fout=12, bias=True):
    torch.manual_seed(0)
    base = torch.nn.Linear(fin, fout, bias=bias)
    layer = SubspaceLoRALinear(base, r, lora_alpha=8.0, dropout=0.0, s_max=S)
    with torch.no_grad():
        for i in range(S):
            layer.lora_A[i].normal_()
            layer.lora_B[i].normal_()
    return layer


@pytest.mark.parametrize("S,bias", [(1, True), (3, True), (5, False)])
def test_layer_equals_per_subspace_reference(S, bias):
    layer = _layer(S=S, bias=bias)
    x = torch.randn(2, 7, 16)
    alpha = torch.softmax(torch.randn(2, S), -1)
    layer.set_mode(SsaGate(alpha))
    y = layer(x)
    ref = layer.base(x)
    for i in range(S):
        delta = x @ layer.lora_A[i].t() @ layer.lora_B[i].t()
        ref = ref + layer.scaling * alpha[:, i].view(2, 1, 1) * delta
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert layer.scaling == 2.0


def test_only_assigned_subspace_gets_gradients():
    layer = _layer(S=3)
    ad = SubspaceAdapter([("l", layer)])
    ad.train_subspace(1)
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.lora_A[1].grad is not None and layer.lora_B[1].grad.abs().sum() > 0
    for i in (0, 2):
        assert layer.lora_A[i].grad is None and layer.lora_B[i].grad is None
    assert layer.base.weight.grad is None or not layer.base.weight.requires_grad


def test_injection_targets_ffn_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
    )
    layers = inject_subspace_lora(
        m, {"gate_proj", "up_proj", "down_proj"}, 2, 4.0, dropout=0.0, s_max=2
    )
    names = [n for n, _ in layers]
    assert len(names) == 6 and all(
        n.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") for n in names
    )
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable)
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['nothing'\].*up_proj"):
        inject_subspace_lora(m, {"nothing"}, 2, 4.0, dropout=0.0, s_max=2)
    with pytest.raises(ConfigError, match="'q_projx'"):  # one missing of several
        inject_subspace_lora(m, {"up_proj", "q_projx"}, 2, 4.0, dropout=0.0, s_max=2)


def test_adapter_vector_roundtrip_and_init():
    layer = _layer(S=2)
    ad = SubspaceAdapter([("l", layer)])
    v = torch.arange(ad.numel, dtype=torch.float32)
    ad.set(1, v)
    assert torch.equal(ad.get(1), v)
    assert torch.equal(layer.lora_A[1].reshape(-1), v[: 4 * 16])
    with pytest.raises(ValueError, match="expected"):
        ad.set(0, torch.zeros(3))
    init = ad.init_vector(torch.Generator().manual_seed(0))
    a, b = init[: 4 * 16], init[4 * 16 :]
    assert torch.all(b == 0) and 0.005 < a.std() < 0.015


def _t(*xs):
    return np.array(xs, dtype=np.float32)


def test_dko_create_merge_assign_and_tau_edges():
    G = np.zeros((3, 2), np.float32)
    n = np.zeros(3)
    toks = [_t(1, 0), _t(1, 0), _t(0, 1), _t(1, 1)]
    d, live = dko_assign(G, n, 0, [0, 1, 2, 3], tokens=toks, samples=[2, 6, 4, 1], tau=0.9)
    # client 0 creates subspace 0; client 1 matches it (cos 1); client 2 creates subspace 1;
    # client 3 has cos(1,1 ; 1,0) = 0.7071 < 0.9 with both -> creates subspace 2
    assert [(x.subspace, x.action) for x in d] == [(0, NEW), (0, MATCHED), (1, NEW), (2, NEW)]
    assert live == 3
    assert d[1].similarity == pytest.approx(1.0)
    assert d[3].similarity == pytest.approx(np.sqrt(0.5), rel=1e-6)
    np.testing.assert_allclose(G[0], [1, 0])
    assert n.tolist() == [8, 4, 1]


def test_dko_running_mean_and_exact_tau():
    G = np.zeros((2, 2), np.float32)
    n = np.zeros(2)
    c = np.cos(0.3)
    mu2 = _t(c, np.sin(0.3))  # cos to (1, 0) is exactly cos(0.3)
    d, live = dko_assign(
        G,
        n,
        0,
        [0, 5],
        tokens=[_t(1, 0), mu2],
        samples=[3, 1],
        tau=float(cosine(mu2, _t(1, 0)[None])[0]),
    )
    assert d[1].action == MATCHED and live == 1  # similarity == τ counts as a match
    np.testing.assert_allclose(G[0], (np.array([1, 0]) * 3 + mu2 * 1) / 4, rtol=1e-6)
    assert n[0] == 4


def test_dko_full_policy():
    G = np.zeros((1, 2), np.float32)
    n = np.zeros(1)
    d, live = dko_assign(G, n, 0, [0, 1], tokens=[_t(1, 0), _t(0, 1)], samples=[1, 1], tau=0.9)
    assert live == 1 and d[1].action == FULL and d[1].subspace == 0
    G = np.zeros((1, 2), np.float32)
    with pytest.raises(RuntimeError, match="lora.max_subspaces"):
        dko_assign(
            G,
            np.zeros(1),
            0,
            [0, 1],
            tokens=[_t(1, 0), _t(0, 1)],
            samples=[1, 1],
            tau=0.9,
            full_policy="error",
        )


def test_ssa_variants_match_formulas():
    f = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    G = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    cos = np.array([[1, 0, 2**-0.5], [0.6, 0.8, 1.4 * 2**-0.5]])
    sm = np.exp(cos / 0.05) / np.exp(cos / 0.05).sum(1, keepdims=True)
    np.testing.assert_allclose(ssa_activation(f, G, 0.05, "softmax"), sm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ssa_activation(f, G, 0.05, "cosine"), cos, rtol=1e-5)
    np.testing.assert_array_equal(ssa_activation(f, G, 0.05, "argmax"), [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(ssa_activation(f, G, 0.05, "concat"), np.ones((2, 3)))


def test_dko_of_a_thousand_clients_is_the_plain_loop():
    """The vectorised pass against an independent reference: each client alone, in client-id
    order, against the tokens of its moment with np.dot / np.linalg.norm (float64), tokens that
    existed before the round included. Same decisions and tokens; similarities to 1e-12."""
    rng = np.random.default_rng(7)
    d, s_max, n = 384, 8, 1000
    centres = rng.standard_normal((6, d))
    toks = [(centres[i % 6] + 0.2 * rng.standard_normal(d)).astype(np.float32) for i in range(n)]
    samples = rng.integers(1, 9, n).tolist()
    G = np.zeros((s_max, d), np.float32)
    G[:2] = centres[:2] + 0.2 * rng.standard_normal((2, d))
    counts = np.array([5.0, 3.0] + [0.0] * (s_max - 2))
    ref_G, ref_n, ref = G.astype(np.float64), counts.copy(), []
    live = 2
    for c, (mu, m) in enumerate(zip(toks, samples, strict=True)):
        mu = mu.astype(np.float64)
        sims = [
            np.dot(ref_G[k], mu) / (np.linalg.norm(ref_G[k]) * np.linalg.norm(mu))
            for k in range(live)
        ]
        k = int(np.argmax(sims))
        if sims[k] < 0.9:
            k, live = live, live + 1
        ref_G[k] = np.float32((ref_G[k] * ref_n[k] + mu * m) / (ref_n[k] + m))
        ref_n[k] += m
        ref.append((c, k, max(sims)))
    got, got_live = dko_assign(G, counts, 2, list(range(n)), tokens=toks, samples=samples, tau=0.9)
    assert got_live == live == 6
    assert [(x.client, x.subspace) for x in got] == [(c, k) for c, k, _ in ref]
    np.testing.assert_allclose([x.similarity for x in got], [s for *_, s in ref], atol=1e-12)
    np.testing.assert_allclose(G, ref_G, rtol=1e-6)
    np.testing.assert_array_equal(counts, ref_n)
