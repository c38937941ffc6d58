#!/usr/bin/env python3
"""Bytes per round on the wire and Last / Avg of each upload codec against float32: runs the
cells of the sweep of ``configs/compress_sweep.yaml`` (each cell's compare job as its own
``[mpiexec -n RANKS] fcit run RUN_DIR/<cell>/config.yaml``, ``--jobs`` of them at a time; skipped
with ``--table-only``), then writes one table, ``RUN_DIR/compress.md``, and prints it.

Per cell (its first cell is the float32 reference): the bytes every client sent (its update and
identity token, headers included) and received (every broadcast of the round) per round, as
counted on the wire and stored in each run's ``/metrics/rounds`` (mean over the run's rounds,
per client), their ratio to the reference's, and the run's Last and Avg with their difference to
the reference's, in points.

    python scripts/compress_table.py [--config configs/compress_sweep.yaml] [--ranks 1]
        [--jobs 2] [--out runs/compress_sweep] [--table-only] [--cells NAME,...] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fcit_hpc.compare import cell_config, sweep_cells  # noqa: E402
from fcit_hpc.config import load_config, to_yaml  # noqa: E402
from fcit_hpc.state.schema import read_state  # noqa: E402


def selected(cfg, only: list[str]) -> list[tuple[str, list[str]]]:
    """The sweep's cells (folder name, overrides), those named in ``only`` when it is given."""
    cells = sweep_cells(cfg)
    return [c for c in cells if c[0] in only] if only else cells


def run_cells(cfg, out: Path, ranks: int, jobs: int, only: list[str]) -> None:
    """Every cell's compare job (``fcit_hpc.compare.cell_config``: the sweep's config with the
    cell's overrides), ``jobs`` at a time; stops on the first that fails."""
    bin_dir = Path(sys.executable).parent
    pending, running = [], []
    for name, over in selected(cfg, only):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(to_yaml(cell_config(cfg, over, d)))
        cmd = [str(bin_dir / "fcit"), "run", str(d / "config.yaml"), "--out", str(d)]
        if ranks > 1:
            cmd = [str(bin_dir / "mpiexec"), "--oversubscribe", "-n", str(ranks), *cmd]
        pending.append((name, cmd))
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed when it ends)
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=log), log))
        time.sleep(2)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode:
                    sys.exit(f"cell {name} failed (exit {proc.returncode}): see {out / name}.log")
                print(f"cell {name} done", flush=True)


def cell_figures(run_dir: Path) -> dict[str, float]:
    """Per-client bytes per round (up, down) and Last / Avg of one cell's DISCO run."""
    st = read_state(run_dir / "disco" / "seed0")
    clients = st.rounds["accepted"] + st.rounds["rejected"]
    return {
        "up": float((st.rounds["bytes_sent"] / clients).mean()),
        "down": float((st.rounds["bytes_recv"] / clients).mean()),
        "last": st.summary["last"],
        "avg": st.summary["avg"],
    }


def table(cfg, out: Path, only: list[str]) -> str:
    cells = selected(cfg, only)
    figs = [(over, cell_figures(out / name)) for name, over in cells]
    ref = figs[0][1]
    lines = [
        "| cell (`compress.*`) | up, bytes / client / round | × float32 | down, bytes / client "
        "/ round | × float32 | Last | Δ Last | Avg | Δ Avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for over, f in figs:
        name = " ".join(o.removeprefix("compress.") for o in over)
        lines.append(
            f"| {name} | {f['up']:,.0f} | {f['up'] / ref['up']:.3f} | {f['down']:,.0f} | "
            f"{f['down'] / ref['down']:.3f} | {f['last']:.2f} | {f['last'] - ref['last']:+.2f} | "
            f"{f['avg']:.2f} | {f['avg'] - ref['avg']:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs/compress_sweep.yaml")
    ap.add_argument("--out", type=Path, default=None, help="default: the config's out_dir")
    ap.add_argument("--ranks", type=int, default=1, help="MPI ranks of each cell's run")
    ap.add_argument("--jobs", type=int, default=2, help="cells run at the same time")
    ap.add_argument("--table-only", action="store_true", help="tabulate an existing sweep")
    ap.add_argument("--cells", default="", help="only these cells (comma-separated folder names)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    a = ap.parse_args()
    cfg = load_config(a.config, a.overrides)
    out = a.out or Path(cfg.out_dir)
    cells = [c for c in a.cells.split(",") if c]
    if not a.table_only:
        run_cells(cfg, out, a.ranks, a.jobs, cells)
    text = table(cfg, out, cells)
    (out / "compress.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
