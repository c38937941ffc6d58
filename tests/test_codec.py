"""Upload codecs against plain numpy / torch references: sizes, round-trip error bounds by
formula, top-k exactness, malformed payloads, and the error-feedback identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fcit_hpc.fed.codec import CODECS, Codec, CodecError, UplinkCodec, update_parts


def _x(n: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.standard_normal(n) * g.choice([1e-4, 1e-2, 1.0], n)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 7, 64, 65, 1000])
@pytest.mark.parametrize("name", CODECS)
def test_payload_size_is_the_formula(name, n):
    c = Codec(name, block=16, fraction=0.1)
    nb = math.ceil(n / 16)
    want = {
        "none": 4 * n,
        "fp16": 2 * n,
        "bf16": 2 * n,
        "int8": 4 * nb + n,
        "int4": 4 * nb + (n + 1) // 2,
        "topk": 8 * max(1, math.ceil(0.1 * n)),
    }[name]
    payload = c.encode(_x(n))
    assert payload.dtype == np.uint8 and payload.size == want == c.nbytes(n)
    assert c.decode(payload, n).shape == (n,)


def test_none_fp16_bf16_equal_the_libraries_casts():
    x = _x(4097)
    x[:4] = [0.0, -0.0, 3.0e38, 1.0 + 2.0**-8]  # large, and a tie for bf16's round-to-even
    assert Codec("none").decode(Codec("none").encode(x), x.size).tobytes() == x.tobytes()
    fp16 = Codec("fp16")
    with np.errstate(over="ignore"):
        want16 = x.astype(np.float16).astype(np.float32)
    assert np.array_equal(fp16.decode(fp16.encode(x), x.size), want16)
    bf = Codec("bf16")
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(bf.decode(bf.encode(x), x.size), want)


@pytest.mark.parametrize("name,levels", [("int8", 127), ("int4", 7)])
def test_block_quantisation_error_is_at_most_half_a_step(name, levels):
    x = _x(1000, 1)
    c = Codec(name, block=32)
    got = c.decode(c.encode(x), x.size).astype(np.float64)
    blocks = np.pad(x, (0, 24)).reshape(-1, 32).astype(np.float64)
    step = np.repeat(np.abs(blocks).max(axis=1) / levels, 32)[: x.size]
    assert (np.abs(got - x) <= step / 2 * (1 + 1e-6) + 1e-12).all()
    # plain-numpy reference of the scheme, in float64
    q = np.clip(np.rint(x / np.where(step > 0, step, 1)), -levels, levels)
    assert np.allclose(got, q * step, rtol=1e-6, atol=0)
    zero = np.zeros(40, np.float32)
    assert not c.decode(c.encode(zero), 40).any()


def test_topk_keeps_exactly_the_largest_magnitudes():
    x = _x(501, 2)
    c = Codec("topk", fraction=0.05)
    k = math.ceil(0.05 * 501)
    got = c.decode(c.encode(x), x.size)
    top = torch.topk(torch.from_numpy(np.abs(x)), k).indices.numpy()
    want = np.zeros_like(x)
    want[top] = x[top]
    assert np.array_equal(got, want) and np.count_nonzero(got) == k
    ties = np.ones(10, np.float32)  # ties: the lower indices
    t = Codec("topk", fraction=0.3).decode(Codec("topk", fraction=0.3).encode(ties), 10)
    assert t.tolist() == [1, 1, 1] + [0] * 7


@pytest.mark.parametrize("name", CODECS)
def test_non_finite_values_stay_non_finite(name):
    x = _x(300, 3)
    x[123] = np.nan
    c = Codec(name, block=16, fraction=0.01)
    assert not np.isfinite(c.decode(c.encode(x), x.size)).all()


@pytest.mark.parametrize("name", CODECS)
def test_malformed_payloads_are_refused(name):
    c = Codec(name, block=16, fraction=0.1)
    p = c.encode(_x(100))
    with pytest.raises(CodecError):
        c.decode(p[:-1], 100)
    if name == "topk":
        bad = p.copy()
        bad[:4] = np.frombuffer(np.uint32(100).tobytes(), np.uint8)  # index out of range
        with pytest.raises(CodecError, match="out of range"):
            c.decode(bad, 100)


def test_error_feedback_transmitted_plus_residual_is_the_true_sum():
    """Σ_t x̂_t + e_T = Σ_t x_t (float64 reference), per part, for every lossy codec."""
    parts = update_parts([2], 200, {"projector": 50})
    for name in ("fp16", "bf16", "int8", "int4", "topk"):
        up = UplinkCodec(Codec(name, 16, 0.05), Codec(name, 16, 0.05), error_feedback=True)
        res: dict[int, np.ndarray] = {}
        sent = np.zeros(250)
        true = np.zeros(250)
        for t in range(6):
            x = _x(250, 10 + t)
            true += x
            sent += up.decode_update(
                up.encode_update(x, parts, ("projector",), res), parts, ("projector",)
            )
        resid = np.concatenate([res[2], res[-1]]).astype(np.float64)
        assert np.allclose(sent + resid, true, rtol=0, atol=1e-5), name
        # without feedback, top-k drops mass for good
    up = UplinkCodec(Codec("topk", 16, 0.05), Codec("topk", 16, 0.05), error_feedback=False)
    res = {}
    out = up.decode_update(
        up.encode_update(_x(250), parts, ("projector",), res), parts, ("projector",)
    )
    assert res == {} and np.count_nonzero(out) < 250


def test_error_feedback_residual_restarts_after_a_non_finite_update():
    up = UplinkCodec(Codec("int8", 16), error_feedback=True)
    parts = update_parts([0], 32, {})
    res: dict[int, np.ndarray] = {}
    x = _x(32)
    x[5] = np.nan
    up.encode_update(x, parts, (), res)
    assert np.array_equal(res[0], np.zeros(32, np.float32))


def test_update_layout_codec_per_part():
    up = UplinkCodec(Codec("int8", 16), Codec("bf16"), Codec("fp16"))
    parts = update_parts([3, 4], 10, {"projector": 6, "mixer": 4})
    assert parts == [(3, 10), (4, 10), (-1, 6), (-2, 4)]
    lay = up.layout(parts, ("projector", "mixer"))
    assert [c.name for _, _, c in lay] == ["int8", "int8", "bf16", "int8"]
    x = _x(30)
    p = up.encode_update(x, parts, ("projector", "mixer"), {})
    assert p.size == 2 * (4 + 10) + 12 + (4 + 4)
    with pytest.raises(CodecError):
        up.decode_update(p[1:], parts, ("projector", "mixer"))
