#!/usr/bin/env python3
"""Bytes per round on the wire and Last / Avg of each upload codec against float32: runs the
sweep of ``configs/compress_sweep.yaml`` (``mpiexec -n RANKS fcit run``; skipped with
``--table-only``), then writes one table, ``RUN_DIR/compress.md``, and prints it.

Per cell (its first cell is the float32 reference): the bytes every client sent (its update and
identity token, headers included) and received (every broadcast of the round) per round, as
counted on the wire and stored in each run's ``/metrics/rounds`` (mean over the run's rounds,
per client), their ratio to the reference's, and the run's Last and Avg with their difference to
the reference's, in points.

    python scripts/compress_table.py [--config configs/compress_sweep.yaml] [--ranks 2]
        [--out runs/compress_sweep] [--table-only]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fcit_hpc.compare import sweep_cells  # noqa: E402
from fcit_hpc.config import load_config  # noqa: E402
from fcit_hpc.state.schema import read_state  # noqa: E402


def run_sweep(config: Path, out: Path, ranks: int) -> None:
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "fcit"), "run", str(config), "--out", str(out)]
    if ranks > 1:
        cmd = [str(bin_dir / "mpiexec"), "--oversubscribe", "-n", str(ranks), *cmd]
    subprocess.run(cmd, check=True)


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


def table(config: Path, out: Path) -> str:
    cfg = load_config(config)
    cells = sweep_cells(cfg)
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
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--table-only", action="store_true", help="tabulate an existing sweep")
    a = ap.parse_args()
    out = a.out or Path(load_config(a.config).out_dir)
    if not a.table_only:
        run_sweep(a.config, out, a.ranks)
    text = table(a.config, out)
    (out / "compress.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
