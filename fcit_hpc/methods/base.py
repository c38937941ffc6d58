"""What a method decides: how many subspaces, which one each client trains, how inference gates."""

from __future__ import annotations

import numpy as np

from fcit_hpc.config import Config
from fcit_hpc.methods.disco import MATCHED, DkoDecision


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

    def set_inference(self, adapter, state, feature: np.ndarray | None) -> None:
        """Configure the adapter for one test sample (feature: its instruction feature [D])."""
        adapter.train_subspace(0)
