"""Several runs in one job (``compare`` in the config): one sub-run per method entry and seed in
``RUN_DIR/<entry>/seed<k>``, then one table of the continual-learning metrics averaged over seeds
(``RUN_DIR/comparison.md``), with DISCO's per-seed paired difference to the best baseline.
Re-running the same command continues unfinished sub-runs.

A ``sweep`` runs such a job per cell of a grid (``RUN_DIR/<cell>/``) and writes one table over
all cells (``RUN_DIR/sweep.md``): e.g. the paper's 12 cells (scenario x setting x β) or a τ sweep.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from fcit_hpc.config import Config, _build, apply_overrides, to_dict, to_yaml, validate
from fcit_hpc.eval.report import DKO_COLS, METRIC_COLS
from fcit_hpc.registry import COMPARE_LABELS, METHODS, PROPOSED
from fcit_hpc.state.schema import STATE_FILE, read_state


def sub_config(cfg: Config, entry: str, seed: int, run_dir: Path) -> Config:
    c = dataclasses.replace(
        cfg,
        seed=seed,
        compare=[],
        compare_seeds=[],
        out_dir=str(run_dir / entry / f"seed{seed}"),
        method=dataclasses.replace(cfg.method),
        federation=dataclasses.replace(cfg.federation),
        benchmark=dataclasses.replace(cfg.benchmark),
    )
    if entry in METHODS:
        c.method.name = entry
    elif entry.startswith(f"{PROPOSED}-"):
        c.method.name, c.method.ssa = PROPOSED, entry.split("-", 1)[1]
    else:  # multitask: one client holding all data, as many samples seen as the federated run
        f = cfg.federation
        c.method.name = "finetune"
        joint = "joint-capability" if cfg.benchmark.setting == "capability" else "joint"
        c.benchmark.setting, c.benchmark.scenario = joint, "hom"
        c.benchmark.min_client_samples = 1
        c.federation.num_clients, c.federation.client_selection_frac = 1, 1.0
        c.federation.num_rounds = max(
            1, math.ceil(f.num_rounds * cfg.clients_per_round / f.num_clients)
        )
    return validate(c)


def run_compare(cfg: Config, comm, run_dir: Path) -> None:
    from fcit_hpc.run import run_federated

    seeds = cfg.compare_seeds or [cfg.seed]
    t0 = time.time()
    for seed in seeds:
        for entry in cfg.compare:
            sub = sub_config(cfg, entry, seed, run_dir)
            d = Path(sub.out_dir)
            state = None
            if (d / STATE_FILE).exists():
                st = read_state(d)  # every rank reads it: all continue alike
                if st.done:
                    continue
                state = st if comm.is_root else None
            elif comm.is_root:
                d.mkdir(parents=True, exist_ok=True)
                (d / "config.yaml").write_text(to_yaml(sub))
            comm.barrier()
            if comm.is_root:
                print(f"== {entry} seed {seed} -> {d}", flush=True)
            run_federated(sub, comm, d, state)
    if comm.is_root:
        table = comparison(run_dir, cfg.compare, seeds)
        paired = paired_difference(run_dir, cfg.compare, seeds)
        seconds = time.time() - t0
        text = (
            f"{table}\n\nMean over seeds {seeds}; ± is the standard deviation. Purity: share of "
            "a DKO subspace's accepted samples from its majority task, sample-weighted over "
            "subspaces; gate mass: mean SSA α on the subspaces of the test sample's task after the "
            "last stage (identity methods only). Wall time of "
            f"this job: {seconds:.0f} s on {comm.size} rank(s).\n"
            + (f"\n{paired}\n" if paired else "")
        )
        (run_dir / "comparison.md").write_text(text)
        print(text)


BOUNDS = ("zero_shot", "multitask")  # rows that are not baselines DISCO is compared with


def paired_difference(run_dir: Path, entries: list[str], seeds: list[int]) -> str:
    """DISCO's Last minus the best baseline's (highest mean Last over the seeds; not Zero-shot or
    the multi-task bound), seed by seed; '' when the job has no DISCO row or no baseline."""
    base = [e for e in entries if e in METHODS and e not in BOUNDS and e != PROPOSED]
    if PROPOSED not in entries or not base:
        return ""

    def last(entry):
        return np.array([read_state(run_dir / entry / f"seed{s}").summary["last"] for s in seeds])

    means = {e: float(np.mean(last(e))) for e in base}
    best = max(base, key=lambda e: means[e])
    d = last(PROPOSED) - last(best)
    per_seed = ", ".join(f"{x:+.2f}" for x in d)
    spread = f" ± {np.std(d):.2f}" if len(d) > 1 else ""
    return (
        f"DISCO − best baseline ({COMPARE_LABELS[best]}) on Last, per seed {seeds}: {per_seed}; "
        f"mean {np.mean(d):+.2f}{spread}; DISCO ahead in {int((d > 0).sum())} of {len(d)} seeds."
    )


def _cell(v: np.ndarray) -> str:
    if np.isnan(v).all():
        return "–"
    if len(v) > 1:
        return f"{np.nanmean(v):.2f} ± {np.nanstd(v):.2f}"
    return f"{v[0]:.2f}"


def _header(first: list[str], metrics: list) -> list[str]:
    """The header and rule lines of a table: ``first`` columns, the metrics, subspaces, DKO's."""
    heads = [*first, *(h for _, h in metrics), "subspaces", *(h for _, h in DKO_COLS)]
    return ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]


