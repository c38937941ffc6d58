"""Compile the SSA-LoRA kernels for a GPU without one: ``python -m fcit_kernels.aot_check``.

For every stored config (and the gate kernel) and dtype, Triton's compiler for the target
(default sm_90: H100/H200) and its bundled ptxas report the shared memory a block needs, the
registers and spill bytes per thread and the matrix instruction used (wgmma, mma.sync or FMA —
fp32 "ieee" dots are FMA). Exits 1 if a config fails to compile or needs more shared memory
than the target's per-block limit (227 KB on Hopper), the failure the old single kernel hit at
S·r = 512 in fp32 (532480 bytes). Must run without TRITON_INTERPRET=1 (it needs the compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# pointers of the operand dtype (the others are float32 buffers); float scalars
_OPERANDS = {"x_ptr", "a_ptr", "b_ptr", "y_ptr"}
_FLOATS = {"scaling", "inv_eps"}
_ALIGNED = {"sxm", "sar", "sbn", "sym", "shm", "sfm", "sgs", "som"}  # row strides: 16-multiples


def _compile(fn, dtype: torch.dtype, consts: dict, num_warps: int, num_stages: int, cc: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = _PTR[dtype] if name in _OPERANDS else "*fp32"
            if name == "ctr_ptr":  # the fused kernel's counters
                sig[name] = "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in _FLOATS else "i32"
            if name in _ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        attrs=attrs,
    )
    target = GPUTarget("cuda", cc, 32)
    return triton.compile(
        src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages)
    )


def _ptxas_report(ptx: str, cc: int) -> tuple[int, int]:
    """(registers, spill store bytes) per thread from ptxas -v."""
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


def _mma(ptx: str) -> str:
    return "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"


def check(dtypes, cc: int = 90, smem_limit: int | None = None, tf32: bool = False) -> list[dict]:
    """Compile every stored config for each dtype; one row per config."""
    from fcit_kernels import triton_ssa_lora as t

    limit = smem_limit or t.SMEM_LIMIT_H100
    rows = []
    kernels = (
        ("shrink", t._shrink_kernel, t.SHRINK_CONFIGS),
        ("expand", t._expand_add_kernel, t.EXPAND_CONFIGS),
    )
    for dtype in dtypes:
        prec = t.dot_precision(dtype, tf32)
        for kind, fn, table in kernels:
            for cfg in table:
                row = {"kernel": kind, "dtype": str(dtype).replace("torch.", "")}
                row.update(cfg.kwargs, warps=cfg.num_warps, stages=cfg.num_stages)
                consts = dict(cfg.kwargs, PREC=prec, UPCAST=False)
                rows.append(_run(row, fn, dtype, consts, cfg.num_warps, cfg.num_stages, cc, limit))
        for cfg in t.FUSED_CANDIDATES:  # the fused decode kernel at S·r buckets 64 and 256
            for rp in (64, 256):
                meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
                meta["BRS"] = min(meta["BRS"], rp)
                row = {"kernel": "fused", "dtype": str(dtype).replace("torch.", ""), "RP": rp}
                row.update(meta, warps=cfg["num_warps"], stages=cfg["num_stages"])
                consts = dict(meta, RP=rp, PREC=prec, UPCAST=False)
                fn, w, st = t._fused_decode_kernel, cfg["num_warps"], cfg["num_stages"]
                rows.append(_run(row, fn, dtype, consts, w, st, cc, limit))
    consts = dict(BM=16, SP=16, BD=64, PREC=t.dot_precision(torch.float32, tf32))
    row = {"kernel": "gate", "dtype": "float32", "BM": 16, "warps": 4, "stages": 3}
    rows.append(_run(row, t._ssa_gate_kernel, torch.float32, consts, 4, 3, cc, limit))
    return rows


def _run(row, fn, dtype, consts, warps, stages, cc, limit) -> dict:
    try:
        k = _compile(fn, dtype, consts, warps, stages, cc)
        ptx = k.asm["ptx"]
        regs, spill = _ptxas_report(ptx, cc)
        row.update(shared=k.metadata.shared, regs=regs, spill=spill, mma=_mma(ptx))
        row["ok"] = k.metadata.shared <= limit
    except Exception as e:  # a compile failure is a finding, reported in the table
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
    return row


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: unset TRITON_INTERPRET (the kernels must be compiled)", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="python -m fcit_kernels.aot_check")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, fp16, bf16")
    p.add_argument("--cc", type=int, default=90, help="compute capability (90: H100/H200)")
    p.add_argument("--tf32", action="store_true", help="fp32 dots in TF32 instead of ieee")
    a = p.parse_args(argv)
    rows = check([_NAMES[d] for d in a.dtypes.split(",")], a.cc, tf32=a.tf32)
    for r in rows:
        names = ("BM", "BR", "BRS", "RP", "BN", "BK", "SPLIT_K")
        blocks = " ".join(f"{k}={r[k]}" for k in names if k in r)
        head = f"{r['kernel']:6} {r['dtype']:8} {blocks:38} w{r['warps']} s{r['stages']}"
        if "error" in r:
            print(f"{head}  FAILED {r['error']}")
        else:
            print(
                f"{head}  shared {r['shared']:6d} B  regs {r['regs']:3d}  spill {r['spill']:4d} B"
                f"  {r['mma']:8} {'ok' if r['ok'] else 'OVER THE SHARED-MEMORY LIMIT'}"
            )
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} configs compile within the limits for sm_{a.cc}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
