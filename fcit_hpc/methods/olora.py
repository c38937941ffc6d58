"""O-LoRA (Wang et al., 2023) as a federated continual baseline: stage t trains a fresh LoRA
subspace t (FedAvg over the stage's clients) while the subspaces of earlier stages act frozen
beside it; the loss adds λ·Σ_i ‖A_i A_t^T‖_F², which keeps the new subspace's input side
orthogonal to the earlier ones. At inference every learned subspace is used with weight 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fcit_hpc.errors import ConfigError
from fcit_hpc.methods.base import Method, Settings


def ortho_term(news, olds, lam: float) -> torch.Tensor:
    """O-LoRA: λ·Σ_layers Σ_i ‖A_i A_new^T‖_F² (A [r, in]: rows span a subspace's input side)."""
    total = 0.0
    for a_new, prev in zip(news, olds, strict=True):
        for a_old in prev:
            total = total + ((a_old @ a_new.t()) ** 2).sum()
    return lam * total


def ortho_terms(adapter, k: int, context: dict, lam: float) -> list:
    """The orthogonality term of subspace k's A to the context subspaces' (none when λ = 0)."""
    if lam <= 0 or not context:
        return []
    olds = [[m.lora_A[i].detach() for i in sorted(context)] for m in adapter.layers]
    news = [m.lora_A[k] for m in adapter.layers]
    return [lambda: ortho_term(news, olds, lam)]


@dataclass(frozen=True)
class OLoraSettings(Settings):
    olora_lambda: float  # orthogonality weight λ1


class OLoRA(Method):
    name = "olora"
    settings_class = OLoraSettings

    def num_slots(self) -> int:
        return self.lora.max_subspaces

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

    def client_terms(self, adapter, k, context, params, *, view):
        return ortho_terms(adapter, k, context, self.settings.olora_lambda)

    def set_inference(self, adapter, state, features) -> None:
        live = max(1, state.num_subspaces)
        adapter.set_activation(torch.ones(1, live))  # one row: every sample of the batch alike
