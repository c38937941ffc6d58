"""Public SSA-LoRA ops with dispatch: Triton kernels on CUDA (or under TRITON_INTERPRET=1),
the concatenated plain-torch form on CPU."""

from __future__ import annotations

import os

import torch


def _check(x, weight, bias, A_cat, B_cat, alpha):
    if x.dim() != 2 or weight.dim() != 2 or A_cat.dim() != 2 or B_cat.dim() != 2:
        raise ValueError("ssa_lora_linear: x, weight, A_cat, B_cat must be 2-D")
    if alpha.dim() != 2:
        raise ValueError("ssa_lora_linear: alpha must be 2-D [M, S]")
    M, K = x.shape
    N = weight.shape[0]
    S = alpha.shape[1]
    if S == 0:
        raise ValueError("ssa_lora_linear: S = 0 subspaces")
    if weight.shape[1] != K or A_cat.shape[1] != K:
        raise ValueError(
            f"ssa_lora_linear: in-features mismatch x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}, A_cat {tuple(A_cat.shape)}"
        )
    R = A_cat.shape[0]
    if R % S or B_cat.shape != (N, R):
        raise ValueError(
            f"ssa_lora_linear: rank mismatch A_cat {tuple(A_cat.shape)}, "
            f"B_cat {tuple(B_cat.shape)}, S={S}"
        )
    if alpha.shape[0] != M:
        raise ValueError(f"ssa_lora_linear: alpha rows {alpha.shape[0]} != x rows {M}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"ssa_lora_linear: bias shape {tuple(bias.shape)} != ({N},)")
    dts = {t.dtype for t in (x, weight, A_cat, B_cat) if t is not None}
    if bias is not None:
        dts.add(bias.dtype)
    if len(dts) != 1:
        raise ValueError(f"ssa_lora_linear: mixed dtypes {sorted(map(str, dts))}")
    if not torch.isfinite(alpha).all():
        raise ValueError("ssa_lora_linear: alpha has NaN/Inf")


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def ssa_lora_linear(x, weight, bias, A_cat, B_cat, alpha, scaling: float, backend: str = "auto"):
    """``y = x W0ᵀ (+ b) + scaling · ((x A_catᵀ) ⊙ expand_r(α)) B_catᵀ``.

    x [M, in], weight [out, in], bias [out] | None, A_cat [S·r, in], B_cat [out, S·r],
    alpha [M, S] (per-row subspace activation). Returns [M, out] in x's dtype.
    """
    _check(x, weight, bias, A_cat, B_cat, alpha)
    if backend == "triton" or (backend == "auto" and _use_triton(x)):
        from fcit_kernels import triton_ssa_lora

        return triton_ssa_lora.ssa_lora_linear_triton(x, weight, bias, A_cat, B_cat, alpha, scaling)
    return ssa_lora_linear_torch(x, weight, bias, A_cat, B_cat, alpha, scaling)


def ssa_lora_linear_torch(x, weight, bias, A_cat, B_cat, alpha, scaling: float):
    """CPU path: one shrink GEMM over all subspaces, a row-wise gate, one expand GEMM added in place
    into the base GEMM output (addmm with beta=1, so no extra [M, out] temporary)."""
    r = A_cat.shape[0] // alpha.shape[1]
    y = torch.nn.functional.linear(x, weight, bias)  # [M, out]
    h = x @ A_cat.t()  # [M, S·r]
    h = (h.view(h.shape[0], -1, r) * (alpha.to(h.dtype) * scaling).unsqueeze(-1)).view_as(h)
    if torch.is_grad_enabled() and (h.requires_grad or B_cat.requires_grad or y.requires_grad):
        return y + h @ B_cat.t()
    return torch.addmm(y, h, B_cat.t(), out=y)


def ssa_gate(f, G, epsilon: float, mode: str = "softmax"):
    """α [M, S] from features f [M, D] and tokens G [S, D]; softmax(cos(f, G)/ε) by default."""
    if f.dim() != 2 or G.dim() != 2 or f.shape[1] != G.shape[1]:
        raise ValueError(f"ssa_gate: shapes f {tuple(f.shape)} and G {tuple(G.shape)} mismatch")
    if G.shape[0] == 0:
        raise ValueError("ssa_gate: S = 0 tokens")
    if epsilon <= 0:
        raise ValueError(f"ssa_gate: epsilon must be > 0, got {epsilon}")
    if mode == "softmax" and _use_triton(f):
        from fcit_kernels import triton_ssa_lora

        return triton_ssa_lora.ssa_gate_triton(f, G, epsilon)
    from fcit_kernels.reference import ssa_gate_reference

    return ssa_gate_reference(f, G, epsilon, mode)
