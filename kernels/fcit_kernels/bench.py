"""Kernel microbenchmark: ``fcit bench kernels [--quick] [--json FILE] [--skip-e2e]
[--skip-compile]``.

CPU (the torch path): times side by side in one run and on the same inputs the base GEMM alone
(the floor), the fused SSA-LoRA path, the naive per-subspace loop and PEFT's mixed-adapter forward
(real PEFT LoRA layers with ``adapter_names``; one-hot α, i.e. argmax routing); prints ratios to
the base GEMM and where each point sits on this machine's measured roofline.

CUDA (the Triton path), bf16/fp16/fp32, timed in the manner of vLLM's LoRA benchmark (rotating
argument copies, CUDA-graph replay): each competitor runs n calls over rotating copies of all
operands (together over twice the L2, so no copy is cache-resident), captured in one CUDA graph
and replayed; time per call = replay time / n (a competitor that cannot be captured falls back to
``triton.testing.do_bench`` over the same rotation, marked ``*``). Competitors: the base GEMM,
``ssa_lora_linear``, torch's two-GEMM form (ssa_lora_linear_torch), the per-subspace loop, PEFT's
mixed-adapter forward (one adapter per row: with one-hot α it does less work than SSA's S
subspaces), and ``torch.compile`` (max-autotune, without its own CUDA graphs so it sits in ours)
of the same math. Then per-token decode latency of a LLaVA-1.5-7B-shaped language model (random
bf16 weights), base vs 8 SSA subspaces on gate/up/down.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time

import torch

from fcit_kernels import tuning
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
    """Median seconds per function (CPU); functions alternate within each repetition and inputs
    rotate, so drift of the machine hits all of them alike."""
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


def main_cpu(args) -> int:
    """CPU: the torch path (ratios to the base GEMM, interleaved timing)."""
    dev = torch.device("cpu")
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


# ---------------------------------------------------------------------------------------- CUDA
_BF16, _FP16, _FP32 = torch.bfloat16, torch.float16, torch.float32
# --quick on CUDA: the issue's points (bf16, H = 4096, S = 8, r = 8, M = 1 … 4096), the LLaMA-7B
# FFN shapes, fp16/fp32 at decode and prefill, and S·r = 1024 (S = 16, r = 64) in bf16 and fp32
# --points issue: the table of issue 25 (bf16 4096², S = 8, r = 8 at M 1 … 4096; S·r = 1024)
CUDA_ISSUE = [(_BF16, 4096, 4096, 8, 8, m) for m in (1, 16, 512, 4096)] + [
    (_BF16, 4096, 4096, 16, 64, m) for m in (1, 16)
]
CUDA_QUICK = (
    [(_BF16, 4096, 4096, 8, 8, m) for m in (1, 16, 512, 4096)]
    + [(_BF16, 4096, 11008, 8, 8, m) for m in (1, 16)]
    + [(_BF16, 11008, 4096, 8, 8, 1)]
    + [(dt, 4096, 4096, 8, 8, m) for dt in (_FP16, _FP32) for m in (1, 16, 512)]
    + [(dt, 4096, 4096, 16, 64, m) for dt in (_BF16, _FP32) for m in (1, 16)]
)


def cuda_roofline(dev) -> dict:
    """Measured copy bandwidth (GB/s, bytes read + written) and GEMM peaks per dtype (GFLOP/s,
    random data; fp32 under torch's current TF32 switch), plus L2 size and SM count."""
    from triton.testing import do_bench

    n = 256 * 1024 * 1024
    dst, src = torch.empty(n, device=dev), torch.randn(n, device=dev)
    bw = 2 * n * 4 / (do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3) / 1e9
    peaks = {}
    for dt, size in ((_BF16, 8192), (_FP16, 8192), (_FP32, 4096)):
        x, y = (torch.randn(size, size, device=dev, dtype=dt) for _ in range(2))
        t = do_bench(lambda x=x, y=y: x @ y, return_mode="median") / 1e3
        peaks[str(dt)] = 2 * size**3 / t / 1e9
    props = torch.cuda.get_device_properties(dev)
    return {
        "device": props.name,
        "bandwidth_gbs": bw,
        "gemm_gflops": peaks,
        "l2_bytes": int(getattr(props, "L2_cache_size", 50 << 20)),
        "sms": props.multi_processor_count,
    }


def _two_gemm(x, W, A_cat, B_cat, alpha, scaling):
    """The same math in plain torch ops (the torch.compile competitor)."""
    S = alpha.shape[1]
    h = (x @ A_cat.t()).view(x.shape[0], S, -1) * (alpha.to(x.dtype) * scaling).unsqueeze(-1)
    return torch.nn.functional.linear(x, W) + h.view(x.shape[0], -1) @ B_cat.t()


def _rebuild(x, W, A, B, alpha, scaling):
    """The FCIT reference code's per-call form: every forward concatenates the subspaces' A's and
    B's into new ``nn.Linear`` modules (constructed, so initialised, then overwritten) and
    rewrites the [M, S·r] gate. A [S, r, H], B [S, out, r]."""
    S, r, H = A.shape
    kw = dict(bias=False, device=x.device, dtype=x.dtype)
    down = torch.nn.Linear(H, S * r, **kw)
    down.weight.data = torch.cat(list(A), 0)
    up = torch.nn.Linear(S * r, W.shape[0], **kw)
    up.weight.data = torch.cat(list(B), 1)
    gate = alpha.to(x.dtype).repeat_interleave(r, dim=1) * scaling
    return torch.nn.functional.linear(x, W) + up(down(x) * gate)


def _time_cuda(call, n: int, dev, reps: int = 30) -> tuple[float, bool]:
    """Seconds per call of ``call(i)``, i = 0 … n-1 over rotating operand copies: n calls captured
    in one CUDA graph and replayed (median over replays); do_bench over the rotation if the calls
    cannot be captured. Returns (seconds, captured)."""
    for i in range(n):  # warm-up: autotuning, compilation, caches
        call(i)
    torch.cuda.synchronize(dev)
    try:
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for i in range(n):
                call(i)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                call(i)
        graph.replay()
        torch.cuda.synchronize(dev)
    except Exception:  # not capturable (e.g. host-side indexing): time it eagerly
        from triton.testing import do_bench

        torch.cuda.synchronize(dev)
        it = iter(range(1 << 40))
        ms = do_bench(lambda: call(next(it) % n), return_mode="median")
        return ms / 1e3, False
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / n)
    del graph
    return statistics.median(times), True


