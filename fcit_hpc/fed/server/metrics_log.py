"""RUN_DIR/metrics.jsonl: one JSON object per round and per evaluation (``kind``: round, eval; dko
after each evaluation of DISCO, see :mod:`fcit_hpc.methods.dko_diagnostics`; summary
at the end), written by the server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from fcit_hpc.state.schema import STATUS, RunState


class MetricsLog:
    """RUN_DIR/metrics.jsonl, one JSON object per round and per evaluation (rank 0 only)."""

    def __init__(self, path: Path, trackers=None):
        self.path = path
        # experiment trackers fed every line (fcit_hpc.fed.server.tracking.Trackers; None: off)
        self.trackers = trackers

    def rewrite(self, st: RunState, task_names, method=None) -> None:
        """Regenerate the log from the state (on resume: drops lines of an unfinished round);
        ``method``: the run's, whose own lines follow each evaluation's."""
        old = self.old_phases()
        lines = [
            self.with_phases(
                self.round_line(r, st.clients, st.privacy_norms),
                old.get(("round", int(r["stage"]), int(r["round"]))),
            )
            for r in st.rounds
        ]
        for t in range(st.accuracy.shape[0]):
            if not np.isnan(st.accuracy[t]).all():
                line = self.eval_line(t, st.accuracy[t], task_names)
                lines.append(self.with_phases(line, old.get(("eval", t, None))))
                if method is not None:  # DISCO: the stage's DKO diagnostics
                    lines += method.eval_records(st, t, task_names)
        for t in range(st.privacy_epsilon.size):  # DP: ε after each stage reached
            if not np.isnan(st.privacy_epsilon[t]):
                lines.append(self.privacy_line(st, t))
        lines.sort(key=lambda s: (json.loads(s)["stage"], json.loads(s).get("round", 1 << 30)))
        if st.summary and st.done:  # a resumed finished run keeps its summary line
            stages = st.accuracy.shape[0]
            lines.append(json.dumps({"kind": "summary", "stage": stages, **st.summary}))
        self.path.write_text("".join(x + "\n" for x in lines))
        if self.trackers is not None:
            self.trackers.restart(lines)

    def old_phases(self) -> dict[tuple, dict]:
        """(kind, stage, round) -> the ``phases`` entry of the log's round and eval lines as they
        are (the phase times are not in the state: a rewrite keeps them from the old log)."""
        out: dict[tuple, dict] = {}
        if not self.path.is_file():
            return out
        for text in self.path.read_text().splitlines():
            try:
                rec = json.loads(text)
            except ValueError:  # a line cut short by a kill: its round is redone
                continue
            if isinstance(rec, dict) and "phases" in rec:
                out[(rec.get("kind"), rec.get("stage"), rec.get("round"))] = rec["phases"]
        return out

    @staticmethod
    def with_phases(line: str, phases: dict | None) -> str:
        """``line`` (a JSON object) with its ``phases`` entry (fcit_hpc.timers; volatile, like
        ``seconds``); unchanged when there is none."""
        if phases is None:
            return line
        return json.dumps({**json.loads(line), "phases": phases})

    @staticmethod
    def privacy_line(st: RunState, stage: int) -> str:
        """The JSON line of ε at δ after ``stage`` (DP runs)."""
        cfg = yaml.safe_load(st.config_yaml) or {}
        p = cfg.get("privacy", {})
        return json.dumps(
            {
                "kind": "privacy",
                "stage": int(stage),
                "epsilon": float(st.privacy_epsilon[stage]),
                "delta": p.get("dp_delta"),
                "dp": p.get("dp"),
                "noise_multiplier": p.get("dp_noise"),
                "rounds": int((st.rounds["stage"] <= stage).sum()),
            }
        )

    @staticmethod
    def round_line(r, clients, norms=None) -> str:
        """The JSON line of round record ``r`` (ROUND_DTYPE) with its ``clients`` records (and,
        under DP, its clients' update norms before clipping and the clip bound: ``norms``)."""
        cs = clients[(clients["stage"] == r["stage"]) & (clients["round"] == r["round"])]
        extra = {}
        if norms is not None and norms.size:
            ns = norms[(norms["stage"] == r["stage"]) & (norms["round"] == r["round"])]
            if ns.size:
                extra["dp"] = {
                    "clip": float(ns["clip"][0]),
                    "clipped": int((ns["norm"] > ns["clip"]).sum()),
                    "norms": {str(int(n["client"])): round(float(n["norm"]), 6) for n in ns},
                }
        return json.dumps(
            {
                "kind": "round",
                "stage": int(r["stage"]),
                "round": int(r["round"]),
                "loss": float(r["loss"]),
                "samples": int(r["samples"]),
                "seconds": round(float(r["seconds"]), 4),
                "bytes_sent": int(r["bytes_sent"]),
                "bytes_recv": int(r["bytes_recv"]),
                "accepted": int(r["accepted"]),
                "rejected": int(r["rejected"]),
                "num_subspaces": int(r["num_subspaces"]),
                "clients": [
                    {
                        "client": int(c["client"]),
                        "unit": int(c["unit"]),
                        "subspace": int(c["subspace"]),
                        "samples": int(c["samples"]),
                        "status": STATUS[int(c["status"])],
                        "similarity": None
                        if np.isnan(c["similarity"])
                        else round(float(c["similarity"]), 4),
                        "dko": int(c["dko_action"]),
                    }
                    for c in cs
                ],
                **extra,
            }
        )

    @staticmethod
    def eval_line(stage, acc, names) -> str:
        """The JSON line of a stage's evaluation (accuracy per task name)."""
        return json.dumps(
            {
                "kind": "eval",
                "stage": int(stage),
                "accuracy": {n: float(a) for n, a in zip(names, acc, strict=True)},
            }
        )

    def append(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.trackers is not None:
            self.trackers.line(line)
