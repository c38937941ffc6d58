"""A federated run with evaluation: what ``fcit run`` and ``compare`` start on every rank."""

from __future__ import annotations

from pathlib import Path

from fcit_hpc.config import Config
from fcit_hpc.eval.stage import Evaluation
from fcit_hpc.fed import loop
from fcit_hpc.fed.comm import Comm
from fcit_hpc.state.schema import RunState


def run_federated(
    cfg: Config, comm: Comm, run_dir: Path, state: RunState | None, runtime=None
) -> RunState | None:
    """Run (or continue) the whole schedule; the final state on rank 0, None elsewhere."""
    return loop.run_federated(cfg, comm, run_dir, state, Evaluation(), runtime)
