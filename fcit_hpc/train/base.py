"""Local trainer protocol: the one local training loop (warm-up + cosine schedule, task loss plus
the loss terms the strategy and the method add), over a backend session."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fcit_hpc.host import to_host
from fcit_hpc.model.steps import run_steps

# given the trainable parameters (loaded at the start values): zero-argument loss terms
TermsFactory = Callable[[list], list[Callable[[], torch.Tensor]]]


@dataclass
class LocalResult:
    vector: np.ndarray  # float32 [numel] — the trained subspace after local training
    loss: float  # mean training loss over the local steps
    steps: int


@dataclass
class LocalOpt:
    """The local optimizer's settings (AdamW, warm-up over ⌈warmup_ratio·steps⌉, cosine decay)."""

    lr: float
    weight_decay: float
    warmup_ratio: float


def start_local(adapter, k: int, start, context: dict | None = None) -> list:
    """Load the global subspace ``k`` and make it the only trainable one; load the frozen
    ``context`` subspaces ({index: flat vector}, O-LoRA's earlier tasks) that act beside it.
    Returns its parameters."""
    context = context or {}
    for i, vec in sorted(context.items()):
        adapter.set(i, vec)
    adapter.set(k, start)
    adapter.train_subspace(k, tuple(sorted(context)))
    return adapter.params(k)


class LocalSession:
    """One client's optimizer on one backend: ``forward(batch)`` → loss, ``step(loss)`` (backward
    + optimizer step), ``close()``; ``param_groups`` get the scheduled learning rate."""

    param_groups: list

    def forward(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def step(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalTrainer:
    """Trains subspace ``k`` of the adapter from ``start`` on ``batches``. The loop is shared; a
    backend (plain torch, DeepSpeed ZeRO) only opens a :class:`LocalSession`."""

    def session(self, model, params, lr: float, weight_decay: float) -> LocalSession:
        raise NotImplementedError

    def train(
        self,
        model,
        adapter,
        k: int,
        start: np.ndarray,
        batches,
        opt: LocalOpt,
        context: dict | None = None,
        terms: TermsFactory | None = None,
    ) -> LocalResult:
        """``context``: frozen subspaces beside k ({index: flat vector}); ``terms``: the extra
        loss terms (FedProx, O-LoRA, EWC), built from the parameters once they are loaded."""
        params = start_local(adapter, k, start, context)
        extra = terms(params) if terms is not None else []
        sess = self.session(model, params, opt.lr, opt.weight_decay)
        losses = []

        def step(_, loss):
            sess.step(loss + sum(t() for t in extra) if extra else loss)

        try:
            groups = sess.param_groups
            losses = run_steps(batches, groups, opt.lr, opt.warmup_ratio, sess.forward, step)
        finally:
            vec = to_host(torch.cat([p.detach().float().reshape(-1) for p in params]))
            sess.close()
        model.eval()
        return LocalResult(vec, sum(losses) / max(1, len(losses)), len(batches))