def _row(states: list, metrics: list) -> list[str]:
    """One entry's cells over its seeds' states: each metric's mean (± std), the subspaces per
    seed, then DKO's purity and gate mass ("–" where a run has none)."""

    def col(key):
        return _cell(np.array([st.summary.get(key, np.nan) for st in states], float))

    subs = "/".join(str(st.num_subspaces) for st in states)
    return [*(col(k) for k, _ in metrics), subs, *(col(k) for k, _ in DKO_COLS)]


def comparison(run_dir: Path, entries: list[str], seeds: list[int]) -> str:
    """Mean (± std over seeds) of each metric per entry; identity methods (DISCO and its SSA
    variants) also get DKO's purity (sample-weighted over subspaces) and gate mass on the right
    subspaces (``fcit_hpc.methods.dko_diagnostics``), the others "–"."""
    lines = _header(["method"], METRIC_COLS)
    for entry in entries:
        states = [read_state(run_dir / entry / f"seed{s}") for s in seeds]
        lines.append(f"| {COMPARE_LABELS[entry]} | " + " | ".join(_row(states, METRIC_COLS)) + " |")
    return "\n".join(lines)


def sweep_cells(cfg: Config) -> list[tuple[str, list[str]]]:
    """The grid's cells in order (the last axis fastest): (folder name, overrides). A cell's
    folder joins its overrides' values (``hom_task_0.5``)."""
    cells: list[tuple[str, list[str]]] = [("", [])]
    for axis in cfg.sweep:
        cells = [
            (f"{name}_{_cell_name(c)}" if name else _cell_name(c), [*over, *c.split()])
            for name, over in cells
            for c in axis
        ]
    return cells


def _cell_name(cell: str) -> str:
    vals = [item.partition("=")[2] for item in cell.split()]
    return "-".join(v.replace("/", "-").replace(" ", "") or "empty" for v in vals)


def cell_config(cfg: Config, overrides: list[str], run_dir: Path) -> Config:
    """The compare job of one cell: the sweep's config with the cell's overrides (validated as
    any config: a bad value names its field)."""
    data = to_dict(cfg)
    data.pop("debug")
    data["sweep"] = []
    data["out_dir"] = str(run_dir)
    if not data["compare"]:
        data["compare"] = [cfg.method.name]
    return validate(_build(Config, apply_overrides(data, overrides), ""))


def run_sweep(cfg: Config, comm, run_dir: Path) -> None:
    """One compare job per cell in ``RUN_DIR/<cell>``, then ``RUN_DIR/sweep.md``. Every cell's
    config is checked before the first run starts."""
    t0 = time.time()
    cells = [(name, cell_config(cfg, over, run_dir / name)) for name, over in sweep_cells(cfg)]
    for name, c in cells:
        d = run_dir / name
        if comm.is_root:
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.yaml").write_text(to_yaml(c))
            print(f"=== sweep cell {name}", flush=True)
        comm.barrier()
        run_compare(c, comm, d)
    if comm.is_root:
        table = sweep_table(run_dir, cells)
        text = (
            f"{table}\n\nOne row per cell and method, mean over seeds (± the standard deviation "
            f"when there are several). Wall time of this sweep: {time.time() - t0:.0f} s on "
            f"{comm.size} rank(s).\n"
        )
        (run_dir / "sweep.md").write_text(text)
        print(text)


def sweep_table(run_dir: Path, cells: list[tuple[str, Config]]) -> str:
    """One row per cell and entry: Last, Avg, Forgetting, BWT, subspaces, and DKO's purity and
    gate mass (identity methods; "–" for the others)."""
    metrics = METRIC_COLS[:4]
    lines = _header(["cell", "method"], metrics)
    for name, c in cells:
        seeds = c.compare_seeds or [c.seed]
        for entry in c.compare:
            states = [read_state(run_dir / name / entry / f"seed{s}") for s in seeds]
            row = " | ".join(_row(states, metrics))
            lines.append(f"| {name} | {COMPARE_LABELS[entry]} | {row} |")
    return "\n".join(lines)
