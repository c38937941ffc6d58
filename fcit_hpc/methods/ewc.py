"""EWC (Kirkpatrick et al., 2017) as a federated continual baseline: one LoRA shared by all clients
(as Finetune), plus (λ/2)·Σ F·(θ − θ*)² in every local loss. At the end of each stage the clients
of its last round compute the diagonal Fisher of their data at the global adapter; the server
averages them (sample-weighted), adds the mean to the running Fisher F and sets the anchor θ* to
the adapter of that stage (online EWC with γ = 1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fcit_hpc.data.batches import packed_kwargs
from fcit_hpc.errors import StateError
from fcit_hpc.host import to_host
from fcit_hpc.methods.base import Settings, SingleLoRA
from fcit_hpc.state.schema import MethodState


def ewc_term(params, fisher, anchor, lam: float) -> torch.Tensor:
    """EWC: (λ/2)·Σ F·(θ − θ*)²."""
    return (
        0.5
        * lam
        * sum((f * (p - a) ** 2).sum() for p, f, a in zip(params, fisher, anchor, strict=True))
    )


def fisher_diagonal(model, adapter, vec, batches) -> np.ndarray:
    """Empirical diagonal Fisher of subspace 0 at ``vec``: mean over the batches of the squared
    gradient of the batch loss (flat float32, the subspace's layout)."""
    adapter.set(0, vec)
    adapter.train_subspace(0)
    params = adapter.params(0)
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    model.eval()  # no dropout: the Fisher of the model as it is used
    for batch in batches:
        grads = torch.autograd.grad(model(**batch, **packed_kwargs(batch)).loss, params)
        for a, g in zip(acc, grads, strict=True):
            a += g.detach().float() ** 2
    n = max(1, len(batches))
    return to_host(torch.cat([a.reshape(-1) / n for a in acc]))


def ewc_terms(adapter, params, fisher: np.ndarray, anchor: np.ndarray, *, lam: float) -> list:
    """The EWC loss term over ``params`` (none when there is no Fisher yet or λ = 0)."""
    if not fisher.size or lam <= 0:
        return []
    f, a = adapter.unflatten(fisher), adapter.unflatten(anchor)
    return [lambda: ewc_term(params, f, a, lam)]


@dataclass(frozen=True)
class EwcSettings(Settings):
    ewc_lambda: float  # penalty weight λ


class EWC(SingleLoRA):
    """State (``/method/ewc``): ``fisher`` float32 [P] (empty before the first stage end),
    ``anchor`` float32 [P] (idem), counter ``stages`` (stages consolidated)."""

    name = "ewc"
    has_stage_end = True
    stage_end_label = "Fisher"
    client_arrays = ("fisher", "anchor")
    settings_class = EwcSettings

    def init_state(self, numel):
        empty = np.zeros(0, np.float32)
        return MethodState(self.name, {"fisher": empty, "anchor": empty.copy()}, {"stages": 0})

    def validate_state(self, ms, numel, where):
        super().validate_state(ms, numel, where)
        f, a = ms.arrays["fisher"], ms.arrays["anchor"]
        if f.shape != a.shape or f.size not in (0, numel):
            raise StateError(
                f"{where}: /method/ewc fisher {f.shape} and anchor {a.shape} do not fit "
                f"/global/adapter ({numel} values per subspace)"
            )
        if ms.counters["stages"] < 0:
            raise StateError(f"{where}: /method/ewc stages {ms.counters['stages']} < 0")

    def stage_end_done(self, ms, stage):
        return ms.counters["stages"] > stage

    def client_terms(self, adapter, k, context, params, *, view):
        ms = view.method
        lam = self.settings.ewc_lambda
        return ewc_terms(adapter, params, ms.arrays["fisher"], ms.arrays["anchor"], lam=lam)

    def stage_end_upload(self, model, adapter, view, batches):
        return fisher_diagonal(model, adapter, view.adapter[0], batches)  # float32

    def merge_stage_end(self, st, uploads, stage):
        """F ← F + Σ n_k F_k / Σ n_k (float64 sums), θ* ← this stage's adapter."""
        numel, ms = st.adapter.shape[1], st.method
        acc, total = np.zeros(numel, np.float64), 0
        for f, n in uploads:
            acc += f.astype(np.float64) * n
            total += n
        if total:
            prev = ms.arrays["fisher"]
            prev = prev if prev.size else np.zeros(numel, np.float32)
            ms.arrays["fisher"] = (prev.astype(np.float64) + acc / total).astype(np.float32)
            ms.arrays["anchor"] = st.adapter[0].copy()
        ms.counters["stages"] = stage + 1
