"""What the loop asks of evaluation: a stage's accuracy and predictions (all ranks), the run's
summary and report (the server)."""

from __future__ import annotations

from pathlib import Path

from fcit_hpc.fed.server.predictions import StageEval
from fcit_hpc.state.schema import RunState


class Evaluation:
    def evaluate(self, ctx, view: RunState) -> StageEval | None:
        """Accuracy (0–100) per task and the predictions on rank 0, None elsewhere."""
        from fcit_hpc.eval.generate import evaluate

        return evaluate(ctx, view)

    def finalize(self, st: RunState, ctx) -> None:
        """The run's summary into ``st`` (server, at the end), from its context."""
        from fcit_hpc.eval.summary import finalize

        finalize(ctx, st)

    def report(self, run_dir: Path, st: RunState) -> None:
        from fcit_hpc.eval.report import write_report

        write_report(run_dir, st)
