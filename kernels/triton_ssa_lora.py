"""Triton kernels of DISCO's inference path: the fused SSA-LoRA add and the SSA gate.

Design (roofline). The base GEMM ``x W0ᵀ`` is left to the vendor GEMM; one fused kernel then does
shrink (x A_catᵀ), gate (⊙ expand_r(α)·scaling) and expand (· B_catᵀ) and adds into its output.
Decode (M ≤ 16 rows) is memory-bound: W0 is read once either way and the adapter adds only
S·r·(in + out) elements to the in·out of W0 (3% at S·r = 64, H = 4096), so fusing into the base
K-loop would save just one read/write of the tiny [M, out] output. Prefill (M in the hundreds) is
compute-bound and the adapter adds 2·M·S·r·(in + out) flops to 2·M·in·out (again ~3%), which the
vendor GEMM runs at peak; a hand-written fused GEMM would lose more than the extra pass costs.
Each program recomputes the shrink of its row block (R = S·r ≤ a few hundred columns), so the
[M, S·r] intermediate never leaves registers.

File order: kernels → launchers (shape comments, dtype/contiguity asserts) → public ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------- kernels
@triton.jit
def _ssa_lora_add_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    alpha_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    r,
    scaling,
    sxm,
    sxk,
    sar,
    sak,
    sbn,
    sbr,
    salm,
    sals,
    sym,
    syn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    RP: tl.constexpr,
    LOW_PRECISION_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, RP)
    rk = tl.arange(0, BK)
    # shrink: h = x A_catᵀ, [BM, RP] in fp32
    h = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        xt = tl.load(
            x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        at = tl.load(
            a_ptr + rr[None, :] * sar + kk[:, None] * sak,
            mask=(rr[None, :] < R) & (kk[:, None] < K),
            other=0.0,
        )  # [BK, RP]
        if LOW_PRECISION_DOT:
            h += tl.dot(xt, at)
        else:  # fp32, or bf16 upcast right after the load
            h += tl.dot(xt.to(tl.float32), at.to(tl.float32))
    # gate: column j belongs to subspace j // r
    g = tl.load(
        alpha_ptr + rm[:, None] * salm + (rr[None, :] // r) * sals,
        mask=(rm[:, None] < M) & (rr[None, :] < R),
        other=0.0,
    )
    h = h * g.to(tl.float32) * scaling
    # expand and add into y
    bt = tl.load(
        b_ptr + rn[None, :] * sbn + rr[:, None] * sbr,
        mask=(rn[None, :] < N) & (rr[:, None] < R),
        other=0.0,
    )  # [RP, BN]
    if LOW_PRECISION_DOT:
        out = tl.dot(h.to(bt.dtype), bt)
    else:
        out = tl.dot(h, bt.to(tl.float32))
    ymask = (rm[:, None] < M) & (rn[None, :] < N)
    yp = y_ptr + rm[:, None] * sym + rn[None, :] * syn
    y = tl.load(yp, mask=ymask, other=0.0)
    tl.store(yp, (y.to(tl.float32) + out).to(y.dtype), mask=ymask)


@triton.jit
def _ssa_gate_kernel(
    f_ptr,
    g_ptr,
    out_ptr,
    M,
    S,
    D,
    inv_eps,
    sfm,
    sfd,
    sgs,
    sgd,
    som,
    sos,
    BM: tl.constexpr,
    SP: tl.constexpr,
    BD: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rs = tl.arange(0, SP)
    rd = tl.arange(0, BD)
    dot = tl.zeros((BM, SP), dtype=tl.float32)
    fn = tl.zeros((BM,), dtype=tl.float32)
    gn = tl.zeros((SP,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + rd
        ft = tl.load(
            f_ptr + rm[:, None] * sfm + dd[None, :] * sfd,
            mask=(rm[:, None] < M) & (dd[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        gt = tl.load(
            g_ptr + rs[None, :] * sgs + dd[:, None] * sgd,
            mask=(rs[None, :] < S) & (dd[:, None] < D),
            other=0.0,
        ).to(tl.float32)
        dot += tl.dot(ft, gt)
        fn += tl.sum(ft * ft, axis=1)
        gn += tl.sum(gt * gt, axis=0)
    fnorm = tl.maximum(tl.sqrt(fn), 1e-12)
    gnorm = tl.maximum(tl.sqrt(gn), 1e-12)
    logits = dot / (fnorm[:, None] * gnorm[None, :]) * inv_eps
    logits = tl.where(rs[None, :] < S, logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    e = tl.exp(logits - mx[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(
        out_ptr + rm[:, None] * som + rs[None, :] * sos,
        p,
        mask=(rm[:, None] < M) & (rs[None, :] < S),
    )


# ---------------------------------------------------------------------------------- launchers
# Tuned block sizes per device: {device name: [(max M, BM, BN, BK), ...]}; "default" otherwise.
BLOCKS: dict[str, list[tuple[int, int, int, int]]] = {
    "default": [(16, 16, 64, 64), (64, 32, 64, 64), (1 << 62, 64, 64, 32)],
    "interpreter": [(1 << 62, 16, 64, 64)],  # few programs: the CPU interpreter is ~15 ms each
}


def _blocks(x: torch.Tensor, M: int) -> tuple[int, int, int]:
    import os

    if os.environ.get("TRITON_INTERPRET") == "1" and not x.is_cuda:
        key = "interpreter"
    else:
        key = torch.cuda.get_device_name(x.device) if x.is_cuda else "default"
    for max_m, bm, bn, bk in BLOCKS.get(key, BLOCKS["default"]):
        if M <= max_m:
            return bm, bn, bk
    raise AssertionError("unreachable")


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def ssa_lora_add_(y, x, A_cat, B_cat, alpha, scaling: float) -> torch.Tensor:
    """In place: ``y += scaling · ((x A_catᵀ) ⊙ expand_r(α)) B_catᵀ``.

    y [M, N], x [M, K], A_cat [R, K] (R = S·r), B_cat [N, R], alpha [M, S].
    """
    M, K = x.shape  # [num_tokens, hidden]
    N, R = B_cat.shape  # [out, S·r]
    S = alpha.shape[1]
    _require(x.dtype in _DTYPES, f"ssa_lora: unsupported dtype {x.dtype}")
    _require(
        A_cat.dtype == B_cat.dtype == x.dtype == y.dtype,
        f"ssa_lora: dtypes differ x {x.dtype}, A {A_cat.dtype}, B {B_cat.dtype}, y {y.dtype}",
    )
    _require(
        A_cat.shape == (R, K) and y.shape == (M, N) and alpha.shape[0] == M,
        f"ssa_lora: shapes x {tuple(x.shape)} A {tuple(A_cat.shape)} B {tuple(B_cat.shape)} "
        f"alpha {tuple(alpha.shape)} y {tuple(y.shape)}",
    )
    _require(S > 0 and R % S == 0, f"ssa_lora: R={R} is not a multiple of S={S}")
    _require(
        x.stride(-1) == 1 and A_cat.is_contiguous() and B_cat.is_contiguous() and y.is_contiguous(),
        "ssa_lora: x rows, A_cat, B_cat and y must be contiguous",
    )
    _require(alpha.dtype == torch.float32, "ssa_lora: alpha must be float32")
    r = R // S
    RP = max(16, triton.next_power_of_2(R))
    BM, BN, BK = _blocks(x, M)
    low = x.dtype == torch.float16
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _ssa_lora_add_kernel[grid](
        x,
        A_cat,
        B_cat,
        alpha,
        y,
        M,
        N,
        K,
        R,
        r,
        float(scaling),
        x.stride(0),
        x.stride(1),
        A_cat.stride(0),
        A_cat.stride(1),
        B_cat.stride(0),
        B_cat.stride(1),
        alpha.stride(0),
        alpha.stride(1),
        y.stride(0),
        y.stride(1),
        BM=BM,
        BN=BN,
        BK=BK,
        RP=RP,
        LOW_PRECISION_DOT=low,
    )
    return y


def ssa_gate_launch(f, G, epsilon: float) -> torch.Tensor:
    """α [M, S] = softmax(cos(f, G) / ε); f [M, D], G [S, D]."""
    M, D = f.shape
    S = G.shape[0]
    _require(f.is_contiguous() and G.is_contiguous(), "ssa_gate: f and G must be contiguous")
    out = torch.empty((M, S), dtype=torch.float32, device=f.device)
    SP = max(16, triton.next_power_of_2(S))
    BM, BD = 16, 64
    _ssa_gate_kernel[(triton.cdiv(M, BM),)](
        f,
        G,
        out,
        M,
        S,
        D,
        1.0 / epsilon,
        f.stride(0),
        f.stride(1),
        G.stride(0),
        G.stride(1),
        out.stride(0),
        out.stride(1),
        BM=BM,
        SP=SP,
        BD=BD,
    )
    return out


# --------------------------------------------------------------------------------- public ops
def ssa_lora_linear_triton(x, weight, bias, A_cat, B_cat, alpha, scaling: float):
    """Vendor GEMM for the base, then the fused shrink-gate-expand kernel adds into its output."""
    y = torch.nn.functional.linear(x, weight, bias).contiguous()  # [M, out]
    return ssa_lora_add_(y, x, A_cat, B_cat, alpha.float().contiguous(), scaling)


def ssa_gate_triton(f, G, epsilon: float):
    return ssa_gate_launch(f, G, epsilon)
