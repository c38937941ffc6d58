"""SSA-LoRA Triton kernels on a CUDA device (`make test-gpu`, marker `gpu`; deselected in CPU CI).

Against float64 references: shapes × dtypes (S·r up to 1280, ragged M/K/N, bias, per-sequence α),
fp32 exact (no TF32) unless TF32 is asked for, every stored config compiled and run (shared
memory), CUDA-graph capture and replay equal to eager, and no host synchronisation per call.
On a machine without CUDA these tests fail rather than pass vacuously.
"""

import pytest
import torch

from fcit_kernels import ssa_gate, ssa_lora_linear, triton_ssa_lora
from fcit_kernels.reference import ssa_gate_reference, ssa_lora_reference64

pytestmark = pytest.mark.gpu

# (atol, rtol) against float64 on the same dtype-rounded inputs (outputs O(1), K up to 4096):
# fp32 ieee (exact fp32 FMA accumulation); tf32 (10-bit mantissa operands); fp16/bf16 (h and y
# rounded to the dtype).
TOL = {
    "fp32": (5e-5, 5e-5),
    "tf32": (1e-2, 1e-2),
    torch.float16: (8e-3, 8e-3),
    torch.bfloat16: (5e-2, 2e-2),
}


def _case(M, K, N, S, r, dtype, bias, seed=0, groups=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    A_cat = torch.randn(S * r, K, generator=g) / K**0.5
    B_cat = torch.randn(N, S * r, generator=g) / r**0.5
    alpha = torch.softmax(torch.randn(groups or M, S, generator=g), -1)
    cuda = lambda t: None if t is None else t.to("cuda", dtype)
    return cuda(x), cuda(W), cuda(b), cuda(A_cat), cuda(B_cat), alpha.cuda()


SWEEP = [
    # M, K, N, S, r, bias
    (1, 4096, 4096, 8, 8, False),  # decode, the point
    (16, 4096, 11008, 8, 8, True),  # decode batch, up/gate proj
    (3, 11008, 4096, 8, 8, False),  # down proj
    (512, 4096, 4096, 8, 8, True),  # prefill
    (1, 4096, 4096, 16, 64, True),  # S·r = 1024
    (16, 1024, 2048, 64, 16, False),  # S·r = 1024
    (130, 512, 700, 8, 160, True),  # S·r = 1280
    (77, 333, 517, 3, 16, True),  # ragged everything
    (1, 17, 9, 2, 4, False),  # tiny
    (1000, 96, 300, 5, 8, False),  # many rows, short K
]


@pytest.mark.parametrize("M,K,N,S,r,bias", SWEEP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sweep_against_float64(M, K, N, S, r, bias, dtype):
    x, W, b, A_cat, B_cat, alpha = _case(M, K, N, S, r, dtype, bias)
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0, allow_tf32=False)
    assert y.dtype == dtype and y.shape == (M, N) and y.is_cuda
    if dtype == torch.float32:  # the base GEMM in exact fp32 too
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    ref = ssa_lora_reference64(x, W, b, A_cat, B_cat, alpha, 2.0)
    atol, rtol = TOL["fp32" if dtype == torch.float32 else dtype]
    torch.testing.assert_close(y.double().cpu(), ref, atol=atol, rtol=rtol)


def test_fp32_is_exact_unless_tf32_is_asked_for():
    """The adapter part alone (y starts at 0): ieee is far under TF32's error, TF32 within it."""
    M, K, N, S, r = 64, 4096, 1024, 16, 64
    x, W, b, A_cat, B_cat, alpha = _case(M, K, N, S, r, torch.float32, False, seed=2)
    ref = ssa_lora_reference64(x, torch.zeros_like(W), None, A_cat, B_cat, alpha, 1.0)
    errs = {}
    for tf32 in (False, True):
        y = torch.zeros(M, N, device="cuda")
        triton_ssa_lora.ssa_lora_add_(y, x, A_cat, B_cat, alpha, 1.0, allow_tf32=tf32)
        errs[tf32] = ((y.double().cpu() - ref).norm() / ref.norm()).item()
    assert errs[False] < 1e-6, errs
    assert errs[True] < 3e-3, errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_stored_config_compiles_and_matches(dtype):
    """Each config autotuning may pick fits shared memory and computes the same function."""
    M, K, N, S, r = 40, 1000, 300, 16, 64  # S·r = 1024
    x, W, b, A_cat, B_cat, alpha = _case(M, K, N, S, r, dtype, False, seed=4)
    ref = ssa_lora_reference64(x, W, None, A_cat, B_cat, alpha, 2.0)
    base = torch.nn.functional.linear(x, W)
    default = lambda kind: triton_ssa_lora._default(kind, 64, False)
    atol, rtol = TOL["fp32" if dtype == torch.float32 else dtype]
    for kind, table in (
        ("shrink", triton_ssa_lora.SHRINK_CONFIGS),
        ("expand", triton_ssa_lora.EXPAND_CONFIGS),
    ):
        for cfg in table:
            kw = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            configs = (kw, default("expand")) if kind == "shrink" else (default("shrink"), kw)
            y = triton_ssa_lora.ssa_lora_add_(
                base.clone(), x, A_cat, B_cat, alpha, 2.0, allow_tf32=False, configs=configs
            )
            torch.testing.assert_close(y.double().cpu(), ref, atol=atol, rtol=rtol)


def test_stored_defaults_without_autotuning(monkeypatch):
    monkeypatch.setenv("FCIT_KERNELS_AUTOTUNE", "0")
    for M in (1, 16, 300):
        x, W, b, A_cat, B_cat, alpha = _case(M, 512, 256, 8, 8, torch.bfloat16, True, seed=M)
        y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0)
        ref = ssa_lora_reference64(x, W, b, A_cat, B_cat, alpha, 2.0)
        torch.testing.assert_close(y.double().cpu(), ref, atol=5e-2, rtol=2e-2)


