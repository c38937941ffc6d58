"""What a method decides: how many subspaces, which one each client trains, how inference gates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fcit_hpc.config import Config

MATCHED, NEW, FULL = 1, 2, 3  # server decisions on a client's subspace (DKO)
ACTIONS = {0: "none", MATCHED: "matched", NEW: "new", FULL: "full->nearest"}


@dataclass
class DkoDecision:
    client: int
    subspace: int
    similarity: float  # best cosine similarity before the decision (nan when no token existed)
    action: int


class Method:
    """A federated continual method's behaviour, as hooks the server, the clients and evaluation
    call. A method is one file in ``methods/`` plus one line in :data:`fcit_hpc.registry.METHODS`.

    - slots: :meth:`num_slots` subspaces allocated; :meth:`assign` (server, with identity tokens)
      or :meth:`stage_subspace` (without) says which one a client trains;
    - client: :meth:`training_context` (frozen subspaces beside it), :meth:`client_terms` (extra
      loss terms);
    - stage end: :meth:`stage_end_upload` (clients) and :meth:`merge_stage_end` (server), when
      ``has_stage_end``;
    - inference: :meth:`set_inference` gates the subspaces for a batch of test samples.
    """

    name = "base"
    trains = True  # False: no federated training at all (zero-shot)
    uses_identity = False  # clients upload identity tokens (DKO)
    has_stage_end = False  # a stage-end phase after the last round of every stage (EWC's Fisher)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def num_slots(self) -> int:
        """S_max: subspaces allocated in the global adapter."""
        return 1

    def check_stages(self, num_stages: int) -> None:
        """Raise a ConfigError when the method cannot run this many stages."""

    def assign(
        self, state, clients: list[int], tokens: list[np.ndarray], samples: list[int]
    ) -> list[DkoDecision]:
        """Server: the subspace each client trains this round (client-id order)."""
        return [DkoDecision(c, 0, float("nan"), MATCHED) for c in clients]

    def stage_subspace(self, stage: int) -> int:
        """Methods without identity tokens: the subspace every client trains in this stage."""
        return 0

    def training_context(self, k: int) -> tuple[int, ...]:
        """Subspaces that act (frozen) beside subspace k while it is trained."""
        return ()

    def client_terms(self, adapter, k: int, context: dict, params: list, view) -> list:
        """Zero-argument loss terms a client adds while training subspace k (``params``, loaded
        at the global values; ``context``: the frozen subspaces; ``view``: the global state)."""
        return []

    def stage_end_upload(self, model, adapter, view, batches) -> np.ndarray:
        """Client, at the end of a stage: the statistic it uploads (float32, flat)."""
        raise NotImplementedError

    def merge_stage_end(self, st, uploads: list[tuple[np.ndarray, int]], stage: int) -> None:
        """Server: merge the accepted (values, samples) uploads of the stage into ``st``."""
        raise NotImplementedError

    def set_inference(self, adapter, state, features: np.ndarray | None) -> None:
        """Configure the adapter for a batch of B test samples (features: their identity
        features [B, D], None without an identity encoder); a per-sample gate is α [B, S_live]."""
        adapter.train_subspace(0)
