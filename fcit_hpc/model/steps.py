"""The learning-rate schedule every training loop shares (local training, embedded pre-training)."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, base_lr: float, warmup_ratio: float) -> float:
    """Linear warm-up over ceil(warmup_ratio·total) steps, then cosine decay to 0."""
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return base_lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_steps(batches, param_groups, base_lr: float, warmup_ratio: float, *, forward, step):
    """The training loop every trainer shares: per batch, the scheduled learning rate into the
    optimizer's ``param_groups``, ``loss = forward(batch)``, then ``step(i, loss)`` (backward and
    optimizer step, plus whatever the caller adds). Returns the task losses (floats), read from
    the device once at the end rather than synchronising on every step."""
    import torch

    losses = []
    for i, batch in enumerate(batches):
        for g in param_groups:  # a group with its own "base_lr" (the projector) scales alike
            g["lr"] = lr_at(i, len(batches), g.get("base_lr", base_lr), warmup_ratio)
        loss = forward(batch)
        losses.append(loss.detach().float().reshape(()))
        step(i, loss)
    return torch.stack(losses).cpu().tolist() if losses else []