def test_alpha_per_sequence_on_the_gpu():
    Bs, T = 4, 33
    x, W, b, A_cat, B_cat, alpha = _case(Bs * T, 256, 200, 8, 8, torch.float32, True, groups=Bs)
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0, allow_tf32=False)
    full = ssa_lora_linear(
        x, W, b, A_cat, B_cat, alpha.repeat_interleave(T, 0), 2.0, allow_tf32=False
    )
    torch.testing.assert_close(y, full, atol=1e-6, rtol=1e-6)


def _capture(fn):
    """fn() once eagerly (autotuning synchronizes: before capture), once on a side stream, then
    captured; returns (graph, the captured output)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("M", [1, 16, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(M, dtype):
    """The whole op captured, replayed on new inputs copied into the captured buffers, equals the
    eager op (to fp32 rounding of h: split-K adds its slices atomically, in varying order); the
    adapter kernels alone in deterministic mode (SPLIT_K = 1): bitwise."""
    K, N, S, r = 1024, 768, 8, 8
    x, W, b, A_cat, B_cat, alpha = _case(M, K, N, S, r, dtype, True, seed=7)
    graph, out = _capture(lambda: ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0))
    base = torch.nn.functional.linear(x, W, b)
    y = torch.empty_like(base)

    def adapter():
        y.copy_(base)
        return triton_ssa_lora.ssa_lora_add_(y, x, A_cat, B_cat, alpha, 2.0)

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        graph_det, out_det = _capture(adapter)
        for seed in range(3):
            x.copy_(torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(x))
            alpha.copy_(torch.softmax(torch.randn(M, S, device="cuda"), -1))
            base.copy_(torch.nn.functional.linear(x, W, b))
            graph.replay()
            graph_det.replay()
            replayed, replayed_det = out.clone(), out_det.clone()
            eager = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0)
            eager_det = adapter()  # writes y, the captured output buffer: compare the clone
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(replayed, eager, atol=tol, rtol=tol)
            torch.testing.assert_close(replayed_det, eager_det, atol=0, rtol=0)
            assert replayed_det.abs().sum() > 0
    finally:
        torch.use_deterministic_algorithms(False)


def test_no_host_sync_per_call():
    """After the first call of a shape (autotuning), a call reads nothing back to the host: run
    under torch's sync debug mode set to error (a .item(), a value check or a D2H copy raises)."""
    for M in (1, 16, 512):
        x, W, b, A_cat, B_cat, alpha = _case(M, 2048, 1024, 8, 8, torch.bfloat16, True)
        ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0)  # warm-up: autotune
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_subspace_lora_layer_forward_does_not_sync():
    """The model path: set_activation moves α to the device once; the SSA forwards never sync."""
    from fcit_hpc.model.lora import SubspaceAdapter, inject_subspace_lora

    model = torch.nn.Sequential()
    model.add_module("up_proj", torch.nn.Linear(256, 512))
    model = model.cuda().to(torch.bfloat16)
    ad = SubspaceAdapter(inject_subspace_lora(model, ["up_proj"], 8, 16.0, dropout=0.0, s_max=4))
    with torch.no_grad():
        for p in ad.layers[0].parameters():
            p.normal_(0, 0.02)
    ad.set_activation(torch.softmax(torch.randn(2, 4), -1))
    x = torch.randn(2, 7, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model(x)  # builds the concatenation, autotunes
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    layer = ad.layers[0]
    A_cat, B_cat = layer._cat
    ref = ssa_lora_reference64(
        x.reshape(14, 256),
        layer.base.weight,
        layer.base.bias,
        A_cat,
        B_cat,
        layer.alpha,
        layer.scaling,
    )
    torch.testing.assert_close(y.reshape(14, -1).double().cpu(), ref, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("M,S,D", [(1, 8, 384), (37, 3, 1000), (200, 16, 4096)])
def test_gate_kernel_fp32_exact(M, S, D):
    """softmax(cos/ε) at ε = 0.05 amplifies dot errors 20×: TF32 gave α errors ~1.5e-3."""
    g = torch.Generator().manual_seed(M)
    f, G = torch.randn(M, D, generator=g).cuda(), torch.randn(S, D, generator=g).cuda()
    for eps in (0.05, 1.0):
        a = ssa_gate(f, G, eps, allow_tf32=False)
        ref = ssa_gate_reference(f.cpu(), G.cpu(), eps, dtype=torch.float64)
        torch.testing.assert_close(a.double().cpu(), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------ fused decode kernel, op, tuning (issue 25/24)
FUSED_SWEEP = [
    (1, 4096, 4096, 8, 8, False),
    (16, 4096, 11008, 8, 8, True),
    (1, 11008, 4096, 8, 8, False),
    (5, 4096, 4096, 16, 16, True),  # S·r = 256, the fused path's limit
    (3, 333, 517, 3, 16, True),  # ragged
]


@pytest.mark.parametrize("M,K,N,S,r,bias", FUSED_SWEEP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_kernel_against_float64(M, K, N, S, r, bias, dtype):
    """One launch per linear (expand programs wait on the shrink programs' counter); five calls
    in a row (the kernel re-zeroes its workspace), deterministic mode bitwise reproducible."""
    from fcit_kernels import tuning

    x, W, b, A_cat, B_cat, alpha = _case(M, K, N, S, r, dtype, bias, seed=M)
    assert triton_ssa_lora.choose_path(M, S * r) == "fused"
    base = torch.nn.functional.linear(x, W, b)
    ref = ssa_lora_reference64(x, W, b, A_cat, B_cat, alpha, 2.0)
    atol, rtol = TOL["fp32" if dtype == torch.float32 else dtype]
    for _ in range(5):
        y = triton_ssa_lora.ssa_lora_add_(base.clone(), x, A_cat, B_cat, alpha, 2.0, False)
        torch.testing.assert_close(y.double().cpu(), ref, atol=atol, rtol=rtol)
    h, ctr = triton_ssa_lora.workspace(x.device, tuning.r_bucket(S * r))
    assert h.abs().sum().item() == 0 and ctr.tolist() == [0, 0]
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        outs = [
            triton_ssa_lora.ssa_lora_add_(base.clone(), x, A_cat, B_cat, alpha, 2.0, False)
            for _ in range(2)
        ]
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_every_fused_candidate_compiles_and_matches():
    M, K, N, S, r = 7, 1000, 300, 8, 8
    x, W, b, A_cat, B_cat, alpha = _case(M, K, N, S, r, torch.bfloat16, False, seed=11)
    ref = ssa_lora_reference64(x, W, None, A_cat, B_cat, alpha, 2.0)
    base = torch.nn.functional.linear(x, W)
    for cfg in triton_ssa_lora.FUSED_CANDIDATES:
        y = triton_ssa_lora.ssa_lora_add_(base.clone(), x, A_cat, B_cat, alpha, 2.0, configs=cfg)
        torch.testing.assert_close(y.double().cpu(), ref, atol=5e-2, rtol=2e-2)


def test_large_total_rank_dispatches_to_two_gemm():
    """S·r ≥ 512 on CUDA: two cuBLAS GEMMs (the issue measured them at or ahead of the kernels)."""
    assert triton_ssa_lora.plan(1, 1024, True) == "two_gemm"
    x, W, b, A_cat, B_cat, alpha = _case(16, 1024, 512, 16, 64, torch.bfloat16, True)
    y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0)
    ref = ssa_lora_reference64(x, W, b, A_cat, B_cat, alpha, 2.0)
    torch.testing.assert_close(y.double().cpu(), ref, atol=5e-2, rtol=2e-2)


def test_tuning_fills_the_cache_once(tmp_path, monkeypatch):
    """FCIT_KERNELS_TUNE=1: a missing key is timed over its candidates and stored under
    $FCIT_CACHE; a new process (reload) reads it without tuning; results stay exact."""
    from fcit_kernels import tuning

    monkeypatch.setenv("FCIT_CACHE", str(tmp_path))
    monkeypatch.setenv("FCIT_KERNELS_TUNE", "1")
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path / "none")
    tuning.reload()
    n0 = tuning.stats()["tuned"]
    for M in (1, 100):
        x, W, b, A_cat, B_cat, alpha = _case(M, 512, 384, 4, 8, torch.bfloat16, True, seed=M)
        y = ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0)
        ref = ssa_lora_reference64(x, W, b, A_cat, B_cat, alpha, 2.0)
        torch.testing.assert_close(y.double().cpu(), ref, atol=5e-2, rtol=2e-2)
    assert tuning.stats()["tuned"] - n0 == 3  # fused (decode); shrink and expand (prefill)
    assert tuning.cache_path(tuning.device_name(x.device)).exists()
    tuning.reload()
    ssa_lora_linear(x, W, b, A_cat, B_cat, alpha, 2.0)
    assert tuning.stats()["tuned"] - n0 == 3
    tuning.reload()


def test_compiled_model_without_graph_break_and_in_a_cuda_graph():
    """torch.compile(fullgraph=True) (inductor) of a model with SSA layers on CUDA, then the
    compiled model captured in a CUDA graph: both equal eager."""
    from fcit_hpc.model.lora import SubspaceAdapter, inject_subspace_lora

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("up_proj", torch.nn.Linear(256, 512))
    model.add_module("act", torch.nn.SiLU())
    model.add_module("down_proj", torch.nn.Linear(512, 256))
    model = model.cuda().to(torch.bfloat16)
    ad = SubspaceAdapter(
        inject_subspace_lora(model, ["up_proj", "down_proj"], 8, 16.0, dropout=0.0, s_max=4)
    )
    with torch.no_grad():
        for layer in ad.layers:
            for p in layer.parameters():
                p.normal_(0, 0.05)
    ad.set_activation(torch.softmax(torch.randn(1, 4), -1))
    x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        y = compiled(x)
        torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)
        graph, out = _capture(lambda: compiled(x))
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, model(x), atol=2e-2, rtol=2e-2)
    torch._dynamo.reset()
