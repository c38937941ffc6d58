"""Kernel configs at a cost of seconds per run: bounded keys, a per-GPU table in the repo, a tuning
cache under ``$FCIT_CACHE``, and heuristic defaults that time nothing.

Keys. A config is chosen per ``op|dtype|M class|shape|R bucket``:

- M class: ``decode`` (M ≤ 16: one fused launch per linear) or ``prefill`` (M > 16). Generation
  produces a new M per prompt batch; two classes cover every M.
- shape: K for the shrink, N for the expand, ``KxN`` for the fused decode kernel: fixed per model
  (two FFN shapes in a Llama).
- R bucket: S·r rounded up to a power of two (≥ 16). DKO adds a subspace per stage, so R = S·r
  changes every stage; the bucket changes only when R crosses a power of two (r = 8: 16, 32, 64
  over 8 stages instead of 8 values), and the kernels take R as a runtime argument, not a
  specialisation, so a stage that adds a subspace reuses the compiled kernel.

Lookup order (``config``): the repo's table ``configs/<device>.json`` (written by
``fcit bench kernels --tune --write-table``), then the tuning cache
``$FCIT_CACHE/kernels/<device>.json``, then ``heuristic`` (no timing). Autotuning happens only
when asked (``FCIT_KERNELS_TUNE=1``, which ``fcit bench kernels --tune`` sets): a miss is then
timed over the candidates and stored in the cache under an exclusive file lock (one rank tunes;
the others wait on the lock, re-read the cache and find the key). ``stats()`` reports the seconds
spent tuning and compiling (first launch of each compiled variant), the keys seen and where each
config came from, for the run's phase timers.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

DECODE_M = 16  # M ≤ DECODE_M: the fused one-launch kernel
FUSED_MAX_R = 256  # the fused kernel holds the whole [16, R] h tile and a [R, BN] B tile
TWO_GEMM_R = 512  # S·r ≥ this: the two-GEMM (cuBLAS) path; the issue measured it ahead there
TABLE_DIR = Path(__file__).resolve().parent / "configs"

_STATS: dict = {"tune_s": 0.0, "compile_s": 0.0, "tuned": 0, "sources": {}, "compiles": set()}
_TABLES: dict[str, dict] = {}


def pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def m_class(M: int) -> str:
    return "decode" if M <= DECODE_M else "prefill"


def r_bucket(R: int) -> int:
    return max(16, pow2(R))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def key(op: str, dtype: torch.dtype, M: int, shape: str, R: int) -> str:
    """``op|dtype|M class|shape|R bucket``, e.g. ``fused|bfloat16|decode|4096x4096|R64``."""
    return f"{op}|{dtype_name(dtype)}|{m_class(M)}|{shape}|R{r_bucket(R)}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else device.type


def slug(name: str) -> str:
    """File name of a device's table: ``NVIDIA H200`` → ``NVIDIA_H200``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def table_path(name: str) -> Path:
    return TABLE_DIR / f"{slug(name)}.json"


def cache_path(name: str) -> Path:
    root = os.environ.get("FCIT_CACHE", str(Path.home() / ".cache" / "fcit_hpc"))
    return Path(root) / "kernels" / f"{slug(name)}.json"


