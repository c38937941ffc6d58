"""Triton SSA-LoRA kernels under TRITON_INTERPRET=1 (set in conftest) against float64 references.

The interpreter checks the arithmetic (indexing, masks, split-K, gating, tiling over S·r), not
shared memory, speed or TF32: the GPU side is tests/test_kernels_gpu.py (marker `gpu`)."""

import itertools
import os

import pytest
import torch

from fcit_kernels import ssa_gate, ssa_lora_linear, triton_ssa_lora, tuning
from fcit_kernels.reference import (
    ssa_gate_reference,
    ssa_lora_concat_fp32,
    ssa_lora_loop,
    ssa_lora_reference64,
)
from fcit_kernels.ssa_lora import ssa_lora_linear_torch

# CPU CI runs these under the interpreter (conftest sets TRITON_INTERPRET=1); `make test-gpu` sets
# TRITON_INTERPRET=0 for real kernels, and these tests do not apply there.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests (TRITON_INTERPRET=1)"
)

# (atol, rtol) against the float64 result on the same (dtype-rounded) inputs; outputs are O(1).
# fp32: fp32 accumulation; fp16/bf16: h and y rounded to the dtype (2^-11, 2^-8 relative).
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (6e-3, 6e-3),
    torch.bfloat16: (4e-2, 2e-2),
}


