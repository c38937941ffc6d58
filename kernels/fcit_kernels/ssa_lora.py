"""Public SSA-LoRA ops with dispatch: Triton kernels on CUDA (or under TRITON_INTERPRET=1),
the concatenated plain-torch form on CPU.

The argument checks read only shapes, dtypes, devices and strides, never tensor values: a value
check (``torch.isfinite(alpha).all()``) would copy a flag to the host and stall the stream on
every call (and break CUDA-graph capture). α's finiteness is checked where α is made — the
adapter's ``set_activation`` — or here under the debug switch (``check_finite=True`` or
``FCIT_KERNELS_CHECK_FINITE=1``).
"""

from __future__ import annotations

import os

import torch


def _check_finite_on(check_finite: bool | None) -> bool:
    if check_finite is None:
        return os.environ.get("FCIT_KERNELS_CHECK_FINITE") == "1"
    return check_finite


def _check(x, weight, bias, A_cat, B_cat, alpha, check_finite: bool | None = None) -> None:
    """Shapes, dtypes and devices (metadata only; α's values only under the debug switch)."""
    if x.dim() != 2 or weight.dim() != 2 or A_cat.dim() != 2 or B_cat.dim() != 2:
        raise ValueError("ssa_lora_linear: x, weight, A_cat, B_cat must be 2-D")
    if alpha.dim() != 2:
        raise ValueError("ssa_lora_linear: alpha must be 2-D [M, S] or [M/G, S]")
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
    if alpha.shape[0] == 0 or M % alpha.shape[0]:
        raise ValueError(
            f"ssa_lora_linear: alpha rows {alpha.shape[0]} do not divide x rows {M} "
            "(row m is gated by alpha[m // (M / alpha rows)])"
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"ssa_lora_linear: bias shape {tuple(bias.shape)} != ({N},)")
    ts = [t for t in (x, weight, bias, A_cat, B_cat) if t is not None]
    dts = {t.dtype for t in ts}
    if len(dts) != 1:
        raise ValueError(f"ssa_lora_linear: mixed dtypes {sorted(map(str, dts))}")
    if not alpha.is_floating_point():
        raise ValueError(f"ssa_lora_linear: alpha dtype {alpha.dtype} is not floating point")
    devs = {t.device for t in (*ts, alpha)}
    if len(devs) != 1:
        raise ValueError(f"ssa_lora_linear: tensors on several devices {sorted(map(str, devs))}")
    if _check_finite_on(check_finite) and not torch.isfinite(alpha).all():  # syncs: debug only
        raise ValueError("ssa_lora_linear: alpha has NaN/Inf")


_RECORDED: set[tuple] = set()


def _record(x, B_cat, alpha) -> None:
    """``FCIT_KERNELS_RECORD=FILE``: append each distinct call shape (one JSON line per process and
    shape: M, K, N, R, S, dtype) to FILE, to count the tuning keys a run produces."""
    path = os.environ.get("FCIT_KERNELS_RECORD")
    if not path:
        return
    key = (x.shape[0], x.shape[1], B_cat.shape[0], B_cat.shape[1], alpha.shape[1], str(x.dtype))
    if key in _RECORDED:
        return
    _RECORDED.add(key)
    import json

    with open(path, "a") as f:
        f.write(json.dumps(dict(zip(("M", "K", "N", "R", "S", "dtype"), key, strict=True))) + "\n")


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def ssa_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_cat: torch.Tensor,
    B_cat: torch.Tensor,
    alpha: torch.Tensor,
    scaling: float,
    backend: str = "auto",
    allow_tf32: bool | None = None,
    check_finite: bool | None = None,
) -> torch.Tensor:
    """``y = x W0ᵀ (+ b) + scaling · ((x A_catᵀ) ⊙ expand_r(α)) B_catᵀ``.

    x [M, in], weight [out, in], bias [out] | None, A_cat [S·r, in], B_cat [out, S·r],
    alpha [M/G, S]: row m is gated by α[m // G] (G = 1: per row; α [B, S] with x [B·T, in]: per
    sequence). Returns [M, out] in x's dtype. ``allow_tf32`` (fp32 only): None follows
    ``torch.backends.cuda.matmul.allow_tf32``. ``backend``: "auto" (Triton on CUDA or under
    TRITON_INTERPRET=1, else torch), "triton" or "torch".

    Without gradients this is one ``torch.ops.fcit.ssa_lora_linear`` call (a ``torch.library``
    custom op with a fake implementation: ``torch.compile(fullgraph=True)`` keeps it as one node,
    CUDA graphs capture it). The op has no autograd formula: when a gradient is needed (an input
    requires grad and grad mode is on) the differentiable torch composition runs instead. No host
    sync on CUDA; configs come from the per-GPU table, the tuning cache or a heuristic
    (fcit_kernels.tuning), never from timing unless FCIT_KERNELS_TUNE=1.
    """
    _check(x, weight, bias, A_cat, B_cat, alpha, check_finite)
    _record(x, B_cat, alpha)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"ssa_lora_linear: backend {backend!r} is not auto, triton or torch")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, A_cat, B_cat, alpha)
    ):
        return ssa_lora_linear_torch(x, weight, bias, A_cat, B_cat, alpha, scaling)
    tf32 = -1 if allow_tf32 is None else int(allow_tf32)
    return torch.ops.fcit.ssa_lora_linear(
        x, weight, bias, A_cat, B_cat, alpha, float(scaling), backend, tf32
    )


