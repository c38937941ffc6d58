"""``fcit bench rounds``: round wall time at 1 rank and at 2 ranks, side by side in one run."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fcit_hpc.resources import config_file
from fcit_hpc.state.schema import read_state

DEFAULT_CONFIG = config_file("bench_rounds.yaml")


def _mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def launch(n: int, config: Path, out: Path, overrides: tuple[str, ...] = ()) -> None:
    """``fcit run CONFIG --out OUT`` under mpiexec with ``n`` ranks, one thread each; exits
    naming the world size and the run's last error lines when it fails."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        _mpiexec(),
        "--oversubscribe",
        "-n",
        str(n),
        sys.executable,
        "-m",
        "fcit_hpc",
        "run",
        str(config),
        "--out",
        str(out),
        "train.num_threads=1",
        *overrides,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        what = " ".join(overrides)
        raise SystemExit(f"bench run with {n} ranks {what} failed:\n{p.stderr[-2000:]}")


def _run(n: int, config: Path, out: Path) -> list[float]:
    launch(n, config, out)
    secs = [float(s) for s in read_state(out).rounds["seconds"]]
    return secs[1:] if len(secs) > 1 else secs  # the first round pays one-off warm-up


def bench_rounds(args) -> int:
    config = Path(args.config) if args.config else DEFAULT_CONFIG
    with tempfile.TemporaryDirectory() as tmp:
        t1 = _run(1, config, Path(tmp) / "p1")
        t2 = _run(2, config, Path(tmp) / "p2")
    # the same rounds (same clients, same work) at both world sizes: compare round by round
    ratios = [a / b for a, b in zip(t1, t2, strict=True)]
    print(f"config {config}  (round 0 excluded: one-off warm-up)")
    print(f"{'round':>5} | {'1 rank s':>9} | {'2 ranks s':>9} | {'ratio':>6}")
    for i, (a, b, q) in enumerate(zip(t1, t2, ratios, strict=True)):
        print(f"{i + 1:5d} | {a:9.3f} | {b:9.3f} | {q:6.2f}")
    speedup = sum(t1) / sum(t2)
    print(
        f"total {sum(t1):.3f} s vs {sum(t2):.3f} s: speed-up 1 rank / 2 ranks = {speedup:.2f}x "
        f"(median round ratio {statistics.median(ratios):.2f}; 2 cores, one thread per rank)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"1": t1, "2": t2, "speedup": speedup}))
    return 0
