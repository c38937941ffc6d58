"""LwF (Li & Hoiem, Learning without Forgetting, 2016) as a federated continual baseline: one LoRA
shared by all clients (as Finetune), plus a distillation term on the previous stage's model.

Every client adds, over its batch's answer tokens (the target tokens of the next-token loss),

    λ · T² · mean_tokens KL( softmax(z_old / T) ‖ softmax(z / T) )

where z are the logits of the model being trained and z_old those of the same model with the
previous stage's global adapter (the adapter at the end of stage s − 1, kept by the server in the
method's state and broadcast to every rank; none in stage 0, which is then Finetune exactly).
λ = ``method.lwf_lambda``, T = ``method.lwf_temperature`` (Li & Hoiem: λ_o = 1, T = 2).

The KL form is used rather than the paper's modified cross-entropy: both differ by the entropy
of softmax(z_old / T), a constant of the trained parameters, so their gradients are identical;
the KL is 0 when the model equals the previous one (a checkable value, and the logged loss does
not carry a constant offset).

State (``/method/lwf``): ``previous`` float32 [P], the adapter at the end of the last completed
stage (empty before the first stage ends), set by the server at every stage's end
(:meth:`LwF.after_stage`) and broadcast each round (``client_arrays``).

The teacher's logits are computed per batch before the student's forward, by loading the previous
adapter into the trained subspace and restoring it exactly (no gradient, dropout off), so no
second model is held; this needs the LoRA parameters whole on the rank, so DeepSpeed ZeRO-3
(partitioned parameters) is refused. The teacher is the previous adapter on the current model:
with a trained LLaVA projector (``train.projector_lr`` > 0) the projector is the current global
one, not the previous stage's (the main job freezes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fcit_hpc.data.batches import packed_kwargs
from fcit_hpc.errors import ConfigError, StateError
from fcit_hpc.methods.base import Settings, SingleLoRA
from fcit_hpc.state.schema import MethodState


def distill_sum(logits, old_logits, labels, temperature: float) -> torch.Tensor:
    """T² · Σ over the target tokens of KL(softmax(z_old/T) ‖ softmax(z/T)) (float32).
    ``logits``, ``old_logits``: [B, L, V]; ``labels``: [B, L] (-100: no target). Position t's
    logits predict label t + 1, as in the model's loss."""
    mask = labels[:, 1:] != -100  # [B, L-1]
    z = logits[:, :-1][mask].float() / temperature  # [N, V]
    z_old = old_logits[:, :-1][mask].float() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    log_q = torch.log_softmax(z_old, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum()
    return kl * temperature**2


class Distillation:
    """The LwF batch term of one client's local training: before the model's forward,
    :meth:`prepare` computes the previous model's logits on the batch (no gradient; the trained
    subspace is swapped for the previous adapter and restored exactly); then the term is
    λ · :func:`distill_sum`."""

    def __init__(self, model, adapter, previous: np.ndarray, lam: float, *, temperature: float):
        self.model, self.adapter = model, adapter
        self.previous, self.lam, self.t = previous, lam, temperature
        self.old_logits = None

    @torch.no_grad()
    def prepare(self, batch: dict) -> None:
        current = self.adapter.get(0).clone()
        was_training = self.model.training
        self.model.eval()  # the teacher without dropout (and without drawing random numbers)
        try:
            self.adapter.set(0, self.previous)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            self.old_logits = self.model(**inputs, **packed_kwargs(inputs)).logits.detach()
        finally:
            self.adapter.set(0, current)
            self.model.train(was_training)

    def __call__(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        old, self.old_logits = self.old_logits, None
        return self.lam * distill_sum(logits, old, batch["labels"], self.t)


@dataclass(frozen=True)
class LwfSettings(Settings):
    lwf_lambda: float  # distillation weight λ
    lwf_temperature: float  # distillation temperature T


class LwF(SingleLoRA):
    name = "lwf"
    client_arrays = ("previous",)
    settings_class = LwfSettings
    # the teacher's forward per batch, as a share of a training step: measured on the main job
    # (clean clone, 2026-12-06, 2 CPU ranks): LwF's rounds 185.9 s against Finetune's 118.7 s, the
    # teacher running in 7 of 8 stages: (185.9 / 118.7 - 1) / (7 / 8) = 0.65
    extra_forward = 0.65

    def check_trainer(self, backend, zero_stage):
        if backend == "deepspeed" and zero_stage == 3:
            raise ConfigError(
                "train.zero_stage: LwF loads the previous adapter into the trained LoRA for its "
                "teacher's forward, which needs whole parameters; use zero_stage 0, 1 or 2"
            )

    def init_state(self, numel):
        return MethodState(self.name, {"previous": np.zeros(0, np.float32)})

    def validate_state(self, ms, numel, where):
        super().validate_state(ms, numel, where)
        if ms.arrays["previous"].size not in (0, numel):
            raise StateError(
                f"{where}: /method/lwf/previous has {ms.arrays['previous'].size} values, "
                f"/global/adapter {numel} per subspace"
            )

    def after_stage(self, st, stage):
        """The stage's final global adapter becomes the next stage's teacher."""
        st.method.arrays["previous"] = st.adapter[0].copy()

    def batch_terms(self, model, adapter, k, view):
        prev = view.method.arrays["previous"]
        m = self.settings
        if not prev.size or m.lwf_lambda <= 0:
            return []
        return [Distillation(model, adapter, prev, m.lwf_lambda, temperature=m.lwf_temperature)]
