"""Run reports: RUN_DIR/report.md and plots/*.png; ``fcit report`` compares several runs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import yaml

from fcit_hpc.registry import PROPOSED
from fcit_hpc.state.schema import RunState, read_state

METRIC_COLS = [
    ("last", "Last"),
    ("avg", "Avg"),
    ("forgetting", "Forgetting"),
    ("bwt", "BWT"),
    ("fwt", "Zero-shot/FWT"),
]

# identity methods' DKO diagnostics in the summary (fcit_hpc.methods.dko_diagnostics); "–" for
# other methods
DKO_COLS = [("purity", "Purity"), ("gate_mass", "Gate mass")]


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _method(st: RunState) -> str:
    cfg = yaml.safe_load(st.config_yaml)
    name = cfg["method"]["name"]
    if cfg["benchmark"]["setting"].startswith("joint"):
        return "multitask (upper bound)"
    if name == PROPOSED and cfg["method"].get("ssa", "softmax") != "softmax":
        return f"{name}[{cfg['method']['ssa']}]"
    return name


def accuracy_table(st: RunState) -> str:
    names = st.task_names or [f"task{i}" for i in range(st.accuracy.shape[1])]
    lines = ["| after stage | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
    for t, row in enumerate(st.accuracy):
        lines.append(
            f"| {t} | "
            + " | ".join(_fmt(x) for x in row)
            + f" | {_fmt(float(np.nanmean(row)) if not np.isnan(row).all() else None)} |"
        )
    return "\n".join(lines)


def clients_line(st: RunState) -> str:
    """How many clients trained: distinct clients with an accepted update, of the federation's
    ``num_clients``, and the client updates accepted / rejected over the run."""
    from fcit_hpc.state.schema import ClientStatus

    total = yaml.safe_load(st.config_yaml)["federation"]["num_clients"]
    c = st.clients
    ok = c["status"] == ClientStatus.ACCEPTED
    return (
        f"- clients trained: {len(np.unique(c['client'][ok])):,} of {total:,} "
        f"({int(ok.sum()):,} client updates accepted, {int((~ok).sum()):,} rejected)"
    )


def write_report(run_dir: str | Path, st: RunState | None = None) -> Path:
    run_dir = Path(run_dir)
    st = st or read_state(run_dir)
    plots = _plots(run_dir, st)
    r = st.rounds
    secs = float(r["seconds"].sum()) if len(r) else 0.0
    sent, recv = (
        int(r["bytes_sent"].sum()) if len(r) else 0,
        int(r["bytes_recv"].sum()) if len(r) else 0,
    )
    lines = [
        f"# fcit run report: {run_dir.name}",
        "",
        f"method **{_method(st)}**, {st.accuracy.shape[0]} stages, "
        f"{len(st.task_names)} tasks, {len(r)} rounds, subspaces discovered: "
        f"{st.num_subspaces}",
        "",
        "## Metrics",
        "",
        "| " + " | ".join(h for _, h in METRIC_COLS) + " |",
        "|---" * len(METRIC_COLS) + "|",
        "| " + " | ".join(_fmt(st.summary.get(k)) for k, _ in METRIC_COLS) + " |",
        "",
        "## Accuracy matrix R[t][i]",
        "",
        accuracy_table(st),
        "",
        "## Communication and time",
        "",
        clients_line(st),
        f"- bytes sent by clients: {sent:,}; received by clients: {recv:,}",
        f"- wall time of the rounds (rank 0): {secs:.1f} s",
        "",
    ]
    lines += phase_section(run_dir, st)
    if st.activation.size:
        lines += [
            "## SSA activation (mean α, test task x subspace)",
            "",
            "| task | " + " | ".join(f"S{k}" for k in range(st.activation.shape[1])) + " |",
            "|---" * (st.activation.shape[1] + 1) + "|",
        ]
        for name, row in zip(st.task_names, st.activation, strict=True):
            lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
        lines.append("")
    lines += method_section(st)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def phase_section(run_dir: Path, st: RunState) -> list[str]:
    """Report lines of the phase timers (metrics.jsonl's ``phases``; docs/phases.md)."""
    from fcit_hpc.timers import eval_share, run_records, table

    records = run_records(run_dir / "metrics.jsonl")
    if not records:
        return []
    out = ["## Where the time went (phase timers)", "", *table(records), ""]
    out.append(
        f"- evaluation's share of the wall time: {100 * eval_share(run_dir / 'metrics.jsonl'):.1f}%"
    )
    cfg = yaml.safe_load(st.config_yaml or "{}") or {}
    if (cfg.get("eval") or {}).get("caption_meteor") == "skip":
        out.append(
            "- caption scores (Flickr30k) are **without METEOR** (eval.caption_meteor=skip): "
            "the mean of BLEU-1..4, ROUGE-L and CIDEr, not the paper's metric"
        )
    return [*out, ""]


def method_section(st: RunState) -> list[str]:
    """The report lines the run's method adds (DISCO: its DKO diagnostics)."""
    from fcit_hpc.config import config_from_yaml_text
    from fcit_hpc.methods import make_method

    cfg = config_from_yaml_text(st.config_yaml)
    return make_method(cfg.method, cfg.lora).report_lines(st, _fmt)


def _plots(run_dir: Path, st: RunState) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = run_dir / "plots"
    d.mkdir(exist_ok=True)
    out = []
    names = st.task_names or [str(i) for i in range(st.accuracy.shape[1])]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.5 * st.accuracy.shape[0]))
    im = ax.imshow(st.accuracy, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(st.accuracy.shape[0]))
    ax.set_xlabel("task")
    ax.set_ylabel("after stage")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(d / "accuracy_matrix.png", dpi=110)
    plt.close(fig)
    out.append(d / "accuracy_matrix.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, n in enumerate(names):
        ax.plot(range(st.accuracy.shape[0]), st.accuracy[:, i], "o-", label=n)
    ax.set_xlabel("stage")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(d / "task_curves.png", dpi=110)
    plt.close(fig)
    out.append(d / "task_curves.png")
    if st.activation.size:
        fig, ax = plt.subplots(figsize=(1 + 0.5 * st.activation.shape[1], 1 + 0.4 * len(names)))
        im = ax.imshow(st.activation, vmin=0, vmax=1, cmap="magma")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xticks(range(st.activation.shape[1]))
        ax.set_xlabel("subspace")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(d / "ssa_activation.png", dpi=110)
        plt.close(fig)
        out.append(d / "ssa_activation.png")
    return out


def run_names(run_dirs: list[str | Path]) -> list[str]:
    """Each run's folder name, or its path below the runs' common folder when names repeat
    (``tau0.8/disco/seed0``, ``tau0.9/disco/seed0`` of a sweep)."""
    paths = [Path(d).resolve() for d in run_dirs]
    if len({p.name for p in paths}) == len(paths):
        return [p.name for p in paths]
    root = Path(os.path.commonpath(paths))
    return [str(p.relative_to(root)) if p != root else p.name for p in paths]


def comparison_table(run_dirs: list[str | Path]) -> str:
    """Paper-style table: one row per run (method), Last / Avg / Forgetting / BWT / FWT, the
    subspaces and, for identity methods, DKO's purity and gate mass (``–`` for the others)."""
    lines = [
        "| method | run | " + " | ".join(h for _, h in METRIC_COLS + DKO_COLS) + " | S |",
        "|---" * (len(METRIC_COLS) + len(DKO_COLS) + 3) + "|",
    ]
    for d, name in zip(run_dirs, run_names(run_dirs), strict=True):
        st = read_state(d)
        lines.append(
            f"| {_method(st)} | {name} | "
            + " | ".join(_fmt(st.summary.get(k)) for k, _ in METRIC_COLS + DKO_COLS)
            + f" | {st.num_subspaces} |"
        )
    return "\n".join(lines)
