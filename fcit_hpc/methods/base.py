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
    name = "base"
    trains = True  # False: no federated training at all (zero-shot)
    uses_identity = False  # clients upload identity tokens (DKO)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def num_slots(self) -> int:
        """S_max: subspaces allocated in the global adapter."""
        return 1

    def assign(
        self, state, clients: list[int], tokens: list[np.ndarray], samples: list[int]
    ) -> list[DkoDecision]:
        """Server: the subspace each client trains this round (client-id order)."""
        return [DkoDecision(c, 0, float("nan"), MATCHED) for c in clients]

    def check_stages(self, num_stages: int) -> None:
        """Raise a ConfigError when the method cannot run this many stages."""

    def stage_subspace(self, stage: int) -> int:
        """Methods without identity tokens: the subspace every client trains in this stage."""
        return 0

    def training_context(self, k: int) -> tuple[int, ...]:
        """Subspaces that act (frozen) beside subspace k while it is trained."""
        return ()

    ortho_lambda = 0.0  # weight of an orthogonality loss to the context subspaces (O-LoRA)
    needs_fisher = False  # a Fisher phase at the end of every stage (EWC)
    ewc_lambda = 0.0

    def set_inference(self, adapter, state, feature: np.ndarray | None) -> None:
        """Configure the adapter for one test sample (feature: its instruction feature [D])."""
        adapter.train_subspace(0)