def _read(path: Path) -> dict:
    """The ``entries`` of a table file; {} if absent. A malformed file is an error naming it."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError("entries is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"kernel config table {path}: {e}") from e
    return entries


def _entries(name: str) -> dict:
    if name not in _TABLES:
        _TABLES[name] = {"table": _read(table_path(name)), "cache": _read(cache_path(name))}
    return _TABLES[name]


def reload() -> None:
    """Forget the loaded tables and resolved configs (after writing a table, or when
    $FCIT_CACHE changes)."""
    _TABLES.clear()
    _MEMO.clear()


_ELEMENT_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
_MEMO: dict[tuple, dict] = {}  # resolved configs: a call costs one dict lookup on the host


def heuristic(op: str, dtype: torch.dtype, M: int, K: int, N: int, R: int, det: bool) -> dict:
    """A good untuned config (no timing): see docs/kernels.md for the reasoning.

    fused (M ≤ 16): K split into ~128-wide slices (32 shrink programs at K = 4096, each streaming
    64 KB of A), expand tiles of BN = 64 (N = 4096: 64 programs; both fit in one wave of 132
    SMs). prefill: shrink with 64×64 tiles split over K until ~128 programs run, expand with
    64×128 tiles (BM = 32 under 64 rows)."""
    es = _ELEMENT_SIZE[dtype]
    rp = r_bucket(R)
    if op == "fused":
        bk = 128 if es == 2 else 64
        split = 1 if det else max(1, min(64, pow2(K) // bk))
        return dict(
            BRS=min(rp, 64), BK=bk, SPLIT_K=split, BN=64 if rp <= 64 else 32, num_warps=4,
            num_stages=2,
        )  # fmt: skip
    if op == "shrink":
        bm, br, bk = 64, min(64, rp), 64
        tiles = -(-M // bm) * -(-R // br)
        split = 1 if det else max(1, min(16, pow2(max(1, 128 // tiles)), max(1, K // (4 * bk))))
        return dict(BM=bm, BR=br, BK=bk, SPLIT_K=split, num_warps=4, num_stages=3)
    if op == "expand":
        if M < 64:
            return dict(BM=32, BN=64, BR=min(64, rp), num_warps=4, num_stages=3)
        return dict(BM=64, BN=128, BR=32, num_warps=8, num_stages=3)
    raise ValueError(f"unknown kernel op {op!r}")


def tuning_on() -> bool:
    return os.environ.get("FCIT_KERNELS_TUNE") == "1"


def config(
    op: str,
    dtype: torch.dtype,
    M: int,
    K: int,
    N: int,
    R: int,
    device: torch.device,
    det: bool = False,
    tune: Callable[[list[dict]], dict] | None = None,
    candidates: list[dict] | None = None,
) -> dict:
    """The config of one launch: table, cache, then tuning (if on and ``tune`` given) or the
    heuristic. ``tune(candidates)`` times the candidates on the real arguments, returns the best.
    Resolved configs are memoised per (op, dtype, M, K, N, R, device, det) until ``reload``."""
    memo = (op, dtype, M, K, N, R, str(device), det, tuning_on())
    if memo in _MEMO:
        return _MEMO[memo]
    cfg = _resolve(op, dtype, M, K, N, R, device, det, tune, candidates)
    _MEMO[memo] = cfg
    return cfg


def _resolve(op, dtype, M, K, N, R, device, det, tune, candidates) -> dict:
    shape = {"fused": f"{K}x{N}", "shrink": str(K), "expand": str(N)}[op]
    k = key(op, dtype, M, shape, R) + ("|det" if det and op != "expand" else "")
    name = device_name(device)
    ent = _entries(name)
    for src in ("table", "cache"):
        if k in ent[src]:
            _STATS["sources"][k] = src
            return dict(ent[src][k])
    if tune is not None and tuning_on() and candidates:
        cfg = _tune_locked(name, k, tune, candidates)
        _STATS["sources"][k] = "tuned"
        return cfg
    _STATS["sources"][k] = "heuristic"
    return heuristic(op, dtype, M, K, N, R, det)


def _tune_locked(name: str, k: str, tune: Callable, candidates: list[dict]) -> dict:
    """Tune ``k`` unless another process did while we waited for the lock; store it."""
    path = cache_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries = _read(path)
            if k in entries:  # another rank tuned it
                _entries(name)["cache"] = entries
                return dict(entries[k])
            t0 = time.perf_counter()
            best = tune(candidates)
            _STATS["tune_s"] += time.perf_counter() - t0
            _STATS["tuned"] += 1
            entries[k] = best
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"device": name, "entries": entries}, indent=1))
            tmp.replace(path)
            _entries(name)["cache"] = entries
            return dict(best)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def note_launch(kernel: str, meta: dict, dtype: torch.dtype, seconds: float) -> None:
    """Count a compiled variant (kernel, constexprs, dtype) the first time it launches; its first
    launch time (host side: Triton compiles there) goes to the compile seconds."""
    variant = (kernel, dtype_name(dtype), tuple(sorted(meta.items())))
    if variant not in _STATS["compiles"]:
        _STATS["compiles"].add(variant)
        _STATS["compile_s"] += seconds


def is_new_variant(kernel: str, meta: dict, dtype: torch.dtype) -> bool:
    return (kernel, dtype_name(dtype), tuple(sorted(meta.items()))) not in _STATS["compiles"]


def stats() -> dict:
    """Seconds tuning and compiling, keys seen (with their config's source), compiled variants."""
    return {
        "tune_s": _STATS["tune_s"],
        "compile_s": _STATS["compile_s"],
        "tuned": _STATS["tuned"],
        "keys": len(_STATS["sources"]),
        "sources": dict(_STATS["sources"]),
        "compiles": len(_STATS["compiles"]),
    }


def tuning_seconds() -> float:
    """Seconds spent autotuning and compiling the SSA kernels in this process (phase timers)."""
    return _STATS["tune_s"] + _STATS["compile_s"]


def reset_stats() -> None:
    _STATS.update(tune_s=0.0, compile_s=0.0, tuned=0, sources={}, compiles=set())


def write_table(device: torch.device, path: str | Path) -> int:
    """Write this device's table (the repo table's entries, then the cache's on top) to ``path``;
    returns the number of entries."""
    name = device_name(device)
    reload()
    ent = _entries(name)
    entries = {**ent["table"], **ent["cache"]}
    Path(path).write_text(json.dumps({"device": name, "entries": entries}, indent=1) + "\n")
    return len(entries)


# ------------------------------------------------------------------------------ key counting
def keys_before(calls: list[dict]) -> set:
    """The old autotune keys of recorded calls: shrink (MB, K, R, dtype), expand (MB, N, R,
    dtype), MB = M rounded up to a power of two (cap 4096)."""
    out = set()
    for c in calls:
        mb = min(pow2(c["M"]), 4096)
        out.add(("shrink", mb, c["K"], c["R"], c["dtype"]))
        out.add(("expand", mb, c["N"], c["R"], c["dtype"]))
    return out


def _triton_calls(calls: list[dict]):
    """(call, M, K, N, R, dtype, its kernels) of each recorded call that runs Triton kernels
    (the two-GEMM path at R >= TWO_GEMM_R runs none): the fused one at decode sizes, else the
    shrink and the expand."""
    for c in calls:
        M, K, N, R = c["M"], c["K"], c["N"], c["R"]
        if R >= TWO_GEMM_R:
            continue
        dt = getattr(torch, c["dtype"].replace("torch.", ""))
        ops = ("fused",) if M <= DECODE_M and R <= FUSED_MAX_R else ("shrink", "expand")
        yield c, M, K, N, R, dt, ops


def keys_after(calls: list[dict]) -> set:
    """This module's keys for the same calls (two-GEMM path at R ≥ TWO_GEMM_R: no key)."""
    return {
        key(op, dt, M, {"fused": f"{K}x{N}", "shrink": str(K), "expand": str(N)}[op], R)
        for _, M, K, N, R, dt, ops in _triton_calls(calls)
        for op in ops
    }


def variants_after(calls: list[dict]) -> set:
    """Compiled kernel variants with a cold cache (heuristic configs): the constexprs and dtype
    (M, R, r, G are not specialised; K and N specialise only on divisibility by 16)."""
    out = set()
    for c, M, K, N, R, dt, ops in _triton_calls(calls):
        for op in ops:
            cfg = heuristic(op, dt, M, K, N, R, False)
            extra = (("RP", r_bucket(R)),) if op == "fused" else ()
            div = (K % 16 == 0, N % 16 == 0)
            out.add((op, c["dtype"], div, tuple(sorted(cfg.items())) + extra))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m fcit_kernels.tuning count FILE``: keys of a ``FCIT_KERNELS_RECORD`` file."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fcit_kernels.tuning")
    p.add_argument("what", choices=["count"])
    p.add_argument("file", help="JSON lines written under FCIT_KERNELS_RECORD=FILE")
    a = p.parse_args(argv)
    calls = [json.loads(line) for line in Path(a.file).read_text().splitlines() if line.strip()]
    b, n = keys_before(calls), keys_after(calls)
    print(f"{len(calls)} distinct call shapes")
    print(f"old keys (MB, K|N, R, dtype): {len(b)}")
    print(f"new keys (op, dtype, M class, shape, R bucket): {len(n)}")
    v = variants_after(calls)
    print(f"compiled variants with a cold cache (heuristic, no timing): {len(v)}")
    for k in sorted(n):
        print(f"  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
