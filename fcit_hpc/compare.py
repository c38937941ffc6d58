"""Several runs in one job (``compare`` in the config): one sub-run per method entry and seed in
``RUN_DIR/<entry>/seed<k>``, then one table of the continual-learning metrics averaged over seeds
(``RUN_DIR/comparison.md``). Re-running the same command continues unfinished sub-runs."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from fcit_hpc.config import Config, to_yaml, validate
from fcit_hpc.eval.report import DKO_COLS, METRIC_COLS
from fcit_hpc.registry import COMPARE_LABELS, METHODS
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
    elif entry.startswith("disco-"):
        c.method.name, c.method.ssa = "disco", entry.split("-", 1)[1]
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
        seconds = time.time() - t0
        text = (
            f"{table}\n\nMean over seeds {seeds}; ± is the standard deviation. Purity: share of "
            "a DKO subspace's accepted samples from its majority task, sample-weighted over "
            "subspaces; gate mass: mean SSA α on the subspaces of the test sample's task after the "
            "last stage (identity methods only). Wall time of "
            f"this job: {seconds:.0f} s on {comm.size} rank(s).\n"
        )
        (run_dir / "comparison.md").write_text(text)
        print(text)


def _cell(v: np.ndarray) -> str:
    if np.isnan(v).all():
        return "–"
    if len(v) > 1:
        return f"{np.nanmean(v):.2f} ± {np.nanstd(v):.2f}"
    return f"{v[0]:.2f}"


def comparison(run_dir: Path, entries: list[str], seeds: list[int]) -> str:
    """Mean (± std over seeds) of each metric per entry; identity methods (DISCO and its SSA
    variants) also get DKO's purity (sample-weighted over subspaces) and gate mass on the right
    subspaces (``fcit_hpc.eval.dko``), the others "–"."""
    head = (
        "| method | "
        + " | ".join(h for _, h in METRIC_COLS)
        + " | subspaces | "
        + " | ".join(h for _, h in DKO_COLS)
        + " |"
    )
    lines = [head, "|---" * (len(METRIC_COLS) + len(DKO_COLS) + 2) + "|"]
    for entry in entries:
        states = [read_state(run_dir / entry / f"seed{s}") for s in seeds]
        cells = [
            _cell(np.array([st.summary.get(key, np.nan) for st in states], float))
            for key, _ in METRIC_COLS
        ]
        cells.append("/".join(str(st.num_subspaces) for st in states))
        cells += [
            _cell(np.array([st.summary.get(key, np.nan) for st in states], float))
            for key, _ in DKO_COLS
        ]
        lines.append(f"| {COMPARE_LABELS[entry]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