def _case(M, K, N, S, r, dtype, bias, seed=0, groups=None):
    """Inputs with O(1) outputs; α [groups or M, S] softmax rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    A = torch.randn(S, r, K, generator=g) / K**0.5
    B = torch.randn(S, N, r, generator=g) / r**0.5
    alpha = torch.softmax(torch.randn(groups or M, S, generator=g), -1)
    cast = lambda t: None if t is None else t.to(dtype)
    A_cat = A.reshape(S * r, K)
    B_cat = B.permute(1, 0, 2).reshape(N, S * r).contiguous()
    return cast(x), cast(W), cast(b), cast(A), cast(B), cast(A_cat), cast(B_cat), alpha


def _assert_matches64(y, x, W, b, A_cat, B_cat, alpha, scaling, dtype):
    ref = ssa_lora_reference64(x, W, b, A_cat, B_cat, alpha, scaling)
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)


# 60 shape cases: ragged sizes, S in {1,2,3,8,16}, r in {4,8,16,64}, M from 1 to a few hundred
SHAPES = [
    (M, K, N, S, r, bias)
    for (M, K, N), (S, r), bias in itertools.product(
        [(1, 40, 70), (7, 33, 17), (130, 64, 96)],
        [(1, 4), (2, 8), (3, 16), (8, 4), (16, 4), (2, 64), (1, 64)],
        [True, False],
    )
]
SHAPES += [
    (300, 48, 40, 8, 8, True),
    (257, 19, 23, 3, 4, False),
    (16, 128, 64, 16, 16, True),
    (2, 256, 32, 8, 8, False),
    (64, 24, 130, 2, 16, True),
    (1, 512, 8, 16, 8, True),
    (3, 64, 50, 3, 64, False),
    (200, 32, 64, 16, 16, False),
    (1, 17, 9, 2, 4, True),
    (31, 70, 45, 8, 16, False),
]
assert len(SHAPES) >= 50


@pytest.mark.parametrize("M,K,N,S,r,bias", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_float64(M, K, N, S, r, bias, dtype):
    x, W, b, A, B, A_cat, B_cat, alpha = _case(M, K, N, S, r, dtype, bias)
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0, backend="triton")
    _assert_matches64(y, x, W, b, A_cat, B_cat, alpha, 2.0, dtype)


@pytest.mark.parametrize("M,K,N,S,r,bias", SHAPES[::6])
def test_bf16(M, K, N, S, r, bias):
    x, W, b, A, B, A_cat, B_cat, alpha = _case(M, K, N, S, r, torch.bfloat16, bias)
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0, backend="triton")
    _assert_matches64(y, x, W, b, A_cat, B_cat, alpha, 2.0, torch.bfloat16)


@pytest.mark.parametrize(
    "M,K,N,S,r,dtype",
    [
        (3, 40, 70, 16, 64, torch.float32),  # S·r = 1024
        (17, 24, 33, 64, 16, torch.float32),  # S·r = 1024, ragged M/K/N
        (2, 16, 20, 8, 160, torch.float32),  # S·r = 1280 > 1024
        (5, 40, 70, 16, 64, torch.float16),
        (5, 40, 70, 16, 64, torch.bfloat16),
    ],
)
def test_large_total_rank(M, K, N, S, r, dtype):
    """Any S·r: the kernels tile S·r in blocks (the old kernel held all of it in one tile)."""
    x, W, b, A, B, A_cat, B_cat, alpha = _case(M, K, N, S, r, dtype, True, seed=3)
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 1.5, backend="triton")
    _assert_matches64(y, x, W, b, A_cat, B_cat, alpha, 1.5, dtype)


@pytest.mark.parametrize("which", ["shrink", "expand"])
def test_every_stored_config(which):
    """Each config autotuning may pick on a GPU computes the same function (split-K slices, block
    edges, BK larger than K)."""
    M, K, N, S, r = 21, 300, 70, 6, 16
    x, W, b, A, B, A_cat, B_cat, alpha = _case(M, K, N, S, r, torch.float32, False, seed=5)
    base = torch.nn.functional.linear(x, W)
    table = triton_ssa_lora.SHRINK_CONFIGS if which == "shrink" else triton_ssa_lora.EXPAND_CONFIGS
    for cfg in table:
        kw = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        configs = (
            (kw, triton_ssa_lora.INTERP_EXPAND)
            if which == "shrink"
            else (triton_ssa_lora.INTERP_SHRINK, kw)
        )
        y = triton_ssa_lora.ssa_lora_add_(
            base.clone(), x, A_cat, B_cat, alpha, 2.0, configs=configs
        )
        _assert_matches64(y, x, W, None, A_cat, B_cat, alpha, 2.0, torch.float32)


def test_stored_configs_fit_shared_memory_in_fp32():
    """Worst case (fp32 operands, the config's num_stages) within Hopper's 227 KB per block."""
    for kind, table in (
        ("shrink", triton_ssa_lora.SHRINK_CONFIGS),
        ("expand", triton_ssa_lora.EXPAND_CONFIGS),
    ):
        for cfg in table:
            need = triton_ssa_lora.smem_bytes(kind, cfg, 4)
            assert need <= triton_ssa_lora.SMEM_LIMIT_H100, (kind, cfg, need)
        assert any(c.kwargs["BM"] == 16 for c in table)  # a decode entry


def test_config_pruning_and_defaults(monkeypatch):
    monkeypatch.setattr(triton_ssa_lora, "_smem_limit", lambda i: 100 * 1024)
    x = torch.empty(1, 8)
    prune = triton_ssa_lora._prune("shrink")
    keep = prune(triton_ssa_lora.SHRINK_CONFIGS, {"x_ptr": x, "MB": 1, "DET": 0})
    assert keep and all(c.kwargs["BM"] == 16 for c in keep)
    assert all(triton_ssa_lora.smem_bytes("shrink", c, 4) <= 100 * 1024 for c in keep)
    keep = prune(triton_ssa_lora.SHRINK_CONFIGS, {"x_ptr": x, "MB": 4096, "DET": 1})
    assert keep and all(c.kwargs["SPLIT_K"] == 1 for c in keep)
    keep = triton_ssa_lora._prune("expand")(
        triton_ssa_lora.EXPAND_CONFIGS, {"b_ptr": x.half(), "MB": 16}
    )
    assert keep and all(c.kwargs["BM"] <= 32 for c in keep)
    for mb in (1, 16, 512, 4096):
        for det in (False, True):
            d = triton_ssa_lora._default("shrink", mb, det)
            assert not det or d["SPLIT_K"] == 1
            assert triton_ssa_lora._default("expand", mb, det)["BM"] >= min(mb, 64)
    assert [triton_ssa_lora.m_bucket(m) for m in (0, 1, 3, 16, 17, 5000)] == [
        1,
        1,
        4,
        16,
        32,
        4096,
    ]


def test_deterministic_mode_uses_one_k_slice():
    """torch.use_deterministic_algorithms(True): SPLIT_K = 1 (plain stores, no atomics)."""
    x, W, b, A, B, A_cat, B_cat, alpha = _case(9, 100, 30, 4, 8, torch.float32, True)
    torch.use_deterministic_algorithms(True)
    try:
        y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0, backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    _assert_matches64(y, x, W, b, A_cat, B_cat, alpha, 2.0, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("adtype", [torch.float32, torch.bfloat16])
def test_alpha_per_sequence(backend, adtype):
    """α [B, S] with x [B·T, in]: row b·T + t is gated by α[b] (no repeat_interleave per layer)."""
    Bs, T, K, N, S, r = 3, 5, 40, 36, 4, 8
    x, W, b, A, B, A_cat, B_cat, alpha = _case(Bs * T, K, N, S, r, torch.float32, True, groups=Bs)
    alpha = alpha.to(adtype)
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0, backend=backend)
    _assert_matches64(y, x, W, b, A_cat, B_cat, alpha, 2.0, torch.float32)
    full = alpha.repeat_interleave(T, dim=0)
    torch.testing.assert_close(
        y, ssa_lora_linear(x, W, b, A_cat, B_cat, full, 2.0, backend=backend), atol=0, rtol=0
    )


@pytest.mark.parametrize("M,K,N,S,r,bias", SHAPES[::3])
def test_torch_cpu_path_matches_loop(M, K, N, S, r, bias):
    x, W, b, A, B, A_cat, B_cat, alpha = _case(M, K, N, S, r, torch.float32, bias)
    y = ssa_lora_linear_torch(x, W, b, A_cat, B_cat, alpha, 2.0)
    torch.testing.assert_close(y, ssa_lora_loop(x, W, b, A, B, alpha, 2.0), atol=2e-5, rtol=2e-5)
    ref = ssa_lora_concat_fp32(x, W, b, A_cat, B_cat, alpha, 2.0)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_one_hot_alpha_is_single_lora_and_zero_alpha_is_base(backend):
    M, K, N, S, r = 9, 40, 36, 4, 8
    x, W, b, A, B, A_cat, B_cat, _ = _case(M, K, N, S, r, torch.float32, True)
    onehot = torch.zeros(M, S)
    onehot[:, 2] = 1
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, onehot, 2.0, backend=backend)
    single = x @ W.t() + b + 2.0 * (x @ A[2].t()) @ B[2].t()
    torch.testing.assert_close(y, single, atol=2e-5, rtol=2e-5)
    y0 = ssa_lora_linear(x, W, b, A_cat, B_cat, torch.zeros(M, S), 2.0, backend=backend)
    torch.testing.assert_close(y0, torch.nn.functional.linear(x, W, b), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("M,S,D", [(1, 1, 16), (7, 3, 33), (40, 16, 100), (5, 8, 384)])
def test_gate_kernel_matches_float64(M, S, D):
    g = torch.Generator().manual_seed(1)
    f, G = torch.randn(M, D, generator=g), torch.randn(S, D, generator=g)
    for eps in (0.05, 1.0):
        a = ssa_gate(f, G, eps)
        assert a.dtype == torch.float32
        ref = ssa_gate_reference(f, G, eps, dtype=torch.float64)
        torch.testing.assert_close(a.double(), ref, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(a.sum(-1), torch.ones(M), atol=1e-5, rtol=0)


def test_dot_precision_follows_the_tf32_switch():
    """fp32 exact ("ieee") unless TF32 is on (argument, else torch's switch); 16-bit ignore it."""
    dp = triton_ssa_lora.dot_precision
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert dp(torch.float32, None) == "ieee"
        assert dp(torch.float32, True) == "tf32"
        matmul.allow_tf32 = True
        assert dp(torch.float32, None) == "tf32"
        assert dp(torch.float32, False) == "ieee"
        assert dp(torch.bfloat16, False) == "tf32"
    finally:
        matmul.allow_tf32 = before


def test_bad_inputs_raise_value_error():
    x, W, b, A, B, A_cat, B_cat, alpha = _case(4, 32, 16, 2, 4, torch.float32, True)
    cases = [
        (x[:, :31], W, b, A_cat, B_cat, alpha),  # in-features mismatch
        (x, W, b, A_cat[:7], B_cat, alpha),  # rank mismatch
        (x, W, b, A_cat, B_cat, alpha[:3]),  # alpha rows do not divide M
        (x, W, b, A_cat, B_cat, alpha[:0]),  # no alpha rows
        (x, W, b, A_cat, B_cat, alpha[:, :0]),  # S = 0
        (x, W, b[:5], A_cat, B_cat, alpha),  # bias shape
        (x.half(), W, b, A_cat, B_cat, alpha),  # mixed dtypes
        (x, W, b, A_cat, B_cat, alpha.long()),  # integer alpha
        (x, W, b, A_cat, B_cat, alpha.to("meta")),  # devices differ
    ]
    for args in cases:
        for backend in ("triton", "torch"):
            with pytest.raises(ValueError):
                ssa_lora_linear(*args, 1.0, backend=backend)
    # non-contiguous where the kernel needs contiguity
    xt = torch.randn(32, 4).t()
    with pytest.raises(ValueError, match="contiguous"):
        ssa_lora_linear(xt, W, b, A_cat, B_cat, alpha, 1.0, backend="triton")
    Bt = torch.randn(8, 16).t()
    with pytest.raises(ValueError, match="contiguous"):
        ssa_lora_linear(x, W, b, A_cat, Bt, alpha, 1.0, backend="triton")
    with pytest.raises(ValueError):
        ssa_gate(torch.randn(3, 4), torch.randn(0, 4), 0.05)
    with pytest.raises(ValueError):
        ssa_gate(torch.randn(3, 4), torch.randn(2, 5), 0.05)
    with pytest.raises(ValueError):
        ssa_gate(torch.randn(3, 4), torch.randn(2, 4), 0.0)


def test_alpha_values_are_checked_only_under_the_debug_switch(monkeypatch):
    """The op never reads α's values by default (that would sync the GPU every call)."""
    x, W, b, A, B, A_cat, B_cat, alpha = _case(4, 32, 16, 2, 4, torch.float32, True)
    nan = torch.full_like(alpha, float("nan"))
    for backend in ("triton", "torch"):
        ssa_lora_linear(x, W, b, A_cat, B_cat, nan, 1.0, backend=backend)  # no value check
        with pytest.raises(ValueError, match="NaN"):
            ssa_lora_linear(x, W, b, A_cat, B_cat, nan, 1.0, backend=backend, check_finite=True)
        monkeypatch.setenv("FCIT_KERNELS_CHECK_FINITE", "1")
        with pytest.raises(ValueError, match="NaN"):
            ssa_lora_linear(x, W, b, A_cat, B_cat, nan, 1.0, backend=backend)
        monkeypatch.delenv("FCIT_KERNELS_CHECK_FINITE")


def test_set_activation_checks_alpha_once_and_keeps_it_on_the_device():
    """α enters the model through set_activation: checked for NaN/Inf there, stored as float32."""
    from fcit_hpc.model.lora import SubspaceAdapter, inject_subspace_lora

    model = torch.nn.Sequential()
    model.add_module("up", torch.nn.Linear(12, 10))
    ad = SubspaceAdapter(inject_subspace_lora(model, ["up"], 4, 8.0, dropout=0.0, s_max=3))
    with pytest.raises(ValueError, match="NaN"):
        ad.set_activation(torch.tensor([[0.5, float("nan")]]))
    ad.set_activation(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    layer = ad.layers[0]
    assert layer.alpha.dtype == torch.float32 and layer.alpha.device == layer.lora_A[0].device
    x = torch.randn(1, 6, 12)  # [B, T, in]: α [1, S] gates all 6 tokens
    for i in range(2):
        torch.nn.init.normal_(layer.lora_A[i], std=0.3)
        torch.nn.init.normal_(layer.lora_B[i], std=0.3)
    layer.clear_cache()  # the weights changed
    y = model(x)
    A_cat = torch.cat([layer.lora_A[i] for i in range(2)])
    B_cat = torch.cat([layer.lora_B[i] for i in range(2)], 1)
    ref = ssa_lora_reference64(
        x[0], layer.base.weight, layer.base.bias, A_cat, B_cat, layer.alpha, layer.scaling
    )
    torch.testing.assert_close(y[0].double(), ref, atol=2e-5, rtol=2e-5)


def test_bench_helpers_on_the_cpu():
    """The CUDA bench's torch.compile competitor computes the op; the end-to-end decode timing
    runs (tiny Llama, CPU, base vs SSA)."""
    from transformers import LlamaConfig

    from fcit_kernels.bench import _two_gemm, decode_latency

    x, W, b, A, B, A_cat, B_cat, alpha = _case(6, 40, 30, 4, 8, torch.float32, False)
    ref = ssa_lora_reference64(x, W, None, A_cat, B_cat, alpha, 2.0)
    y = _two_gemm(x, W, A_cat, B_cat, alpha, 2.0).double()
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=64,
    )
    res = decode_latency(cfg, torch.device("cpu"), torch.float32, S=3, r=4, prompt=5, steps=2)
    assert res["base_eager_ms"] > 0 and res["ssa_eager_ms"] > 0 and res["ssa/base_eager"] > 0


_PROBE = (
    "import sys, kernels, transformers.modeling_utils, fcit_kernels\n"
    "print([p or '.' for p in sys.path]); print(kernels.__file__); print(fcit_kernels.__file__)\n"
)


@pytest.mark.parametrize("how", ["python -c", "python -m pytest"])
def test_the_kernels_folder_never_shadows_hugging_face_kernels(how, tmp_path):
    """Run from the repo root (`python -c`: sys.path[0] is ''; `python -m pytest`, as the Makefile
    runs the suite: the root on sys.path), `import kernels` gives Hugging Face's package (a
    dependency of transformers >= 5.25) although the root precedes site-packages on sys.path,
    transformers' modeling_utils imports, and our kernels
    import as `fcit_kernels` from kernels/fcit_kernels/. kernels/ has no __init__.py: a regular
    package anywhere on sys.path wins over a PEP 420 namespace portion, whatever the order."""
    import subprocess
    import sys
    from importlib.metadata import distribution
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    hf = Path(distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    assert hf.is_file()  # Hugging Face's package is installed (transformers needs it)
    assert not (root / "kernels" / "__init__.py").exists()
    out = tmp_path / "out.txt"
    if how == "python -c":
        cmd = [sys.executable, "-c", _PROBE]
    else:
        (tmp_path / "test_probe.py").write_text(
            "import contextlib, io\n\ndef test_probe():\n    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            + "".join(f"        {line}\n" for line in _PROBE.splitlines())
            + f"    open({str(out)!r}, 'w').write(buf.getvalue())\n"
        )
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    text = p.stdout if how == "python -c" else out.read_text()
    path, kern, ours = text.strip().splitlines()
    path = [Path(p).resolve() for p in __import__("ast").literal_eval(path)]
    # the root comes before the site-packages that hold Hugging Face's package
    assert path.index(root) < path.index(hf.parents[1])
    assert Path(kern).resolve() == hf
    assert Path(ours).resolve() == root / "kernels" / "fcit_kernels" / "__init__.py"


@pytest.mark.slow
def test_every_config_compiles_for_hopper_within_shared_memory():
    """No GPU needed: Triton's compiler and ptxas for sm_90 (H100) build every stored config in
    fp32 (the shared-memory worst case) and bf16 (tensor-core path), the gate kernel too, each
    within 227 KB of shared memory per block (`python -m fcit_kernels.aot_check`); the fused decode
    kernel's candidates at S·r buckets 64 and 256 too."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run(
        [sys.executable, "-m", "fcit_kernels.aot_check", "--dtypes", "fp32,bf16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    t = triton_ssa_lora
    n = len(t.SHRINK_CONFIGS) + len(t.EXPAND_CONFIGS) + 2 * len(t.FUSED_CANDIDATES)  # RP 64, 256
    assert f"{2 * n + 1}/{2 * n + 1} configs compile" in p.stdout


# ------------------------------------------------------------- fused decode kernel, dispatch
FUSED_SHAPES = [
    # M, K, N, S, r, bias, groups
    (1, 40, 70, 1, 4, True, None),
    (1, 100, 33, 8, 8, False, None),  # S·r = 64
    (16, 64, 130, 8, 8, True, None),
    (7, 33, 17, 3, 16, False, None),  # S·r = 48: not a power of two (bucket 64)
    (12, 48, 40, 4, 8, True, 3),  # α per sequence (G = 4)
    (5, 33, 40, 2, 64, True, None),  # S·r = 128
    (2, 24, 50, 16, 16, False, None),  # S·r = 256: the fused path's limit
]


@pytest.mark.parametrize("M,K,N,S,r,bias,groups", FUSED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_kernel_matches_float64(M, K, N, S, r, bias, groups, dtype):
    """One launch per linear at M ≤ 16: split-K shrink programs, then expand programs that wait
    on the counter; twice in a row (the kernel leaves its workspace zeroed for the next call)."""
    x, W, b, A, B, A_cat, B_cat, alpha = _case(M, K, N, S, r, dtype, bias, seed=M, groups=groups)
    assert triton_ssa_lora.choose_path(M, S * r) == "fused"
    base = torch.nn.functional.linear(x, W, b)
    for _ in range(2):
        y = triton_ssa_lora.ssa_lora_add_(base.clone(), x, A_cat, B_cat, alpha, 2.0)
        _assert_matches64(y, x, W, b, A_cat, B_cat, alpha, 2.0, dtype)
        h, ctr = triton_ssa_lora.workspace(x.device, tuning.r_bucket(S * r))
        assert h.abs().sum() == 0 and ctr.tolist() == [0, 0]


@pytest.mark.parametrize("cfg", triton_ssa_lora.FUSED_CANDIDATES[::2])
def test_fused_candidates_and_deterministic_mode(cfg):
    """Tuning candidates of the fused kernel compute the same function (K slices wider than K,
    N blocks past N); deterministic mode runs them with SPLIT_K = 1 (plain stores)."""
    x, W, b, A, B, A_cat, B_cat, alpha = _case(3, 300, 70, 6, 8, torch.float32, False, seed=9)
    base = torch.nn.functional.linear(x, W)
    y = triton_ssa_lora.ssa_lora_add_(base.clone(), x, A_cat, B_cat, alpha, 2.0, configs=cfg)
    _assert_matches64(y, x, W, None, A_cat, B_cat, alpha, 2.0, torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        y2 = triton_ssa_lora.ssa_lora_add_(base.clone(), x, A_cat, B_cat, alpha, 2.0, configs=cfg)
        y3 = triton_ssa_lora.ssa_lora_add_(base.clone(), x, A_cat, B_cat, alpha, 2.0, configs=cfg)
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(y2, y3, atol=0, rtol=0)
    _assert_matches64(y2, x, W, None, A_cat, B_cat, alpha, 2.0, torch.float32)


def test_dispatch():
    """fused at M ≤ 16 and S·r ≤ 256; shrink + expand above; two-GEMM at S·r ≥ 512 on CUDA."""
    plan = triton_ssa_lora.plan
    assert [plan(1, 64, True), plan(16, 256, True), plan(17, 64, True)] == [
        "fused",
        "fused",
        "split",
    ]
    assert [plan(1, 384, True), plan(1, 512, True), plan(4096, 1024, True)] == [
        "split",
        "two_gemm",
        "two_gemm",
    ]
    assert plan(1, 1024, False) == "split"  # the interpreter runs the kernels at any S·r
    x, W, b, A, B, A_cat, B_cat, alpha = _case(20, 16, 8, 2, 4, torch.float32, False)
    with pytest.raises(ValueError, match="fused path needs"):
        triton_ssa_lora.ssa_lora_add_(torch.zeros(20, 8), x, A_cat, B_cat, alpha, 1.0, path="fused")


# ----------------------------------------------------------------------------------- tuning
def test_keys_are_bounded_and_r_is_bucketed():
    """A DISCO-like run (S = 1 … 8 subspaces of r = 8, decode at M = 8, prefill at many M, two
    weight shapes): the old keys grow with every stage and prompt length, the new ones do not."""
    calls = [
        dict(M=M, K=K, N=N, R=8 * S, S=S, dtype="torch.float32")
        for S in range(1, 9)
        for M in (8, 1000, 1500, 2047)
        for K, N in ((192, 512), (512, 192))
    ]
    before, after = tuning.keys_before(calls), tuning.keys_after(calls)
    # old: 3 M buckets × 8 R × 2 shapes × 2 kernels; new: R buckets 16, 32, 64 only
    assert len(before) == 3 * 8 * 2 * 2
    assert {k.split("|")[-1] for k in after} == {"R16", "R32", "R64"}
    assert len(after) == 3 * (2 + 2 * 2)  # per R bucket: 2 fused + 2 shapes × (shrink, expand)
    assert tuning.key("fused", torch.bfloat16, 1, "4096x4096", 56) == (
        "fused|bfloat16|decode|4096x4096|R64"
    )


def test_config_lookup_order_table_cache_heuristic(tmp_path, monkeypatch):
    """Repo table first, then the $FCIT_CACHE tuning cache, then the heuristic (no timing);
    tuning only under FCIT_KERNELS_TUNE=1, once per key, stored for other processes."""
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path / "table")
    monkeypatch.setenv("FCIT_CACHE", str(tmp_path / "cache"))
    tuning.reload()
    dev, bf = torch.device("cpu"), torch.bfloat16
    calls = []

    def tune(cands):
        calls.append(len(cands))
        return cands[-1]

    cands = [dict(BN=32), dict(BN=128)]
    args = ("fused", bf, 1, 4096, 4096, 64, dev)
    h = tuning.config(*args, tune=tune, candidates=cands)
    assert h == tuning.heuristic("fused", bf, 1, 4096, 4096, 64, False) and calls == []
    monkeypatch.setenv("FCIT_KERNELS_TUNE", "1")
    assert tuning.config(*args, tune=tune, candidates=cands) == dict(BN=128) and calls == [2]
    tuning.reload()  # another process: reads the cache, does not tune
    assert tuning.config(*args, tune=tune, candidates=cands) == dict(BN=128) and calls == [2]
    assert tuning.config("fused", bf, 9, 4096, 4096, 60, dev, tune=tune) == dict(BN=128)
    n = tuning.write_table(dev, tmp_path / "out.json")
    assert n == 1
    (tmp_path / "table").mkdir()
    name = tuning.slug(tuning.device_name(dev))
    (tmp_path / "table" / f"{name}.json").write_text(
        '{"entries": {"fused|bfloat16|decode|4096x4096|R64": {"BN": 16}}}'
    )
    tuning.reload()
    assert tuning.config(*args, tune=tune, candidates=cands) == dict(BN=16)
    assert tuning.stats()["sources"]["fused|bfloat16|decode|4096x4096|R64"] == "table"
    (tmp_path / "table" / f"{name}.json").write_text("{not json")
    tuning.reload()
    with pytest.raises(ValueError, match=f"{name}.json"):
        tuning.config(*args)
    tuning.reload()


def test_heuristic_configs_run_and_count_compiles():
    """The heuristic's choices (what a cold cache uses) compute the op under the interpreter, and
    a new S·r in the same bucket adds no compiled variant."""
    for M, S in ((1, 8), (40, 8)):
        x, W, b, A, B, A_cat, B_cat, alpha = _case(M, 256, 96, S, 8, torch.float32, True)
        kinds = ("fused",) if M <= 16 else ("shrink", "expand")
        cfgs = [tuning.heuristic(k, torch.float32, M, 256, 96, S * 8, False) for k in kinds]
        base = torch.nn.functional.linear(x, W, b)
        y = triton_ssa_lora.ssa_lora_add_(
            base.clone(), x, A_cat, B_cat, alpha, 2.0, configs=cfgs[0] if M <= 16 else tuple(cfgs)
        )
        _assert_matches64(y, x, W, b, A_cat, B_cat, alpha, 2.0, torch.float32)
    before = tuning.stats()["compiles"]
    for S in (5, 6, 7):  # S·r = 40, 48, 56: all in bucket 64
        x, W, b, A, B, A_cat, B_cat, alpha = _case(2, 64, 32, S, 8, torch.float32, False)
        triton_ssa_lora.ssa_lora_add_(torch.zeros(2, 32), x, A_cat, B_cat, alpha, 1.0)
    assert tuning.stats()["compiles"] <= before + 1
    assert tuning.tuning_seconds() >= 0


# ------------------------------------------------------------------------- torch.library op
def _ssa_model():
    from fcit_hpc.model.lora import SubspaceAdapter, inject_subspace_lora

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("up_proj", torch.nn.Linear(32, 48))
    model.add_module("act", torch.nn.GELU())
    model.add_module("down_proj", torch.nn.Linear(48, 32))
    ad = SubspaceAdapter(
        inject_subspace_lora(model, ["up_proj", "down_proj"], 4, 8.0, dropout=0.0, s_max=3)
    )
    with torch.no_grad():
        for layer in ad.layers:
            for p in layer.parameters():
                p.normal_(0, 0.3)
    ad.set_activation(torch.softmax(torch.randn(2, 3), -1))
    return model


def test_op_compiles_without_graph_break():
    """torch.compile(fullgraph=True) of a model with SSA layers: one graph, the op kept as one
    node per layer (aot_eager: the same graph capture as inductor, minus its C++ build, which
    takes minutes on 2 cores), and the compiled output equals eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _ssa_model()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = model(x)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        y = torch.compile(model, backend=cnt, fullgraph=True)(x)
    assert cnt.frame_count == 1
    ops = [n for n in cnt.graphs[0].graph.nodes if "fcit.ssa_lora_linear" in str(n.target)]
    assert len(ops) == 2
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_op_fake_tensor_and_opcheck():
    """The fake implementation gives the output's shape and dtype; torch.library.opcheck checks
    the registration (schema, fake vs real, no aliasing)."""
    x, W, b, A, B, A_cat, B_cat, alpha = _case(3, 16, 12, 2, 4, torch.float32, True)
    args = (x, W, b, A_cat, B_cat, alpha, 2.0, "torch", -1)
    torch.library.opcheck(torch.ops.fcit.ssa_lora_linear.default, args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        out = torch.ops.fcit.ssa_lora_linear(*fx)
    assert out.shape == (3, 12) and out.dtype == torch.float32


def test_gradients_take_the_differentiable_path():
    """The op has no autograd formula: with grad on and an input requiring grad, the torch
    composition runs, and its gradient equals float64 autograd of the reference."""
    x, W, b, A, B, A_cat, B_cat, alpha = _case(4, 16, 12, 2, 4, torch.float32, True)
    A_cat = A_cat.clone().requires_grad_(True)
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0)
    y.square().sum().backward()
    A64 = A_cat.detach().double().requires_grad_(True)
    h = (x.double() @ A64.t()) * alpha.double().repeat_interleave(4, 1)
    y64 = x.double() @ W.double().t() + b.double() + 2.0 * h @ B_cat.double().t()
    y64.square().sum().backward()
    torch.testing.assert_close(A_cat.grad.double(), A64.grad, atol=1e-4, rtol=1e-4)


def test_bench_rebuild_competitor_and_tune_flag_on_the_cpu():
    """The reference code's per-call nn.Linear rebuild computes the op; --tune needs CUDA (2)."""
    import argparse

    from fcit_kernels.bench import _rebuild, main

    x, W, b, A, B, A_cat, B_cat, alpha = _case(6, 40, 30, 4, 8, torch.float32, False)
    with torch.no_grad():
        y = _rebuild(x, W, A, B, alpha, 2.0).double()
    ref = ssa_lora_reference64(x, W, None, A_cat, B_cat, alpha, 2.0)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
    assert main(argparse.Namespace(tune=True, write_table=None, quick=True)) == 2
