"""MoELoRA as CoIN benchmarks it (Chen et al., "CoIN: A Benchmark of Continual Instruction tuNing
for Multimodal Large Language Model", NeurIPS 2024 Datasets and Benchmarks; code:
github.com/zackschen/CoIN, ``CoIN/peft/tuners/coinmoelora.py``, the same file in the FCIT
authors' MCITlib ``MoELoRA/``), as a federated continual baseline.

Per wrapped linear, the LoRA of rank R = S_max·r is split into E experts of rank R/E
(``method.experts``; CoIN asserts R divisible by E). A router without bias, W_r [E, in], reads the
layer input x (before dropout) and gives dense softmax weights per token, no top-k, no load-
balancing loss: ``y = W0 x + scaling · Σ_j softmax(W_r x)_j · B_j A_j dropout_j(x)``, each expert
with its own dropout mask (CoIN calls the dropout module inside its loop over experts).
Initialisation as CoIN: A ~ N(0, 0.01), B = 0, W_r as ``nn.Linear``'s default (Kaiming-uniform,
a = √5: U(±1/√in)). The router is a ``lora_`` parameter there, so it trains with the LoRA learning
rate. In the federation every client trains all experts and the routers of every layer; the server
averages both, sample-weighted. At inference every expert is mixed by the router. A PEFT LoRA
adapter cannot hold the router, so ``fcit export`` refuses this method.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fcit_hpc.host import to_host
from fcit_hpc.methods.base import Mixture


class TokenRouter(nn.Module):
    """One layer's router: softmax(x W_rᵀ) over its E experts, per token (float32 weight)."""

    def __init__(self, in_features: int, experts: int, device=None):
        super().__init__()
        self.experts = experts
        self.weight = nn.Parameter(torch.zeros(experts, in_features, device=device))  # [E, in]

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """[..., E, 1] in x's dtype (softmax taken in float32)."""
        logits = x @ self.weight.to(x.dtype).t()  # [..., E]
        return torch.softmax(logits.float(), dim=-1).to(x.dtype).unsqueeze(-1)


class MoELoRA(Mixture):
    name = "moelora"

    def make_mixer(self, layer) -> TokenRouter:
        return TokenRouter(layer.base.in_features, self.experts, layer.lora_A[0].device)

    def initial_weights(self, adapter, generator):
        """Subspaces as every method's (A ~ N(0, 0.01), B = 0), then each layer's router
        U(±1/√in), drawn in that order from ``generator``."""
        vecs, _ = super().initial_weights(adapter, generator)
        parts = []
        for m in adapter.layers:
            bound = 1.0 / math.sqrt(m.base.in_features)
            shape = (self.experts, m.base.in_features)
            w = torch.rand(shape, generator=generator) * (2 * bound) - bound
            parts.append(w.reshape(-1))
        return vecs, to_host(torch.cat(parts))

    def export(self, model, st, out_dir, alpha):
        raise ValueError(
            "MoELoRA mixes its experts with a per-token router (a softmax of the layer input), "
            "which a PEFT LoRA adapter cannot express; nothing was exported"
        )


__all__ = ["MoELoRA", "TokenRouter"]
