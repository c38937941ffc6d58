"""Plain-torch references of the SSA-LoRA linear: the naive per-subspace loop, the fp32 concat and
the float64 ground truth the tests compare against."""

from __future__ import annotations

import torch


def ssa_lora_loop(x, weight, bias, A, B, alpha, scaling):
    """Naive reference: ``x W0ᵀ + b + scaling · Σ_i α_i (x A_iᵀ) B_iᵀ``, one subspace at a time.

    x [M, in], weight [out, in], bias [out] | None, A [S, r, in], B [S, out, r], alpha [M, S].
    """
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    for i in range(A.shape[0]):
        y = y + scaling * alpha[:, i : i + 1] * ((x @ A[i].t()) @ B[i].t())
    return y


def ssa_lora_concat_fp32(x, weight, bias, A_cat, B_cat, alpha, scaling):
    """Concatenated form in fp32: ``x W0ᵀ + scaling · ((x A_catᵀ) ⊙ expand_r(α)) B_catᵀ``."""
    r = A_cat.shape[0] // alpha.shape[1]
    xf = x.float()
    y = xf @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    h = (xf @ A_cat.float().t()) * alpha.float().repeat_interleave(r, dim=1)
    return (y + scaling * (h @ B_cat.float().t())).to(x.dtype)


def ssa_lora_reference64(x, weight, bias, A_cat, B_cat, alpha, scaling):
    """Ground truth in float64 of the concatenated form; α [M/G, S] gates row m by α[m // G]."""
    d = lambda t: None if t is None else t.detach().cpu().double()
    x, weight, bias, A_cat, B_cat, alpha = map(d, (x, weight, bias, A_cat, B_cat, alpha))
    M, (B, S) = x.shape[0], alpha.shape
    r = A_cat.shape[0] // S
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    gate = alpha.repeat_interleave(M // B, dim=0).repeat_interleave(r, dim=1)  # [M, S·r]
    return y + scaling * ((x @ A_cat.t()) * gate) @ B_cat.t()


def ssa_gate_reference(f, G, epsilon, mode="softmax", dtype=torch.float32):
    """α from features f [M, D] and global tokens G [S, D]: softmax(cos / ε) or variants
    (computed in ``dtype``: float32 in production, float64 as the tests' ground truth)."""
    s = (
        torch.nn.functional.normalize(f.to(dtype), dim=-1)
        @ torch.nn.functional.normalize(G.to(dtype), dim=-1).t()
    )
    if mode == "softmax":
        return torch.softmax(s / epsilon, dim=-1)
    if mode == "cosine":
        return s
    if mode == "argmax":
        return torch.nn.functional.one_hot(s.argmax(-1), G.shape[0]).to(dtype)
    if mode == "concat":
        return torch.ones_like(s)
    raise ValueError(f"unknown SSA mode {mode!r}")
