"""The multimodal projector of a LLaVA model (vision features → language-model embeddings) as one
flat float32 vector: what clients train beside their LoRA subspace and the server averages.

The reference code trains the projector with its own learning rate (2e-5, ``train.projector_lr``)
and averages it over the clients of every round; a text-only model has none (an empty vector).
"""

from __future__ import annotations

import torch

# where transformers keeps it: LlavaForConditionalGeneration.multi_modal_projector (<= 4.51) or
# .model.multi_modal_projector (later releases)
_NAMES = ("multi_modal_projector", "model.multi_modal_projector")


def projector_module(model) -> torch.nn.Module | None:
    for name in _NAMES:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    return None


def projector_name(model) -> str | None:
    """The projector's module path in ``model`` (for PEFT's ``modules_to_save``)."""
    for name in _NAMES:
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            continue
    return None


def projector_params(model) -> list[torch.nn.Parameter]:
    mod = projector_module(model)
    return [] if mod is None else list(mod.parameters())


def projector_numel(model) -> int:
    return sum(p.numel() for p in projector_params(model))


@torch.no_grad()
def get_projector(model) -> torch.Tensor:
    """Flat float32 copy of the projector's weights (empty without one)."""
    ps = projector_params(model)
    if not ps:
        return torch.zeros(0)
    return torch.cat([p.detach().float().reshape(-1) for p in ps])


@torch.no_grad()
def set_projector(model, vec) -> None:
    """Load a flat float32 vector into the projector (in the model's dtype and device)."""
    vec = torch.as_tensor(vec, dtype=torch.float32)
    ps = projector_params(model)
    n = sum(p.numel() for p in ps)
    if vec.numel() != n:
        raise ValueError(f"projector vector has {vec.numel()} values, expected {n}")
    off = 0
    for p in ps:
        p.copy_(vec[off : off + p.numel()].view_as(p))
        off += p.numel()
