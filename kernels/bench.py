"""Kernel microbenchmark: ``fcit bench kernels [--quick] [--json FILE]``.

Times, side by side in one run and on the same inputs: the base GEMM alone (the floor), the fused
SSA-LoRA path, the naive per-subspace loop, and PEFT's mixed-adapter forward (real PEFT LoRA layers
with ``adapter_names``; applies to one-hot α, i.e. argmax routing). Prints ratios to the base GEMM,
GB/s, GFLOP/s and where each point sits on this machine's roofline (bandwidth and GEMM peak are
measured in the same run). On CUDA the Triton kernel is timed with ``triton.testing.do_bench``.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time

import torch

from fcit_kernels.ssa_lora import ssa_lora_linear

FULL_GRID = dict(
    H=(1024, 4096), out=(4096, 11008), S=(1, 2, 4, 8, 16), r=(8, 16), M=(1, 4, 16, 512)
)
# --quick: the acceptance point (H = out = 4096, S = 8, r = 8) at every M, plus the LLaMA-7B FFN
QUICK_POINTS = (
    [(4096, 4096, 8, 8, m) for m in (1, 4, 16, 512)]
    + [(4096, 11008, 8, 8, m) for m in (1, 16)]
    + [(1024, 4096, s, 8, 16) for s in (1, 4, 16)]
)


def _now(dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def machine_roofline(dev, seconds: float = 0.6) -> dict:
    """Measured memory bandwidth (GB/s, copy of 256 MB) and GEMM peak (GFLOP/s, fp32 2048³)."""
    n = 32 * 1024 * 1024
    a = torch.empty(n, device=dev)
    b = torch.randn(n, device=dev)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = _now(dev)
        a.copy_(b)
        times.append(_now(dev) - t0)
    bw = 2 * n * 4 / min(times) / 1e9
    x = torch.randn(2048, 2048, device=dev)
    y = torch.randn(2048, 2048, device=dev)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = _now(dev)
        x @ y
        times.append(_now(dev) - t0)
    return {"bandwidth_gbs": bw, "gemm_gflops": 2 * 2048**3 / min(times) / 1e9}


def _peft_layer(W, A, B, scaling):
    """Real PEFT LoRA Linear with S adapters holding A_i, B_i."""
    from peft import LoraConfig, get_peft_model

    S, r, H = A.shape
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(H, W.shape[0], bias=False))
    base.lin.weight.data = W
    cfg = LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["lin"], lora_dropout=0.0)
    model = get_peft_model(base, cfg, adapter_name="s0")
    for i in range(1, S):
        model.add_adapter(f"s{i}", cfg)
    layer = model.base_model.model.lin
    for i in range(S):
        layer.lora_A[f"s{i}"].weight.data = A[i]
        layer.lora_B[f"s{i}"].weight.data = B[i]
    return model.eval()


def _inputs(H, N, S, r, M, dev, copies):
    g = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(N, H, generator=g) / H**0.5).to(dev)
    A = (torch.randn(S, r, H, generator=g) * 0.01).to(dev)
    B = (torch.randn(S, N, r, generator=g) * 0.01).to(dev)
    xs = [torch.randn(M, H, generator=g).to(dev) for _ in range(copies)]
    idx = torch.randint(0, S, (M,), generator=g)
    alpha = torch.nn.functional.one_hot(idx, S).float().to(dev)  # argmax routing (PEFT can)
    return W, A, B, xs, alpha, [f"s{int(i)}" for i in idx]


def _time_interleaved(fns: dict, xs: list, reps: int, dev) -> dict[str, float]:
    """Median seconds per function; functions alternate within each repetition and inputs rotate,
    so drift of the machine hits all of them alike. On CUDA: triton.testing.do_bench (median)."""
    if dev.type == "cuda":
        from triton.testing import do_bench

        out = {}
        for k, f in fns.items():
            it = iter(range(1 << 30))
            out[k] = (
                do_bench(lambda f=f, it=it: f(xs[next(it) % len(xs)]), return_mode="median") / 1e3
            )
        return out
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():  # warm-up
            f(xs[0])
        for rep in range(reps):
            x = xs[rep % len(xs)]
            for k, f in fns.items():
                t0 = _now(dev)
                f(x)
                times[k].append(_now(dev) - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_point(H, N, S, r, M, dev, reps: int, roof: dict, peft: bool = True) -> dict:
    scaling = 2.0
    W, A, B, xs, alpha, names = _inputs(H, N, S, r, M, dev, copies=4)
    A_cat = A.reshape(S * r, H).contiguous()
    B_cat = B.permute(1, 0, 2).reshape(N, S * r).contiguous()
    y_buf = torch.empty(M, N, device=dev)
    peft_model = _peft_layer(W, A, B, scaling) if peft else None

    def loop_adapter(x, y):
        for i in range(S):
            y += scaling * alpha[:, i : i + 1] * ((x @ A[i].t()) @ B[i].t())
        return y

    def fused_adapter(x, y):
        h = x @ A_cat.t()
        h = (h.view(M, S, r) * (alpha * scaling).unsqueeze(-1)).view(M, S * r)
        return y.addmm_(h, B_cat.t())

    fns = {
        "base": lambda x: torch.nn.functional.linear(x, W),
        "fused": lambda x: ssa_lora_linear(x, W, None, A_cat, B_cat, alpha, scaling),
        "loop": lambda x: loop_adapter(x, torch.nn.functional.linear(x, W)),
    }
    if peft_model is not None:
        fns["peft_mixed"] = lambda x: peft_model(x, adapter_names=names)
    # the adapter part alone (everything but the base GEMM), timed in its own interleaved loop
    adapter_fns = {
        "adapter_fused": lambda x: fused_adapter(x, y_buf),
        "adapter_loop": lambda x: loop_adapter(x, y_buf),
    }
    med = {
        **_time_interleaved(fns, xs, reps, dev),
        **_time_interleaved(adapter_fns, xs, max(reps, 50), dev),
    }
    flops = 2 * M * H * N + 2 * M * S * r * (H + N)
    bytes_ = 4 * (N * H + S * r * (H + N) + M * H + M * N)
    ai = flops / bytes_
    bound = min(roof["gemm_gflops"], ai * roof["bandwidth_gbs"])
    gflops = flops / med["fused"] / 1e9
    return {
        "H": H,
        "out": N,
        "S": S,
        "r": r,
        "M": M,
        "ms": {k: v * 1e3 for k, v in med.items()},
        "fused/base": med["fused"] / med["base"],
        "loop/base": med["loop"] / med["base"],
        "peft/base": med["peft_mixed"] / med["base"] if "peft_mixed" in med else None,
        "adapter loop/fused": med["adapter_loop"] / med["adapter_fused"],
        "GB/s": bytes_ / med["fused"] / 1e9,
        "GFLOP/s": gflops,
        "intensity": ai,
        "bound": "memory" if ai * roof["bandwidth_gbs"] < roof["gemm_gflops"] else "compute",
        "of_roofline": gflops / bound,
    }


def main(args) -> int:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    roof = machine_roofline(dev)
    print(
        f"device {dev} threads {torch.get_num_threads()}  measured bandwidth "
        f"{roof['bandwidth_gbs']:.1f} GB/s, fp32 GEMM peak {roof['gemm_gflops']:.1f} GFLOP/s"
    )
    if args.quick:
        points = QUICK_POINTS
    else:
        g = FULL_GRID
        points = list(itertools.product(g["H"], g["out"], g["S"], g["r"], g["M"]))
    hdr = (
        f"{'H':>5} {'out':>6} {'S':>3} {'r':>3} {'M':>4} | {'base ms':>8} {'fused ms':>9} "
        f"{'fused/base':>10} {'loop/base':>9} {'peft/base':>9} {'adapter loop/fused':>18} | "
        f"{'GB/s':>6} {'GFLOP/s':>8} {'bound':>7} {'%roof':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for H, N, S, r, M in points:
        reps = 7 if M >= 512 else 25
        row = bench_point(H, N, S, r, M, dev, reps, roof)
        rows.append(row)
        peft = f"{row['peft/base']:9.3f}" if row["peft/base"] is not None else f"{'-':>9}"
        print(
            f"{H:5d} {N:6d} {S:3d} {r:3d} {M:4d} | {row['ms']['base']:8.3f} "
            f"{row['ms']['fused']:9.3f} {row['fused/base']:10.3f} {row['loop/base']:9.3f} "
            f"{peft} {row['adapter loop/fused']:18.2f} | {row['GB/s']:6.1f} "
            f"{row['GFLOP/s']:8.1f} {row['bound']:>7} {100 * row['of_roofline']:5.0f}%",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"roofline": roof, "points": rows}, f, indent=1)
    _plot(rows, args.json)
    return 0


def _plot(rows, json_path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    out = (json_path or "kernel_bench.json").rsplit(".", 1)[0] + ".png"
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["H"], r["out"], r["S"], r["r"]), []).append(r)
    for (H, N, S, rr), pts in groups.items():
        if len(pts) < 2:
            continue
        pts.sort(key=lambda p: p["M"])
        ms = [p["M"] for p in pts]
        ax.plot(ms, [p["fused/base"] for p in pts], "o-", label=f"fused H{H} out{N} S{S} r{rr}")
        ax.plot(ms, [p["loop/base"] for p in pts], "x--", label=f"loop H{H} out{N} S{S} r{rr}")
    ax.set_xscale("log")
    ax.set_xlabel("M (rows)")
    ax.set_ylabel("time / base GEMM")
    ax.axhline(1.15, color="grey", lw=0.5)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")
