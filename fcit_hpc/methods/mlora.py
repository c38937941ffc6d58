"""M-LoRA, read as MultiLoRA (Wang et al., "MultiLoRA: Democratizing LoRA for Better Multi-Task
Learning", arXiv 2311.11501), as a federated continual baseline.

The FCIT paper (Guo et al., ICCV 2025) compares with an "M-LoRA" and releases no baseline code;
MultiLoRA is the multi-task LoRA variant the name matches (see docs/usage.md for what could and
could not be checked). MultiLoRA scales LoRA horizontally into E parallel modules, each with a
learnable scaling factor, and changes the initialisation so that the modules start apart:
``y = W0 x + scaling · Σ_j s_j ⊙ B_j A_j dropout_j(x)`` with A_j and B_j Kaiming-uniform (a = √5,
U(±1/√fan_in)) and s_j = 0, so that the update starts at zero. Here E = ``method.experts`` modules
of rank S_max·r / E share DISCO's LoRA budget; s_j is one number per module
(``method.mlora_scaling: scalar``, the paper's "scaling factor") or one per output feature
(``vector``, as some reproductions do). There is no router. Every client trains all modules and
scales; the server averages both, sample-weighted. The sum is one LoRA of rank S_max·r, so
``fcit export`` writes it exactly as one merged PEFT adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fcit_hpc.methods.base import Mixture, MixtureSettings


class ModuleScales(nn.Module):
    """One layer's learnable scaling factors: s [E, 1] (per module) or [E, out] (per module and
    output feature), float32."""

    def __init__(self, experts: int, width: int, device=None):
        super().__init__()
        self.experts = experts
        self.weight = nn.Parameter(torch.zeros(experts, width, device=device))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.to(x.dtype)  # [E, K]


def _uniform(shape, fan_in: int, generator) -> torch.Tensor:
    """Kaiming-uniform with a = √5 (``nn.Linear``'s default): U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.rand(shape, generator=generator) * (2 * bound) - bound


@dataclass(frozen=True)
class MLoraSettings(MixtureSettings):
    mlora_scaling: str  # scalar (per module) | vector (per module and output feature)


class MLoRA(Mixture):
    name = "mlora"
    settings_class = MLoraSettings

    def make_mixer(self, layer) -> ModuleScales:
        width = 1 if self.settings.mlora_scaling == "scalar" else layer.base.out_features
        return ModuleScales(self.experts, width, layer.lora_A[0].device)

    def initial_weights(self, adapter, generator):
        """Per layer (module order): every module's A_j [R/E, in] and B_j [out, R/E]
        Kaiming-uniform, drawn as A_cat [R, in] then B_cat [out, R]; the scales zero."""
        s_max, r = self.num_slots(), adapter.r
        vecs = np.zeros((s_max, adapter.numel), np.float32)
        off, width = 0, 0
        for m in adapter.layers:
            n_in, n_out = m.base.in_features, m.base.out_features
            a_cat = _uniform((s_max * r, n_in), n_in, generator)
            b_cat = _uniform((n_out, s_max * r), self.expert_rank, generator)
            na, nb = r * n_in, n_out * r
            for k in range(s_max):
                vecs[k, off : off + na] = a_cat[k * r : (k + 1) * r].reshape(-1).numpy()
                vecs[k, off + na : off + na + nb] = (
                    b_cat[:, k * r : (k + 1) * r].reshape(-1).numpy()
                )
            off += na + nb
            width += self.experts * (1 if self.settings.mlora_scaling == "scalar" else n_out)
        return vecs, np.zeros(width, np.float32)

    def merged(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's update as one LoRA: (A_cat [R, in], B_cat [out, R] with each module's
        scale folded into its columns); scaling · B_cat A_cat = the layer's update."""
        with torch.no_grad():
            s = layer.s_max
            a_cat = torch.cat(list(layer.lora_A[:s]), 0)
            b_cat = torch.cat(list(layer.lora_B[:s]), 1).clone()
            n = a_cat.shape[0] // self.experts
            g = layer.mixer.weight  # [E, K]
            for j in range(self.experts):
                b_cat[:, j * n : (j + 1) * n] *= g[j].unsqueeze(-1)  # [K, 1]: scalar or per row
        return a_cat, b_cat

    def export(self, model, st, out_dir, alpha):
        """One exact PEFT adapter ``merged/`` of rank S_max·r (the scales folded into B)."""
        from fcit_hpc.model.build import build_model
        from fcit_hpc.model.export import export_lora

        if alpha is not None:
            raise ValueError("--alpha: M-LoRA weighs its modules by its learned scales")
        _, adapter, _ = build_model(model, self.lora, self.num_slots())
        self.install(adapter)
        for k in range(self.num_slots()):
            adapter.set(k, st.adapter[k])
        adapter.set_mixer(st.mixer)
        weights = {n: self.merged(m) for n, m in zip(adapter.names, adapter.layers, strict=True)}
        rank = self.num_slots() * adapter.r
        return [
            export_lora(model, self.lora, st, out_dir, name="merged", weights=weights, rank=rank)
        ]