def bench_point_cuda(dtype, H, N, S, r, M, dev, roof: dict, compile_: bool = True) -> dict:
    """One shape on CUDA: every competitor over rotating copies (together > 2× L2)."""
    from fcit_kernels.ssa_lora import ssa_lora_linear_torch

    scaling = 2.0
    es = torch.tensor([], dtype=dtype).element_size()
    per_copy = es * (N * H + S * r * (H + N) + M * H + M * N)
    copies = max(2, min(16, -(-2 * roof["l2_bytes"] // per_copy)))
    n = copies * max(1, min(24 // copies, (1 << 30) // (copies * M * N * es)))  # outputs ≤ 1 GB
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=dev, generator=g).to(dtype)
    sets = []
    for _ in range(copies):
        A, B = rnd(S, r, H) * 0.01, rnd(S, N, r) * 0.01
        idx = torch.randint(0, S, (M,), device="cpu")
        sets.append(
            dict(
                x=rnd(M, H),
                W=rnd(N, H) / H**0.5,
                A=A,
                B=B,
                A_cat=A.reshape(S * r, H).contiguous(),
                B_cat=B.permute(1, 0, 2).reshape(N, S * r).contiguous(),
                alpha=torch.softmax(torch.randn(M, S, device=dev, generator=g), -1),
                names=[f"s{int(i)}" for i in idx],
            )
        )
    fl = torch.nn.functional.linear

    def loop(c):
        y = fl(c["x"], c["W"])
        for i in range(S):
            y += (
                scaling
                * c["alpha"][:, i : i + 1].to(dtype)
                * ((c["x"] @ c["A"][i].t()) @ c["B"][i].t())
            )
        return y

    fns = {
        "base": lambda c: fl(c["x"], c["W"]),
        "fused": lambda c: ssa_lora_linear(
            c["x"], c["W"], None, c["A_cat"], c["B_cat"], c["alpha"], scaling
        ),
        "two_gemm": lambda c: ssa_lora_linear_torch(
            c["x"], c["W"], None, c["A_cat"], c["B_cat"], c["alpha"], scaling
        ),
        "loop": loop,
        "rebuild": lambda c: _rebuild(c["x"], c["W"], c["A"], c["B"], c["alpha"], scaling),
    }
    try:
        for c in sets:
            c["peft"] = _peft_layer(c["W"], c["A"], c["B"], scaling)
        fns["peft_mixed"] = lambda c: c["peft"](c["x"], adapter_names=c["names"])
    except ImportError:
        pass
    if compile_:
        torch._dynamo.reset()
        compiled = torch.compile(_two_gemm, mode="max-autotune-no-cudagraphs", dynamic=False)
        fns["compile"] = lambda c: compiled(
            c["x"], c["W"], c["A_cat"], c["B_cat"], c["alpha"], scaling
        )
    secs, captured = {}, {}
    for k, f in fns.items():
        secs[k], captured[k] = _time_cuda(lambda i, f=f: f(sets[i % copies]), n, dev)
    flops = 2 * M * H * N + 2 * M * S * r * (H + N)
    floor = max(
        per_copy / (roof["bandwidth_gbs"] * 1e9), flops / (roof["gemm_gflops"][str(dtype)] * 1e9)
    )
    row = {
        "dtype": str(dtype).replace("torch.", ""),
        "H": H,
        "out": N,
        "S": S,
        "r": r,
        "M": M,
        "us": {k: v * 1e6 for k, v in secs.items()},
        "graph": captured,
        "floor_us": floor * 1e6,
        "fused/floor": secs["fused"] / floor,
        "copies": copies,
    }
    for k in secs:
        if k != "base":
            row[f"{k}/base"] = secs[k] / secs["base"]
    return row


def llava7b_text_config():
    """The LLaVA-1.5-7B language model's config: configs/hf/llava-1.5-7b/config.json if present,
    else a LlamaConfig of its shape (hidden 4096, FFN 11008, 32 layers, 32 heads, vocab 32064)."""
    from transformers import AutoConfig, LlamaConfig

    from fcit_hpc.resources import config_file

    try:  # the checkout's configs/, or the copy an installed wheel ships
        path = config_file("hf/llava-1.5-7b/config.json")
    except FileNotFoundError:
        path = None
    if path is not None:
        cfg = AutoConfig.from_pretrained(str(path.parent))
        return getattr(cfg, "text_config", cfg), str(path)
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    return cfg, "LlamaConfig(hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32064)"


def _decode_eager(model, ids, steps: int, dev) -> float:
    """ms per generated token: prefill, 3 warm-up steps, then ``steps`` timed (greedy, KV cache)."""
    out = model(input_ids=ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for t in range(3 + steps):
        if t == 3:
            t0 = _now(dev)
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    return (_now(dev) - t0) / steps * 1e3


def _decode_graph(model, ids, steps: int, dev) -> float:
    """ms per token with one decode step captured in a CUDA graph over a StaticCache."""
    from transformers import StaticCache

    P = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=P + steps + 8)
    pos = torch.arange(P, device=dev)
    out = model(input_ids=ids, past_key_values=cache, cache_position=pos, position_ids=pos[None])
    tok = out.logits[:, -1:].argmax(-1)
    cpos = torch.full((1,), P, device=dev, dtype=torch.long)

    def step():
        kw = dict(past_key_values=cache, cache_position=cpos, position_ids=cpos[None])
        return model(input_ids=tok, use_cache=True, **kw).logits

    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()
    t0 = _now(dev)
    for _ in range(steps):
        graph.replay()
        tok.copy_(logits[:, -1:].argmax(-1))
        cpos.add_(1)
    return (_now(dev) - t0) / steps * 1e3


def decode_latency(
    cfg, dev, dtype=torch.bfloat16, S: int = 8, r: int = 8, prompt: int = 128, steps: int = 64
) -> dict:
    """Per-token decode latency (batch 1, greedy) of a random-init Llama of ``cfg``: the base model
    vs S subspaces under SSA on gate/up/down (softmax α), eager and (CUDA) graph-captured."""
    from transformers import LlamaForCausalLM

    from fcit_hpc.model.lora import SubspaceAdapter, inject_subspace_lora

    torch.manual_seed(0)
    cfg._attn_implementation = "sdpa"
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(before)
    adapter = SubspaceAdapter(
        inject_subspace_lora(
            model, ["gate_proj", "up_proj", "down_proj"], r, 2.0 * r, dropout=0.0, s_max=S
        )
    )
    with torch.no_grad():
        for m in adapter.layers:
            for i in range(S):
                m.lora_A[i].normal_(0, 0.01)
                m.lora_B[i].normal_(0, 0.01)
    alpha = torch.softmax(torch.randn(1, S), -1)
    ids = torch.randint(3, cfg.vocab_size, (1, prompt), device=dev)
    res: dict = {"layers": cfg.num_hidden_layers, "S": S, "r": r, "prompt": prompt}
    with torch.no_grad():
        for _ in range(2):  # base and SSA alternate: drift hits both alike; best of two
            for mode in ("base", "ssa"):
                if mode == "base":
                    adapter.train_subspace(None)
                else:
                    adapter.set_activation(alpha)
                ms = _decode_eager(model, ids, steps, dev)
                res[f"{mode}_eager_ms"] = min(ms, res.get(f"{mode}_eager_ms", ms))
                if dev.type == "cuda" and "graph_error" not in res:
                    try:
                        ms = _decode_graph(model, ids, steps, dev)
                        res[f"{mode}_graph_ms"] = min(ms, res.get(f"{mode}_graph_ms", ms))
                    except Exception as e:  # reported, eager numbers still stand
                        res["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    adapter.set_activation(None)
    for kind in ("eager", "graph"):
        if f"ssa_{kind}_ms" in res and f"base_{kind}_ms" in res:
            res[f"ssa/base_{kind}"] = res[f"ssa_{kind}_ms"] / res[f"base_{kind}_ms"]
    return res


def main_cuda(args) -> int:
    """CUDA: the Triton path against its competitors, then end-to-end decode."""
    dev = torch.device("cuda")
    roof = cuda_roofline(dev)
    peaks = ", ".join(
        f"{k.replace('torch.', '')} {v / 1e3:.0f}" for k, v in roof["gemm_gflops"].items()
    )
    print(
        f"device {roof['device']} ({roof['sms']} SMs, L2 {roof['l2_bytes'] >> 20} MB): measured "
        f"bandwidth {roof['bandwidth_gbs']:.0f} GB/s, GEMM peak TFLOP/s {peaks}; TF32 "
        f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    )
    if getattr(args, "points", None) == "issue":
        points = list(CUDA_ISSUE)
    elif args.quick:
        points = list(CUDA_QUICK)
    else:
        g = FULL_GRID
        points = list(
            itertools.product((_BF16, _FP16, _FP32), g["H"], g["out"], g["S"], g["r"], g["M"])
        )
    comp = ("two_gemm", "compile", "rebuild", "loop", "peft_mixed")
    hdr = (
        f"{'dtype':>8} {'H':>5} {'out':>6} {'S':>3} {'r':>3} {'M':>5} | {'base µs':>8} "
        f"{'fused µs':>9} {'fused/base':>10} | "
        + " ".join(f"{c + '/base':>15}" for c in comp)
        + f" | {'floor µs':>8} {'fused/floor':>11}"
    )
    if getattr(args, "tune", False):
        tune_points(points if not args.quick else [p for p in points if p[0] == _BF16], dev)
        if getattr(args, "write_table", None):
            n = tuning.write_table(dev, args.write_table)
            print(f"kernel config table: {n} entries -> {args.write_table}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    with torch.no_grad():
        for dtype, H, N, S, r, M in points:
            # max-autotune compiles for ~a minute per shape: with --quick only the issue's points
            issue_point = (dtype, H, N, S, r) == (_BF16, 4096, 4096, 8, 8)
            compile_ = not getattr(args, "skip_compile", False) and (issue_point or not args.quick)
            row = bench_point_cuda(dtype, H, N, S, r, M, dev, roof, compile_=compile_)
            rows.append(row)
            cells = []
            for c in comp:
                v = row.get(f"{c}/base")
                mark = "" if row["graph"].get(c, True) else "*"
                cells.append(f"{'-' if v is None else f'{v:.3f}{mark}':>15}")
            print(
                f"{row['dtype']:>8} {H:5d} {N:6d} {S:3d} {r:3d} {M:5d} | {row['us']['base']:8.1f} "
                f"{row['us']['fused']:9.1f} {row['fused/base']:10.3f} | {' '.join(cells)} | "
                f"{row['floor_us']:8.1f} {row['fused/floor']:11.2f}",
                flush=True,
            )
    print("* not capturable in a CUDA graph: timed eagerly with do_bench (launch gaps included)")
    st = tuning.stats()
    print(
        f"kernel configs: {st['keys']} keys ("
        + ", ".join(f"{v} {k}" for k, v in _count(st["sources"]).items())
        + f"), {st['compiles']} compiled variants, tuning {st['tune_s']:.1f} s, "
        f"first launches (compilation) {st['compile_s']:.1f} s",
        flush=True,
    )
    decode = None
    if not getattr(args, "skip_e2e", False):
        cfg, source = llava7b_text_config()
        print(f"decode, batch 1, bf16, {source}, SSA S=8 r=8 on gate/up/down:", flush=True)
        decode = decode_latency(cfg, dev)
        for kind in ("eager", "graph"):
            if f"ssa/base_{kind}" in decode:
                base, ssa = decode[f"base_{kind}_ms"], decode[f"ssa_{kind}_ms"]
                print(
                    f"  {kind:5}: base {base:.2f} ms/token, SSA {ssa:.2f} ms/token, "
                    f"SSA/base {ssa / base:.3f}"
                )
        if "graph_error" in decode:
            print(f"  graph capture failed: {decode['graph_error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"roofline": roof, "points": rows, "decode": decode}, f, indent=1)
    _plot(rows, args.json)
    return 0


def _count(sources: dict) -> dict:
    out: dict = {}
    for v in sources.values():
        out[v] = out.get(v, 0) + 1
    return out


# the 7B model's FFN linears (gate/up: 4096 -> 11008, down: 11008 -> 4096) at decode and prefill
TUNE_MODEL = [(_BF16, 4096, 11008, 8, 8, m) for m in (1, 128)] + [
    (_BF16, 11008, 4096, 8, 8, m) for m in (1, 128)
]


def tune_points(points, dev) -> None:
    """Tune (FCIT_KERNELS_TUNE=1) every kernel key of ``points`` and of the 7B model's FFN shapes
    not yet in the table or cache: one op call per shape; results go to the $FCIT_CACHE cache."""
    import os

    os.environ["FCIT_KERNELS_TUNE"] = "1"
    t0 = time.perf_counter()
    seen = set()
    with torch.no_grad():
        for dtype, H, N, S, r, M in list(points) + TUNE_MODEL:
            if (dtype, H, N, S * r, M) in seen:
                continue
            seen.add((dtype, H, N, S * r, M))
            x, W, A_cat, B_cat = (
                torch.randn(*shape, device=dev).to(dtype)
                for shape in ((M, H), (N, H), (S * r, H), (N, S * r))
            )
            alpha = torch.softmax(torch.randn(M, S, device=dev), -1)
            ssa_lora_linear(x, W, None, A_cat, B_cat, alpha, 2.0)
    torch.cuda.synchronize(dev)
    os.environ.pop("FCIT_KERNELS_TUNE")
    st = tuning.stats()
    print(
        f"tuning: {st['tuned']} keys tuned in {st['tune_s']:.1f} s "
        f"({time.perf_counter() - t0:.1f} s with compilation) -> "
        f"{tuning.cache_path(tuning.device_name(dev))}",
        flush=True,
    )


def main(args) -> int:
    if torch.cuda.is_available():
        return main_cuda(args)
    if getattr(args, "tune", False) or getattr(args, "write_table", None):
        import sys

        print("fcit bench kernels: --tune/--write-table need a CUDA device", file=sys.stderr)
        return 2
    return main_cpu(args)


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
        groups.setdefault((r.get("dtype", ""), r["H"], r["out"], r["S"], r["r"]), []).append(r)
    for (dt, H, N, S, rr), pts in groups.items():
        if len(pts) < 2:
            continue
        pts.sort(key=lambda p: p["M"])
        ms = [p["M"] for p in pts]
        tag = f"{dt} H{H} out{N} S{S} r{rr}".strip()
        ax.plot(ms, [p["fused/base"] for p in pts], "o-", label=f"fused {tag}")
        ax.plot(ms, [p["loop/base"] for p in pts], "x--", label=f"loop {tag}")
    ax.set_xscale("log")
    ax.set_xlabel("M (rows)")
    ax.set_ylabel("time / base GEMM")
    ax.axhline(1.15, color="grey", lw=0.5)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")
