"""What a rank does on the server's side of the loop. Every rank runs the same driver
(:mod:`fcit_hpc.fed.loop`); its role is decided once: rank 0 is the :class:`~fcit_hpc.fed.server.
Server`, every other rank a :class:`Role`, which holds no global state and decides nothing (each of
its answers is what a non-root rank passes to a collective: nothing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fcit_hpc.state.schema import RunState


@dataclass
class PrivateRound:
    """What the server gets of a round's privacy steps (:func:`fcit_hpc.fed.loop.private_results`):
    the gathered DP norm rows, secure aggregation's group sums and protocol bytes per client, and
    the subspace of every client that trained (to tell the ones that did not upload)."""

    norms: list | None
    sums: dict | None
    sent: dict
    trainers: dict


class Role:
    """A client-only rank: no state, no plans, no decisions."""

    def cursor(self) -> np.ndarray | None:
        """int64 [3]: (stage, round, done) to continue from."""
        return None

    def start_progress(self, start_stage: int, last_round: int, num_rounds: int) -> None:
        pass

    def plan(self, stage: int, round_: int) -> np.ndarray | None:
        """The round plan (int64 [n, 3]: client, unit, rank)."""
        return None

    def state(self) -> RunState | None:
        """The global state (for the broadcast of adapter, tokens, ...)."""
        return None

    def dko(self, heads, values) -> np.ndarray | None:
        """The subspace of every client (int64 [n, 2]) from the gathered identity tokens."""
        return None

    def dp_clip(self) -> np.ndarray | None:
        """float64 [1]: the DP clip bound C of the round (adaptive clipping moves it)."""
        return None

    def residuals(self, plan: np.ndarray) -> list | None:
        """Error feedback: the stored residuals of each rank's clients of the round, packed per
        rank (:func:`fcit_hpc.fed.compress.residual_parts`)."""
        return None

    def keep_residuals(self, residuals: dict | None) -> None:
        """Error feedback: store the residuals the round's clients changed."""

    def use_subspace(self, k: int) -> None:
        """Without identity tokens: subspace k is trained this round."""

    def end_round(
        self,
        stage: int,
        round_: int,
        plan,
        heads,
        *,
        values,
        t0: float,
        down0: int,
        phases=None,
        private: PrivateRound | None = None,
    ):
        """Aggregate the gathered updates, record and store the round. ``phases``: every rank's
        phase timer vector (:func:`fcit_hpc.timers.take`), rank 0's only; ``private``: the
        round's privacy results, None without them."""

    def after_rounds(self, stage: int) -> None:
        pass

    def stage_end_todo(self, stage: int) -> np.ndarray | None:
        """int64 [1]: 1 when the stage-end phase of ``stage`` is still to run."""
        return None

    def merge_stage_end(self, stage: int, heads, values) -> None:
        pass

    def needs_eval(self, stage: int) -> np.ndarray | None:
        """int64 [1]: 1 when ``stage`` has not been evaluated yet."""
        return None

    def record_eval(self, stage: int, result, phases=None) -> None:
        """Store an evaluation (a ``StageEval``: accuracy and predictions, rank 0's only);
        ``phases``: as in :meth:`end_round`."""

    def end_stage(self, stage: int) -> None:
        pass

    def stop_message(self, reason: str) -> str:
        """Where the run stopped on a stop signal (``reason``), for the log (rank 0's only)."""
        return ""

    def finish(self, report_missing_only: bool = False) -> RunState | None:
        """The final state (the server's), after the summary and the report (only when it is
        missing: ``report_missing_only``, a resume of a run whose end was stored)."""
        return None
