"""Triton SSA-LoRA kernels under TRITON_INTERPRET=1 (set in conftest) against torch references."""

import itertools
import os

import pytest
import torch

from fcit_kernels import ssa_gate, ssa_lora_linear
from fcit_kernels.reference import ssa_gate_reference, ssa_lora_concat_fp32, ssa_lora_loop
from fcit_kernels.ssa_lora import ssa_lora_linear_torch

assert os.environ.get("TRITON_INTERPRET") == "1"

# tolerance table keyed by dtype: (atol, rtol) against the fp32 reference
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (6e-3, 6e-3),
    torch.bfloat16: (5e-2, 3e-2),
}


def _case(M, K, N, S, r, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    A = torch.randn(S, r, K, generator=g) / K**0.5
    B = torch.randn(S, N, r, generator=g) / r**0.5
    alpha = torch.softmax(torch.randn(M, S, generator=g), -1)
    cast = lambda t: None if t is None else t.to(dtype)
    A_cat = A.reshape(S * r, K)
    B_cat = B.permute(1, 0, 2).reshape(N, S * r).contiguous()
    return cast(x), cast(W), cast(b), cast(A), cast(B), cast(A_cat), cast(B_cat), alpha


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
def test_triton_matches_loop_reference(M, K, N, S, r, bias, dtype):
    x, W, b, A, B, A_cat, B_cat, alpha = _case(M, K, N, S, r, dtype, bias)
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0, backend="triton")
    ref = ssa_lora_loop(
        x.float(), W.float(), None if b is None else b.float(), A.float(), B.float(), alpha, 2.0
    )
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (M, N)
    torch.testing.assert_close(y.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("M,K,N,S,r,bias", SHAPES[::6])
def test_bf16_upcast(M, K, N, S, r, bias):
    x, W, b, A, B, A_cat, B_cat, alpha = _case(M, K, N, S, r, torch.bfloat16, bias)
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0, backend="triton")
    ref = ssa_lora_concat_fp32(x, W, b, A_cat, B_cat, alpha, 2.0)
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(y.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("M,K,N,S,r,bias", SHAPES[::3])
def test_torch_cpu_path_matches_loop(M, K, N, S, r, bias):
    x, W, b, A, B, A_cat, B_cat, alpha = _case(M, K, N, S, r, torch.float32, bias)
    y = ssa_lora_linear_torch(x, W, b, A_cat, B_cat, alpha, 2.0)
    torch.testing.assert_close(y, ssa_lora_loop(x, W, b, A, B, alpha, 2.0), atol=2e-5, rtol=2e-5)


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
def test_gate_kernel_matches_reference(M, S, D):
    g = torch.Generator().manual_seed(1)
    f, G = torch.randn(M, D, generator=g), torch.randn(S, D, generator=g)
    for eps in (0.05, 1.0):
        a = ssa_gate(f, G, eps)
        torch.testing.assert_close(a, ssa_gate_reference(f, G, eps), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.sum(-1), torch.ones(M), atol=1e-5, rtol=0)


def test_bad_inputs_raise_value_error():
    x, W, b, A, B, A_cat, B_cat, alpha = _case(4, 32, 16, 2, 4, torch.float32, True)
    cases = [
        (x[:, :31], W, b, A_cat, B_cat, alpha),  # in-features mismatch
        (x, W, b, A_cat[:7], B_cat, alpha),  # rank mismatch
        (x, W, b, A_cat, B_cat, alpha[:3]),  # alpha rows
        (x, W, b, A_cat, B_cat, alpha[:, :0]),  # S = 0
        (x, W, b[:5], A_cat, B_cat, alpha),  # bias shape
        (x.half(), W, b, A_cat, B_cat, alpha),  # mixed dtypes
        (x, W, b, A_cat, B_cat, torch.full_like(alpha, float("nan"))),  # NaN alpha
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


def test_kernels_install_under_our_own_name(tmp_path):
    """The kernels/ folder is importable as `fcit_kernels` only: a top-level `kernels` would
    shadow the Hugging Face package of that name (which transformers looks for)."""
    import subprocess
    import sys

    code = (
        "import importlib.util as u; "
        "print(u.find_spec('fcit_kernels').origin); print(u.find_spec('kernels'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    assert out == [str(root / "kernels" / "__init__.py"), "None"]
