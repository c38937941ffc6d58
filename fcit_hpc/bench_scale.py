"""``fcit bench scale``: one federation at 50, 1,000 and 10,000 clients, side by side in one run.

The same data (every stage's samples split over all clients), model and method (DISCO) at every
size; each size is a real ``fcit run`` under mpiexec. Read back from each run: every rank's peak
and final resident memory (the ``peak_rss_mib`` / ``rss_mib`` gauges of metrics.jsonl), the round
wall time, DKO's time per round (its own phase), the state write per round and the size of
``state.h5`` at the end. Rank 0 holds no per-client array of the federation's size: its memory
follows the clients sampled per round, so a fourth row has 10,000 clients with as many sampled
per round as the 50-client row.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from fcit_hpc.bench import launch
from fcit_hpc.resources import config_file
from fcit_hpc.state.schema import STATE_FILE, read_state
from fcit_hpc.timers import run_records

DEFAULT_CONFIG = config_file("bench_scale.yaml")
RANKS = 2
# (clients, sampling fraction): 10% of 50, 1,000, 10,000; then 10,000 with 50's 5 per round
SIZES = ((50, 0.1), (1_000, 0.1), (10_000, 0.1), (10_000, 0.0005))


def measure(run_dir: Path) -> dict:
    """The figures of one finished run (module docstring)."""
    st = read_state(run_dir)
    recs = run_records(run_dir / "metrics.jsonl", "round")
    secs = [float(s) for s in st.rounds["seconds"]]
    last = recs[-1]

    def per_round(name: str) -> float:
        return sum(r.get(name, {}).get("max", 0.0) for r in recs) / len(recs)

    dko = per_round("dko")
    round_s = sum(secs) / len(secs)
    return {
        "sampled": int(st.rounds["accepted"][0] + st.rounds["rejected"][0]),
        "rounds": len(secs),
        "rank0_peak_mib": last["peak_rss_mib"][0],
        "rank0_rss_mib": last["rss_mib"][0],
        "peak_mib_per_rank": last["peak_rss_mib"],
        "round_s": round_s,
        "dko_ms": 1e3 * dko,
        "dko_share": dko / round_s,
        "state_write_ms": 1e3 * per_round("state_write"),
        "state_kib": (run_dir / STATE_FILE).stat().st_size / 1024,
    }


def table(config: Path, rows: list[tuple[int, float, dict]]) -> list[str]:
    lines = [
        f"config {config}, {RANKS} ranks, {rows[0][2]['rounds']} rounds per run "
        "(memory: resident set, MiB; DKO and state write: per round, rank 0)",
        "",
        "| clients | sampled / round | rank-0 peak | rank-0 at end | peak per rank | round s "
        "| DKO ms | DKO share | state write ms | state.h5 KiB |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for clients, _, m in rows:
        per_rank = " / ".join(f"{x:.0f}" for x in m["peak_mib_per_rank"])
        lines.append(
            f"| {clients:,} | {m['sampled']:,} | {m['rank0_peak_mib']:.0f} | "
            f"{m['rank0_rss_mib']:.0f} | {per_rank} | {m['round_s']:.3f} | {m['dko_ms']:.2f} | "
            f"{100 * m['dko_share']:.2f}% | {m['state_write_ms']:.1f} | {m['state_kib']:.0f} |"
        )
    by = {(c, f): m for c, f, m in rows}
    small, big = by[SIZES[0]], by[SIZES[3]]
    mid = by[SIZES[1]]
    lines += [
        "",
        f"rank-0 peak, 10,000 vs 50 clients at {small['sampled']} sampled per round: "
        f"{big['rank0_peak_mib'] / small['rank0_peak_mib']:.2f}x (resident at the end: "
        f"{big['rank0_rss_mib'] / small['rank0_rss_mib']:.2f}x)",
        f"DKO at 1,000 clients: {100 * mid['dko_share']:.2f}% of a round's wall time",
    ]
    return lines


def bench_scale(args) -> int:
    config = Path(args.config) if args.config else DEFAULT_CONFIG
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients, frac in SIZES:
            out = Path(tmp) / f"c{clients}_f{frac}"
            overrides = (
                f"federation.num_clients={clients}",
                f"federation.client_selection_frac={frac}",
            )
            if args.quick:
                overrides += ("federation.num_rounds=1",)
            launch(RANKS, config, out, overrides)
            rows.append((clients, frac, measure(out)))
    print("\n".join(table(config, rows)))
    if args.json:
        Path(args.json).write_text(
            json.dumps([{"clients": c, "fraction": f, **m} for c, f, m in rows], indent=1)
        )
    return 0
