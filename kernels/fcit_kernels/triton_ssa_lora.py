"""Triton kernels of DISCO's inference path: the SSA-LoRA add (shrink, expand) and the SSA gate.

``y = x W0ᵀ (+ b) + scaling · ((x A_catᵀ) ⊙ expand_r(α)) B_catᵀ``, R = S·r columns in A_cat/B_cat.

Paths (``plan``), none of which waits on the host (so the op is CUDA-graph capturable):

- decode, M ≤ 16 and S·r ≤ 256: the base GEMM, then ONE fused launch (``_fused_decode_kernel``):
  split-K shrink programs and expand programs in one grid; the expand programs load their B_cat
  and y tiles, then wait on a counter the shrink programs release (the first-dispatched, lower
  program ids are the shrink programs, so they never wait on anyone). The h buffer and counters
  live in a per-device workspace the kernel's last program re-zeroes: no memset launch.
  Launches per linear: 2 (cuBLAS + fused) instead of 4 (cuBLAS, memset, shrink, expand).
- prefill (M > 16, S·r < 512): base + memset + shrink + expand, as below.
- S·r ≥ 512 on CUDA: the two-GEMM torch path (cuBLAS twice): issue 25's H200 table has the
  kernels at or behind it there (bf16 S·r 1024, M 1: 2.53 vs 2.35 × base; fp32: 4.12 vs 1.78).

Roofline of the fused decode kernel (H200: 4.2 TB/s measured copy bandwidth; bf16, H = out =
4096, S·r = 64, M = 1): bytes A_cat 0.52 MB + B_cat 0.52 MB + y 16 KB ⇒ 0.25 µs of traffic,
against a 12.5 µs base GEMM (2%). Its time is latency: one launch inside a CUDA graph (~1-2 µs)
plus the shrink's critical path (one 128-wide K slice of x·A per program, 32 programs ⇒ 64 KB of
A each, ~0.5 µs) plus the expand (64 programs, 8 KB of B each, loaded before the wait, so the
wait hides it). The split path measured 7.3 µs over the base at M = 1 (memset + two dependent
launches); removing two launches and two dependent gaps is the point of the fused kernel,
figure to be measured (docs/kernels.md). At S·r = 256 the fused kernel holds a [16, 256] fp32 h
tile and a [256, BN] B tile per expand program (sm_90 compile: 49 KB shared, 168 registers,
no spills in bf16: ``python -m fcit_kernels.aot_check``); beyond 256 the split path runs.
gate_proj and up_proj share their input, so one shrink over [A_gate; A_up] would save a launch
per MLP; it needs the two linears fused into one module (HF's LlamaMLP calls them separately),
left out: with the fused kernel the shrink is no longer a launch of its own.

The split path's three launches:

1. base: ``y = F.linear(x, W0, b)`` — the vendor GEMM (cuBLAS), tuned per GPU and shape;
2. shrink (split-K): grid (M/BM, R/BR, SPLIT_K); each program reduces one K slice of
   ``x[BM, K] · A_cat[BR, K]ᵀ`` in fp32, multiplies by ``scaling · α[row, col // r]`` (linear, so
   per slice is exact) and adds into a zeroed ``h [M, R]`` fp32 buffer (``tl.atomic_add`` when
   SPLIT_K > 1, a plain store when 1);
3. expand-add: grid (M/BM, N/BN); loops over R in BR blocks, ``acc += h[BM, BR] · B_cat[BR, BN]``,
   then reads the base output tile, adds, writes it back in place.

Roofline (H100 SXM: ~3.0 TB/s achievable HBM3, ~800 TFLOP/s dense bf16; bf16, H = out = 4096,
R = S·r = 64; bytes = each operand read once, each output written once):

| M | base bytes | base floor | adapter bytes (A, B; y round trip) | adapter floor | % of base |
| 1 | 33.6 MB (W0) | 11.2 µs | 1.05 MB; 16 KB | 0.36 µs | 3.2% |
| 16 | 33.8 MB | 11.3 µs | 1.05 MB; 0.26 MB | 0.44 µs | 3.9% |
| 512 | 41.9 MB; 17.2 GFLOP | 21 µs (flops) | 1.05 MB; 8.4 MB; 0.54 GFLOP | 3.2 µs | 15% |
| 4096 | 101 MB; 137 GFLOP | 172 µs (flops) | 1.05 MB; 67 MB; 4.3 GFLOP | 23 µs | 13% |

Decode (M ≤ 16) is memory-bound and the adapter's bytes are ~3% of W0's, so the cost that
matters is latency: two extra dependent launches and a memset (~1 µs each inside a CUDA graph,
several µs each eager, where Triton's Python launch path adds more). The adapter's bytes grow
with S·r: at S·r = 1024 A_cat and B_cat are 16.8 MB, half of W0, and the decode floor itself is
1.5× the base — "within 15% of the base" is a target for S·r up to ~256. Fusing the expand into
the base GEMM's epilogue would save one launch and the y round trip but replace cuBLAS by a
hand-written GEMM that must match it at every M: at decode the saving is one launch, at prefill
(M ≥ 512) the y round trip is 13–15% of the base and fusion would pay — a follow-up to decide on
GPU measurements, not blind. The shrink is split over K because a [M, R] tile grid has one or
two programs at decode (R = 64): one program streaming all of A_cat serially is latency-bound
(the old single kernel recomputed the full-K shrink in every N program: 34.5 µs measured on an
H100). Split 8–64 ways, it runs tens to hundreds of programs; the atomics make the fp32 sum order
of h vary between runs (rounding-level differences); ``torch.use_deterministic_algorithms``
restricts the configs to SPLIT_K = 1, which is bitwise reproducible.

Shared memory (Triton keeps ``num_stages`` copies of each dot operand tile in shared memory):
shrink ``stages·(BM·BK + BR·BK)·es``; expand ``stages·(BM·BR·4 + BR·BN·es) + BM·BN·4`` (epilogue
layout change). Worst stored config in fp32 (es = 4): shrink (64, 64, 128, 3 stages) = 192 KB,
expand (128, 64, 64, 3 stages) = 176 KB; both under Hopper's 227 KB per block (the compiler's own
figures for sm_90 are lower, 128 KB and 96 KB: ``python -m fcit_kernels.aot_check``). R enters only
through the loop/grid over BR blocks, so any S·r (1024 and beyond) fits; configs above the
device's limit are pruned at tuning time.

Precision: fp32 inputs use ``tl.dot(..., input_precision="ieee")`` (exact fp32 FMA) unless TF32 is
switched on (argument, or torch's ``torch.backends.cuda.matmul.allow_tf32``, which the base
GEMM follows too); fp16/bf16 inputs multiply in their dtype with fp32 accumulation, h rounded to
the dtype before the expand (as torch's two-GEMM path does). The gate kernel likewise.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import triton
import triton.language as tl

from fcit_kernels import tuning

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMEM_LIMIT_H100 = 232448  # bytes of shared memory per block (227 KB) on Hopper


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------- kernels
@triton.jit
def _shrink_tile(
    x_ptr, a_ptr, alpha_ptr, h_ptr, rm, rr, pid_k, M, K, R, r, G, scaling,
    sxm, sxk, sar, sak, salm, sals, shm, shr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The shrink of one tile, rows ``rm`` [BM] x columns ``rr`` [BR] of h over K slice
    ``pid_k`` of SPLIT_K: h[m, j] (+)= scaling · α[m // G, j // r] · Σ_k x[m, k] A[j, k]
    (stored, or added atomically when K is split). The split and the fused kernels' one copy."""
    rk = tl.arange(0, BK)
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK
    k_lo = pid_k * k_span
    k_hi = tl.minimum(k_lo + k_span, K)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        xt = tl.load(
            x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
            mask=(rm[:, None] < M) & (kk[None, :] < k_hi),
            other=0.0,
        )  # [BM, BK]
        at = tl.load(
            a_ptr + rr[None, :] * sar + kk[:, None] * sak,
            mask=(rr[None, :] < R) & (kk[:, None] < k_hi),
            other=0.0,
        )  # [BK, BR]
        if UPCAST:  # the interpreter multiplies bf16 bit patterns as integers
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PREC)
    mask = (rm[:, None] < M) & (rr[None, :] < R)
    g = tl.load(
        alpha_ptr + (rm // G)[:, None] * salm + (rr // r)[None, :] * sals, mask=mask, other=0.0
    )
    acc = acc * (g.to(tl.float32) * scaling)
    hp = h_ptr + rm[:, None] * shm + rr[None, :] * shr
    if SPLIT_K == 1:
        tl.store(hp, acc, mask=mask)
    else:
        tl.atomic_add(hp, acc, mask=mask, sem="relaxed")  # kernel end orders it for the expand


@triton.jit(do_not_specialize=["M", "R", "r", "G"])  # a new S·r or M: no recompilation
def _shrink_kernel(
    x_ptr,
    a_ptr,
    alpha_ptr,
    h_ptr,
    M,
    K,
    R,
    r,
    G,  # rows per α row: row m is gated by α[m // G]
    scaling,
    sxm,
    sxk,
    sar,
    sak,
    salm,
    sals,
    shm,
    shr,
    BM: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """h[m, j] (+)= scaling · α[m // G, j // r] · Σ_{k in this program's K slice} x[m, k] A[j, k]"""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    _shrink_tile(
        x_ptr, a_ptr, alpha_ptr, h_ptr, rm, rr, tl.program_id(2), M, K, R, r, G, scaling,
        sxm, sxk, sar, sak, salm, sals, shm, shr, BM, BR, BK, SPLIT_K, PREC, UPCAST,
    )  # fmt: skip


@triton.jit(do_not_specialize=["M", "R"])
def _expand_add_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    R,
    shm,
    shr,
    sbn,
    sbr,
    sym,
    syn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BR: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y[m, n] += Σ_j h[m, j] B[n, j], the base output tile read, added to and written in place."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rb = tl.arange(0, BR)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + rb
        ht = tl.load(
            h_ptr + rm[:, None] * shm + rr[None, :] * shr,
            mask=(rm[:, None] < M) & (rr[None, :] < R),
            other=0.0,
        )  # [BM, BR] fp32
        bt = tl.load(
            b_ptr + rn[None, :] * sbn + rr[:, None] * sbr,
            mask=(rn[None, :] < N) & (rr[:, None] < R),
            other=0.0,
        )  # [BR, BN]
        if UPCAST:
            acc = tl.dot(ht, bt.to(tl.float32), acc, input_precision=PREC)
        else:
            acc = tl.dot(ht.to(bt.dtype), bt, acc, input_precision=PREC)
    ymask = (rm[:, None] < M) & (rn[None, :] < N)
    yp = y_ptr + rm[:, None] * sym + rn[None, :] * syn
    y = tl.load(yp, mask=ymask, other=0.0)
    tl.store(yp, (y.to(tl.float32) + acc).to(y.dtype), mask=ymask)


@triton.jit(do_not_specialize=["M", "R", "r", "G"])
def _fused_decode_kernel(
    x_ptr,
    a_ptr,
    alpha_ptr,
    b_ptr,
    y_ptr,
    h_ptr,  # workspace [16, RP] fp32, zero on entry, zeroed again by the last program
    ctr_ptr,  # workspace [2] int32: shrink programs done, expand programs done
    M,
    K,
    N,
    R,
    r,
    G,
    scaling,
    sxm,
    sxk,
    sar,
    sak,
    salm,
    sals,
    sbn,
    sbr,
    sym,
    syn,
    BRS: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BN: tl.constexpr,
    RP: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Decode (M ≤ 16) in one launch: programs [0, n_shrink) are split-K shrink programs
    (h += scaling · α ⊙ x A_catᵀ over one K slice and one BRS block of S·r, then a release
    increment of ctr[0]); programs [n_shrink, n_shrink + N/BN) are expand programs: each loads its
    B_cat tile [RP, BN] and its y tile first (overlapping the shrink), waits (acquire) until
    ctr[0] = n_shrink, then y += h B_catᵀ. The last expand program to finish zeroes h and the
    counters for the next launch. Shrink programs have the lower ids, so they are dispatched
    first and never wait: no deadlock whatever the residency (the interpreter runs programs in
    id order, so its waits pass at once)."""
    pid = tl.program_id(0)
    n_shrink = tl.cdiv(R, BRS) * SPLIT_K
    n_expand = tl.cdiv(N, BN)
    rm = tl.arange(0, 16)  # BM = 16 rows (M ≤ 16): a literal, no local constexpr (Triton 3.6)
    if pid < n_shrink:
        rr = (pid // SPLIT_K) * BRS + tl.arange(0, BRS)
        _shrink_tile(
            x_ptr, a_ptr, alpha_ptr, h_ptr, rm, rr, pid % SPLIT_K, M, K, R, r, G, scaling,
            sxm, sxk, sar, sak, salm, sals, RP, 1, 16, BRS, BK, SPLIT_K, PREC, UPCAST,
        )  # fmt: skip
        # every warp's h writes before the (one-thread) release increment, as cooperative
        # groups' grid sync does: CTA barrier, then a gpu-scope release by one thread
        tl.debug_barrier()
        tl.atomic_add(ctr_ptr, 1, sem="release", scope="gpu")
    else:
        rn = (pid - n_shrink) * BN + tl.arange(0, BN)
        rp = tl.arange(0, RP)
        bt = tl.load(
            b_ptr + rn[None, :] * sbn + rp[:, None] * sbr,
            mask=(rn[None, :] < N) & (rp[:, None] < R),
            other=0.0,
        )  # [RP, BN], fetched while the shrink programs run
        ymask = (rm[:, None] < M) & (rn[None, :] < N)
        yp = y_ptr + rm[:, None] * sym + rn[None, :] * syn
        y = tl.load(yp, mask=ymask, other=0.0)
        done = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
        while done < n_shrink:
            done = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()  # no warp reads h before the acquire
        hw = h_ptr + rm[:, None] * RP + rp[None, :]
        ht = tl.load(hw, cache_modifier=".cg")  # [16, RP] fp32 (zero beyond M and R), from L2
        if UPCAST:  # (a name apart from the shrink branch's acc: branch types must agree)
            add = tl.dot(ht, bt.to(tl.float32), input_precision=PREC)
        else:
            add = tl.dot(ht.to(bt.dtype), bt, input_precision=PREC)
        tl.store(yp, (y.to(tl.float32) + add).to(y.dtype), mask=ymask)
        tl.debug_barrier()  # every warp has read h before this program counts itself done
        last = tl.atomic_add(ctr_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if last == n_expand - 1:
            tl.store(hw, tl.zeros((16, RP), dtype=tl.float32))
            tl.atomic_xchg(ctr_ptr + 1, 0)
            tl.atomic_xchg(ctr_ptr, 0)


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
    PREC: tl.constexpr,
):
    """α = softmax(cos(f, G) / ε) row-wise, all in fp32."""
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
        dot = tl.dot(ft, gt, dot, input_precision=PREC)
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


# ------------------------------------------------------------------------------------ configs
def _cfg(num_warps: int, num_stages: int, **kw: int) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# The stored table: the candidates autotuning picks from on CUDA (per M bucket, N, K, R, dtypes);
# the first entry whose BM suits M is the default when autotuning is off (FCIT_KERNELS_AUTOTUNE=0).
# Decode entries (BM = 16) split K 8–64 ways, as vLLM's shrink does at small batch.
SHRINK_CONFIGS = [
    _cfg(4, 3, BM=16, BR=32, BK=128, SPLIT_K=32),
    _cfg(4, 3, BM=16, BR=64, BK=64, SPLIT_K=1),
    _cfg(4, 3, BM=16, BR=64, BK=64, SPLIT_K=64),
    _cfg(2, 3, BM=16, BR=16, BK=256, SPLIT_K=16),
    _cfg(4, 4, BM=16, BR=64, BK=128, SPLIT_K=8),
    _cfg(4, 3, BM=32, BR=32, BK=64, SPLIT_K=16),
    _cfg(4, 3, BM=64, BR=64, BK=64, SPLIT_K=8),
    _cfg(4, 4, BM=64, BR=32, BK=64, SPLIT_K=4),
    _cfg(8, 3, BM=64, BR=64, BK=128, SPLIT_K=1),
    _cfg(8, 3, BM=128, BR=64, BK=32, SPLIT_K=1),
    _cfg(8, 3, BM=128, BR=32, BK=64, SPLIT_K=4),
]
EXPAND_CONFIGS = [  # none spills registers on sm_90 (aot_check); 128×128 tiles do
    _cfg(4, 2, BM=16, BN=64, BR=64),
    _cfg(2, 2, BM=16, BN=32, BR=32),
    _cfg(8, 3, BM=16, BN=128, BR=32),
    _cfg(4, 3, BM=32, BN=64, BR=64),
    _cfg(4, 3, BM=64, BN=64, BR=32),
    _cfg(8, 3, BM=64, BN=128, BR=32),
    _cfg(8, 3, BM=128, BN=64, BR=64),
]
# Fused decode kernel (M ≤ 16, S·r ≤ 256): the tuning candidates; the heuristic's choice is
# tuning.heuristic("fused", ...). BRS = min(RP, 64) is the shrink's block of S·r.
FUSED_CANDIDATES = [
    dict(BRS=64, BK=128, SPLIT_K=32, BN=64, num_warps=4, num_stages=2),
    dict(BRS=64, BK=128, SPLIT_K=16, BN=64, num_warps=4, num_stages=2),
    dict(BRS=64, BK=64, SPLIT_K=64, BN=64, num_warps=4, num_stages=2),
    dict(BRS=64, BK=128, SPLIT_K=32, BN=32, num_warps=4, num_stages=2),
    dict(BRS=32, BK=256, SPLIT_K=16, BN=128, num_warps=8, num_stages=2),
    dict(BRS=64, BK=256, SPLIT_K=8, BN=64, num_warps=8, num_stages=2),
]
# Interpreter (and CPU CI): fixed small blocks, SPLIT_K = 2 so the atomic path runs too; the
# interpreter costs ~ms per program, so few programs.
INTERP_SHRINK = dict(BM=16, BR=64, BK=32, SPLIT_K=2)
INTERP_EXPAND = dict(BM=16, BN=64, BR=64)
INTERP_FUSED = dict(BRS=32, BK=32, SPLIT_K=2, BN=32)


def smem_bytes(kind: str, cfg: triton.Config, elem_size: int) -> int:
    """Shared memory a config needs (bytes): the pipelined dot operand tiles (+ epilogue tile)."""
    k, st = cfg.kwargs, cfg.num_stages
    if kind == "shrink":
        return st * (k["BM"] * k["BK"] + k["BR"] * k["BK"]) * elem_size
    return st * (k["BM"] * k["BR"] * 4 + k["BR"] * k["BN"] * elem_size) + k["BM"] * k["BN"] * 4


def m_bucket(M: int) -> int:
    """M rounded up to a power of two (cap 4096): the autotune key, so prefill lengths share."""
    return min(triton.next_power_of_2(max(M, 1)), 4096)


@functools.cache
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT_H100))


def _prune(kind: str):
    def prune(configs, named_args, **kwargs):
        ref = named_args["x_ptr" if kind == "shrink" else "b_ptr"]
        es = ref.element_size()
        limit = _smem_limit(ref.device.index or 0)
        mb = named_args["MB"]
        keep = [
            c
            for c in configs
            if smem_bytes(kind, c, es) <= limit
            and c.kwargs["BM"] <= max(16, 2 * mb)
            and (kind != "shrink" or not named_args["DET"] or c.kwargs["SPLIT_K"] == 1)
        ]
        if kind == "shrink" and named_args["DET"] and not keep:
            keep = [_cfg(4, 3, BM=64, BR=64, BK=64, SPLIT_K=1)]
        return keep or configs[:1]

    return prune


def _default(kind: str, mb: int, det: bool) -> dict:
    """The heuristic config (no tuning) at M = mb for a 4096×4096 linear with S·r = 64."""
    return tuning.heuristic(kind, torch.bfloat16, mb, 4096, 4096, 64, det)


def dot_precision(dtype: torch.dtype, allow_tf32: bool | None) -> str:
    """``input_precision`` of tl.dot: "ieee" (exact fp32) unless TF32 is allowed; only fp32 reads
    it. None follows torch's switch for the base GEMM (torch.backends.cuda.matmul.allow_tf32)."""
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    tf32 = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
    return "tf32" if tf32 else "ieee"


# ---------------------------------------------------------------------------------- launchers
def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, rp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's h [16, rp] fp32 and counters [2] int32, zero between launches (the
    kernel's last program zeroes them again): made once per device and R bucket, so a call
    allocates nothing (CUDA-graph capturable after one warm-up call). Calls on one device share
    it: launches must be ordered (one stream), as a model's layers are."""
    k = (str(device), rp)
    if k not in _WORKSPACE:
        _WORKSPACE[k] = (
            torch.zeros((tuning.DECODE_M, rp), dtype=torch.float32, device=device),
            torch.zeros(2, dtype=torch.int32, device=device),
        )
    return _WORKSPACE[k]


def _split_meta(cfg: dict) -> tuple[dict, dict]:
    """(constexpr meta-parameters, launch options num_warps/num_stages) of a config dict."""
    opts = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    return {k: v for k, v in cfg.items() if k not in opts}, opts


def _launch(kernel, name: str, grid, args: tuple, cfg: dict, dtype, **consts) -> None:
    """Launch with a config; the first launch of each compiled variant is timed (compilation)."""
    meta, opts = _split_meta(cfg)
    if interpreting():
        opts = {}
    new = tuning.is_new_variant(name, {**meta, **consts}, dtype)
    t0 = time.perf_counter() if new else 0.0
    kernel[grid(meta)](*args, **meta, **consts, **opts)
    if new:
        tuning.note_launch(name, {**meta, **consts}, dtype, time.perf_counter() - t0)


def _bench(fn) -> float:
    """Median ms of fn() on the GPU (tuning only)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median")


def _fit(kind: str, cands: list[triton.Config], es: int, mb: int, det: bool, dev) -> list[dict]:
    """Candidates as dicts, pruned: shared memory within the device's limit, BM not far above
    M, SPLIT_K = 1 in deterministic mode."""
    args = {"x_ptr" if kind == "shrink" else "b_ptr": torch.empty(0, dtype=_ES[es], device=dev)}
    keep = _prune(kind)(cands, {**args, "MB": mb, "DET": int(det)})
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in keep]


_ES = {4: torch.float32, 2: torch.bfloat16}


def ssa_lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    A_cat: torch.Tensor,
    B_cat: torch.Tensor,
    alpha: torch.Tensor,
    scaling: float,
    allow_tf32: bool | None = None,
    configs: tuple[dict, dict] | dict | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """In place: ``y += scaling · ((x A_catᵀ) ⊙ expand_r(α)) B_catᵀ``; returns y.

    y [M, N], x [M, K], A_cat [R, K] (R = S·r), B_cat [N, R], alpha [M/G, S] (row m gated by
    α[m // G]). Checks shapes, dtypes, devices and strides only: nothing reads device memory.
    ``path``: "fused" (one launch, M ≤ 16 and R ≤ 256) or "split" (shrink then expand); None
    chooses (``choose_path``). ``configs`` (a dict for fused; (shrink, expand) dicts for split,
    num_warps/num_stages included) bypasses the choice: else the interpreter's blocks, or
    ``tuning.config`` (table, cache, tuning if asked, heuristic).
    """
    M, K = x.shape  # [num_tokens, hidden]
    N, R = B_cat.shape  # [out, S·r]
    S = alpha.shape[1]
    _require(x.dtype in _DTYPES, f"ssa_lora: unsupported dtype {x.dtype}")
    _require(
        A_cat.dtype == B_cat.dtype == x.dtype == y.dtype,
        f"ssa_lora: dtypes differ x {x.dtype}, A {A_cat.dtype}, B {B_cat.dtype}, y {y.dtype}",
    )
    _require(alpha.dtype in _DTYPES, f"ssa_lora: alpha dtype {alpha.dtype}")
    _require(
        A_cat.shape == (R, K)
        and y.shape == (M, N)
        and alpha.shape[0] > 0
        and M % alpha.shape[0] == 0,
        f"ssa_lora: shapes x {tuple(x.shape)} A {tuple(A_cat.shape)} B {tuple(B_cat.shape)} "
        f"alpha {tuple(alpha.shape)} y {tuple(y.shape)}",
    )
    _require(S > 0 and R % S == 0, f"ssa_lora: R={R} is not a multiple of S={S}")
    _require(
        x.stride(-1) == 1 and A_cat.is_contiguous() and B_cat.is_contiguous() and y.is_contiguous(),
        "ssa_lora: x rows, A_cat, B_cat and y must be contiguous",
    )
    devs = {t.device for t in (y, x, A_cat, B_cat, alpha)}
    _require(len(devs) == 1, f"ssa_lora: tensors on several devices {sorted(map(str, devs))}")
    path = path or choose_path(M, R)
    _require(path in ("fused", "split"), f"ssa_lora: path {path!r} is not 'fused' or 'split'")
    _require(
        path == "split" or (M <= tuning.DECODE_M and R <= tuning.FUSED_MAX_R),
        f"ssa_lora: the fused path needs M ≤ {tuning.DECODE_M} and S·r ≤ {tuning.FUSED_MAX_R}",
    )
    if M == 0 or N == 0:
        return y
    r, G = R // S, M // alpha.shape[0]
    prec = dot_precision(x.dtype, allow_tf32)
    upcast = interpreting() and x.dtype == torch.bfloat16
    det = torch.are_deterministic_algorithms_enabled()
    consts = dict(PREC=prec, UPCAST=upcast)
    if path == "fused":
        _fused(y, x, A_cat, B_cat, alpha, scaling, r, G, det, configs, consts)
    else:
        _split(y, x, A_cat, B_cat, alpha, scaling, r, G, det, configs, consts)
    return y


def plan(M: int, R: int, is_cuda: bool) -> str:
    """The op's path: "two_gemm" at S·r ≥ 512 on CUDA, else ``choose_path``."""
    return "two_gemm" if is_cuda and R >= tuning.TWO_GEMM_R else choose_path(M, R)


def choose_path(M: int, R: int) -> str:
    """The kernel path: "fused" (one launch) at decode sizes, else "split" (shrink + expand).
    The fused kernel's programs wait on each other (expand waits for the shrink's counter): it has
    run only under the interpreter so far, so on a GPU it is opt-in (``FCIT_KERNELS_FUSED=1``)
    until `make test-gpu` and `fcit bench kernels` have measured it; ``FCIT_KERNELS_FUSED=0``
    switches it off under the interpreter too."""
    flag = os.environ.get("FCIT_KERNELS_FUSED", "")
    if flag == "0" or (flag != "1" and not interpreting()):
        return "split"
    return "fused" if M <= tuning.DECODE_M and R <= tuning.FUSED_MAX_R else "split"


def _fused(y, x, A_cat, B_cat, alpha, scaling, r, G, det, configs, consts) -> None:
    M, K = x.shape
    N, R = B_cat.shape
    rp = tuning.r_bucket(R)
    h, ctr = workspace(x.device, rp)
    args = (x, A_cat, alpha, B_cat, y, h, ctr, M, K, N, R, r, G, float(scaling))
    args += (x.stride(0), x.stride(1), A_cat.stride(0), A_cat.stride(1))
    args += (alpha.stride(0), alpha.stride(1), B_cat.stride(0), B_cat.stride(1))
    args += (y.stride(0), y.stride(1))
    consts = {**consts, "RP": rp}

    def grid(meta):
        return (triton.cdiv(R, meta["BRS"]) * meta["SPLIT_K"] + triton.cdiv(N, meta["BN"]),)

    def run(cfg):
        if det:
            cfg = {**cfg, "SPLIT_K": 1}
        _launch(_fused_decode_kernel, "fused", grid, args, cfg, x.dtype, **consts)

    if isinstance(configs, dict):
        return run(configs)
    if interpreting():
        return run(dict(INTERP_FUSED))

    def tune(cands):
        y0 = y.clone()
        best = min(cands, key=lambda c: _bench(lambda: (y.copy_(y0), run(c))))
        y.copy_(y0)
        return best

    cands = [c for c in FUSED_CANDIDATES if not det or c["SPLIT_K"] == 1] or [
        {**FUSED_CANDIDATES[0], "SPLIT_K": 1}
    ]
    run(tuning.config("fused", x.dtype, M, K, N, R, x.device, det, tune, cands))


def _split(y, x, A_cat, B_cat, alpha, scaling, r, G, det, configs, consts) -> None:
    M, K = x.shape
    N, R = B_cat.shape
    h = torch.zeros((M, R), dtype=torch.float32, device=x.device)  # [M, S·r], one memset
    sargs = (x, A_cat, alpha, h, M, K, R, r, G, float(scaling))
    sargs += (x.stride(0), x.stride(1), A_cat.stride(0), A_cat.stride(1))
    sargs += (alpha.stride(0), alpha.stride(1), h.stride(0), h.stride(1))
    eargs = (h, B_cat, y, M, N, R, h.stride(0), h.stride(1), B_cat.stride(0))
    eargs += (B_cat.stride(1), y.stride(0), y.stride(1))

    def sgrid(meta):
        return (triton.cdiv(M, meta["BM"]), triton.cdiv(R, meta["BR"]), meta["SPLIT_K"])

    def egrid(meta):
        return (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))

    def shrink(cfg):
        if det:
            cfg = {**cfg, "SPLIT_K": 1}
        _launch(_shrink_kernel, "shrink", sgrid, sargs, cfg, x.dtype, **consts)

    def expand(cfg):
        _launch(_expand_add_kernel, "expand", egrid, eargs, cfg, x.dtype, **consts)

    if configs is not None or interpreting():
        sk, ek = (INTERP_SHRINK, INTERP_EXPAND) if configs is None else configs
        shrink(sk)
        expand(ek)
        return
    es, mb = x.element_size(), m_bucket(M)

    def tune_shrink(cands):
        return min(cands, key=lambda c: _bench(lambda: (h.zero_(), shrink(c))))

    def tune_expand(cands):
        y0 = y.clone()
        best = min(cands, key=lambda c: _bench(lambda: (y.copy_(y0), expand(c))))
        y.copy_(y0)
        return best

    scfg = tuning.config(
        "shrink", x.dtype, M, K, N, R, x.device, det, tune_shrink,
        _fit("shrink", SHRINK_CONFIGS, es, mb, det, x.device),
    )  # fmt: skip
    h.zero_() if tuning.tuning_on() else None  # tuning runs added into h
    shrink(scfg)
    ecfg = tuning.config(
        "expand", x.dtype, M, K, N, R, x.device, False, tune_expand,
        _fit("expand", EXPAND_CONFIGS, es, mb, False, x.device),
    )  # fmt: skip
    expand(ecfg)


def ssa_gate_launch(f: torch.Tensor, G: torch.Tensor, epsilon: float, allow_tf32=None):
    """α [M, S] = softmax(cos(f, G) / ε) in fp32; f [M, D], G [S, D] (any float dtype)."""
    M, D = f.shape
    S = G.shape[0]
    _require(f.is_contiguous() and G.is_contiguous(), "ssa_gate: f and G must be contiguous")
    _require(f.device == G.device, f"ssa_gate: f on {f.device}, G on {G.device}")
    out = torch.empty((M, S), dtype=torch.float32, device=f.device)
    if M == 0:
        return out
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
        PREC=dot_precision(torch.float32, allow_tf32),
    )
    return out


# --------------------------------------------------------------------------------- public ops
def ssa_lora_linear_triton(x, weight, bias, A_cat, B_cat, alpha, scaling: float, allow_tf32=None):
    """Vendor GEMM for the base, then the adapter added into its output: one fused launch at
    M ≤ 16 (S·r ≤ 256), shrink + expand otherwise; at S·r ≥ 512 on CUDA the two-GEMM torch path
    (cuBLAS), which the issue's H200 table shows at or ahead of the kernels there."""
    if plan(x.shape[0], B_cat.shape[1], x.is_cuda) == "two_gemm":
        from fcit_kernels.ssa_lora import ssa_lora_linear_torch

        return ssa_lora_linear_torch(x, weight, bias, A_cat, B_cat, alpha, scaling)
    y = torch.nn.functional.linear(x, weight, bias)  # [M, out], contiguous
    return ssa_lora_add_(y, x, A_cat, B_cat, alpha, scaling, allow_tf32)


def ssa_gate_triton(f, G, epsilon: float, allow_tf32=None):
    return ssa_gate_launch(f, G, epsilon, allow_tf32)
