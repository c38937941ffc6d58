"""O-LoRA (Wang et al., 2023) as a federated continual baseline: stage t trains a fresh LoRA
subspace t (FedAvg over the stage's clients) while the subspaces of earlier stages act frozen
beside it; the loss adds λ·Σ_i ‖A_i A_t^T‖_F², which keeps the new subspace's input side
orthogonal to the earlier ones. At inference every learned subspace is used with weight 1."""

from __future__ import annotations

import torch

from fcit_hpc.errors import ConfigError
from fcit_hpc.methods.base import Method


class OLoRA(Method):
    name = "olora"

    def num_slots(self) -> int:
        return self.cfg.lora.max_subspaces

    @property
    def ortho_lambda(self) -> float:
        return self.cfg.method.olora_lambda

    def check_stages(self, num_stages: int) -> None:
        if num_stages > self.num_slots():
            raise ConfigError(
                f"lora.max_subspaces: O-LoRA needs one subspace per stage, {num_stages} stages "
                f"but max_subspaces = {self.num_slots()}"
            )

    def stage_subspace(self, stage: int) -> int:
        return stage

    def training_context(self, k: int) -> tuple[int, ...]:
        return tuple(range(k))

    def set_inference(self, adapter, state, feature) -> None:
        live = max(1, state.num_subspaces)
        adapter.set_activation(torch.ones(1, live))