_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor A_cat, Tensor B_cat, Tensor alpha, "
    "float scaling, str backend, int allow_tf32) -> Tensor"
)  # explicit: no annotation parsing, the same on torch 2.11 and 2.14


@torch.library.custom_op("fcit::ssa_lora_linear", mutates_args=(), schema=_SCHEMA)
def _ssa_lora_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_cat: torch.Tensor,
    B_cat: torch.Tensor,
    alpha: torch.Tensor,
    scaling: float,
    backend: str,
    allow_tf32: int,
) -> torch.Tensor:
    """The op behind ``ssa_lora_linear`` (arguments checked there). allow_tf32: -1 follows
    torch's switch, 0 off, 1 on. Dispatch: Triton (fused one-launch kernel at M ≤ 16 and
    S·r ≤ 256, shrink + expand otherwise), except S·r ≥ 512 on CUDA, where the two cuBLAS GEMMs
    of the torch path are at least as fast (measured in issue 25); torch on the CPU."""
    if backend == "triton" or (backend == "auto" and _use_triton(x)):
        from fcit_kernels import triton_ssa_lora

        tf32 = None if allow_tf32 < 0 else bool(allow_tf32)
        return triton_ssa_lora.ssa_lora_linear_triton(
            x, weight, bias, A_cat, B_cat, alpha, scaling, tf32
        )
    return ssa_lora_linear_torch(x, weight, bias, A_cat, B_cat, alpha, scaling)


@_ssa_lora_op.register_fake
def _(x, weight, bias, A_cat, B_cat, alpha, scaling, backend, allow_tf32):
    return x.new_empty((x.shape[0], weight.shape[0]))


def tuning_seconds() -> float:
    """Seconds this process spent tuning and compiling SSA kernels (for the phase timers)."""
    from fcit_kernels import tuning

    return tuning.tuning_seconds()


def ssa_lora_linear_torch(x, weight, bias, A_cat, B_cat, alpha, scaling: float):
    """CPU path: one shrink GEMM over all subspaces, a row-wise gate, one expand GEMM added in place
    into the base GEMM output (addmm with beta=1, so no extra [M, out] temporary)."""
    S = alpha.shape[1]
    r = A_cat.shape[0] // S
    y = torch.nn.functional.linear(x, weight, bias)  # [M, out]
    h = x @ A_cat.t()  # [M, S·r]
    g = (alpha.to(h.dtype) * scaling).view(alpha.shape[0], 1, S, 1)  # [M/G, 1, S, 1]
    h = (h.view(alpha.shape[0], -1, S, r) * g).view_as(h)
    if torch.is_grad_enabled() and (h.requires_grad or B_cat.requires_grad or y.requires_grad):
        return y + h @ B_cat.t()
    return torch.addmm(y, h, B_cat.t(), out=y)


def ssa_gate(
    f: torch.Tensor,
    G: torch.Tensor,
    epsilon: float,
    mode: str = "softmax",
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """α [M, S] from features f [M, D] and tokens G [S, D]; softmax(cos(f, G)/ε) by default.

    fp32 exact unless ``allow_tf32`` (None follows torch.backends.cuda.matmul.allow_tf32)."""
    if f.dim() != 2 or G.dim() != 2 or f.shape[1] != G.shape[1]:
        raise ValueError(f"ssa_gate: shapes f {tuple(f.shape)} and G {tuple(G.shape)} mismatch")
    if G.shape[0] == 0:
        raise ValueError("ssa_gate: S = 0 tokens")
    if epsilon <= 0:
        raise ValueError(f"ssa_gate: epsilon must be > 0, got {epsilon}")
    if mode == "softmax" and _use_triton(f):
        from fcit_kernels import triton_ssa_lora

        return triton_ssa_lora.ssa_gate_triton(f, G, epsilon, allow_tf32)
    from fcit_kernels.reference import ssa_gate_reference

    return ssa_gate_reference(f, G, epsilon, mode)
