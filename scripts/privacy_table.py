"""One table of the privacy settings on one config: the plain run, secure aggregation, and
central DP at several noise multipliers σ — ε at δ after each stage, Last, Avg, upload bytes per
round — each run made here by `fcit run` (``--jobs`` of them at a time; a finished run already
in OUT_DIR is read, not run again).

    python scripts/privacy_table.py CONFIG OUT_DIR [key=value ...] [--sigmas 0.5 1 2] [--jobs 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from fcit_hpc.state.schema import read_state


def runs(sigmas: list[float]) -> list[tuple[str, list[str]]]:
    out = [("plain", []), ("SecAgg+", ["privacy.secagg=true"])]
    for s in sigmas:
        out.append((f"central DP, σ = {s:g}", ["privacy.dp=central", f"privacy.dp_noise={s:g}"]))
    return out


def finished(out: Path) -> bool:
    return (out / "state.h5").is_file() and read_state(out).done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("out_dir")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--sigmas", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args(argv)
    todo = [(Path(a.out_dir) / f"run{i}", over) for i, (_, over) in enumerate(runs(a.sigmas))]
    todo = [(out, over) for out, over in todo if not finished(out)]
    for at in range(0, len(todo), a.jobs):
        procs = []
        for out, over in todo[at : at + a.jobs]:
            cmd = [sys.executable, "-m", "fcit_hpc", "run", a.config, "--out", str(out)]
            log = out.with_suffix(".log")  # each run's own output, beside its directory
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as fh:
                args = [*cmd, *a.overrides, *over]
                procs.append((subprocess.Popen(args, stdout=fh, stderr=fh), log))
        for p, log in procs:
            if p.wait():
                sys.stderr.write(log.read_text()[-3000:])
                return p.returncode
    rows, stages = [], 0
    for i, (name, _) in enumerate(runs(a.sigmas)):
        st = read_state(Path(a.out_dir) / f"run{i}")
        stages = st.accuracy.shape[0]
        eps = st.privacy_epsilon if st.privacy_epsilon.size else np.full(stages, np.nan)
        up = st.rounds["bytes_sent"].mean()
        rows.append((name, eps, st.summary["last"], st.summary["avg"], up))
    delta = next(
        (o.split("=")[1] for o in a.overrides if o.startswith("privacy.dp_delta=")), "1e-5"
    )
    head = " | ".join(f"ε stage {t}" for t in range(stages))
    print(f"| setting | {head} | Last | Avg | upload bytes / round |")
    print("|---|" + "---|" * (stages + 3))
    base = rows[0][4]
    for name, eps, last, avg, up in rows:
        e = " | ".join("–" if np.isnan(x) else f"{x:.2f}" for x in eps)
        print(f"| {name} | {e} | {last:.2f} | {avg:.2f} | {up:,.0f} ({up / base:.2f}x) |")
    print(
        f"\nε at δ = {delta} (dp-accounting RDP, Poisson sampling q = clients per round / clients)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
