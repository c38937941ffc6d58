"""Local trainer protocol: the one local training loop (warm-up + cosine schedule, task loss plus
the loss terms the strategy and the method add), over a backend session.

A client group (``train.gpus_per_client`` = G > 1) trains one client data-parallel: every member
builds the same batches, takes rows ``member::G`` of each, and the gradients are summed over the
group. The loss of a member is its tokens' cross-entropy summed and divided by the target tokens of
the whole batch, so the summed gradient is the gradient of the batch's mean token loss, as with
G = 1 (up to the order of the sums). With G = 1 the model's own loss is used unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fcit_hpc.data.batches import packed_kwargs
from fcit_hpc.host import to_host
from fcit_hpc.model.liger import logits_kwargs
from fcit_hpc.model.steps import run_steps

# given the trainable parameters (loaded at the start values): zero-argument loss terms
TermsFactory = Callable[[list], list[Callable[[], torch.Tensor]]]


class BatchTerm(Protocol):
    """A loss term that depends on the batch and the model's outputs (LwF's distillation).
    :meth:`prepare` runs before the model's forward on the batch (e.g. a teacher's forward,
    without gradient); the call returns the term SUMMED over the batch's target tokens (a
    float32 scalar with gradient), which the trainer divides by the batch's target tokens, as
    the task loss is a mean over them (in a client group: the whole batch's, so members' shares
    add up to the term of the batch)."""

    def prepare(self, batch: dict) -> None: ...

    def __call__(self, batch: dict, logits: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LocalResult:
    vector: np.ndarray  # float32 [len(ks)·numel]: the trained subspaces after local training
    loss: float  # mean training loss over the local steps
    steps: int
    sides: list[np.ndarray] = field(default_factory=list)  # float32: each side group after it


@dataclass
class Side:
    """Parameters trained beside the subspaces in their own optimizer group (the LLaVA projector
    with its learning rate, a method's mixer with the LoRA one): the parameters, their learning
    rate and their exact float32 start (flat)."""

    params: list
    lr: float
    start: np.ndarray


@dataclass
class LocalOpt:
    """The local optimizer's settings (AdamW, warm-up over ⌈warmup_ratio·steps⌉, cosine decay)."""

    lr: float
    weight_decay: float
    warmup_ratio: float


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on the training device (a no-op on the CPU)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass(frozen=True)
class Shard:
    """This rank's part of a client group's batches: rows ``member::size``."""

    member: int
    size: int

    def take(self, batch: dict) -> tuple[dict, float]:
        """(rows of this member, weight); a member without rows (a batch smaller than the
        group) runs row 0 at weight 0 so that it still joins the gradient reduction."""
        n = batch["input_ids"].shape[0]
        rows = list(range(self.member, n, self.size))
        if not rows:
            return {k: v[:1] for k, v in batch.items()}, 0.0
        return {k: v[rows] for k, v in batch.items()}, 1.0


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a causal-LM batch (labels shifted by one, -100 ignored)."""
    return int((labels[:, 1:] != -100).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy over the target tokens (next-token, float32 logits, -100 ignored)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def split_like(params, vec) -> list[torch.Tensor]:
    """A flat float32 vector as tensors shaped like ``params``."""
    vec = torch.as_tensor(np.asarray(vec, dtype=np.float32))
    out, off = [], 0
    for p in params:
        out.append(vec[off : off + p.numel()].view(p.shape))
        off += p.numel()
    return out


def subspace_tuple(k: int | Sequence[int]) -> tuple[int, ...]:
    """One subspace index or several, as a tuple."""
    return (int(k),) if isinstance(k, (int, np.integer)) else tuple(int(i) for i in k)


def start_local(adapter, k: int | Sequence[int], start, context: dict | None = None) -> list:
    """Load the global subspaces ``k`` (one, or several whose flat vectors ``start``
    concatenates) and make them the only trainable ones; load the frozen ``context`` subspaces
    ({index: flat vector}, O-LoRA's earlier tasks) that act beside them. Returns their
    parameters, subspace by subspace (the order of ``start``)."""
    ks = subspace_tuple(k)
    context = context or {}
    for i, vec in sorted(context.items()):
        adapter.set(i, vec)
    for i, vec in zip(ks, np.split(np.asarray(start), len(ks)), strict=True):
        adapter.set(i, vec)
    adapter.select(ks, tuple(sorted(context)))
    return [p for i in ks for p in adapter.params(i)]


class LocalSession:
    """One client's optimizer on one backend: ``forward(batch)`` → model output, ``step(loss)``
    (backward, gradient reduction over the client group, optimizer step), ``result(params)`` →
    the trained float32 values, ``close()``; ``param_groups`` get the scheduled learning rate.
    ``group_average``: the backend averages gradients over the group (DeepSpeed) instead of
    summing them."""

    param_groups: list
    group_average = False

    def forward(self, batch):
        raise NotImplementedError

    def step(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self, params) -> torch.Tensor:
        """The trained subspace, flat float32 (the optimizer's master values)."""
        return torch.cat([p.detach().float().reshape(-1) for p in params])

    def close(self) -> None:
        pass


class LocalTrainer:
    """Trains subspace ``k`` of the adapter from ``start`` on ``batches``. The loop is shared; a
    backend (plain torch, DeepSpeed ZeRO) only opens a :class:`LocalSession`. ``runtime``: the
    device, precision and client group (CPU, float32, alone without one)."""

    def __init__(self, runtime=None):
        self.runtime = runtime
        g = runtime.group if runtime is not None else None
        self.shard = Shard(g.ranks.index(runtime.rank), g.size) if g and g.size > 1 else None

    @property
    def device(self):
        return self.runtime.device if self.runtime is not None else torch.device("cpu")

    def session(
        self,
        model,
        params,
        lr: float,
        weight_decay: float,
        *,
        start=None,
        sides: Sequence[Side] = (),
    ) -> LocalSession:
        """``start``: the exact float32 values of ``params`` (a backend that keeps master
        weights apart from the module starts them from these); ``sides``: parameters trained
        beside them, one more optimizer group each, with ``base_lr`` = ``side.lr``."""
        raise NotImplementedError

    def _loss(
        self,
        sess: LocalSession,
        batch: dict,
        batch_terms: Sequence[BatchTerm] = (),
        logits_kw: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(task loss, batch terms) of a batch: the model's mean token loss alone; in a client
        group this member's share of it (module docstring); the batch terms (None without any)
        per target token of the batch, likewise shared. ``logits_kw``: what the model's forward
        needs to return the logits with the loss (Liger's fused loss skips them)."""
        batch = to_device(batch, self.device)
        kw = packed_kwargs(batch)
        if self.shard is None and not batch_terms:
            return sess.forward({**batch, **kw}).loss, None
        total = max(1, target_tokens(batch["labels"]))
        if self.shard is None:
            part, weight = batch, 1.0
            for t in batch_terms:
                t.prepare(part)
            out = sess.forward({**part, **kw, **(logits_kw or {})})
            loss = out.loss
        else:
            part, weight = self.shard.take(batch)
            for t in batch_terms:
                t.prepare(part)
            labels = part.pop("labels")
            out = sess.forward({**part, **kw})
            loss = token_loss_sum(out.logits, labels) * (weight / total)
            part = {**part, "labels": labels}
        if not batch_terms:
            return loss, None
        extra = sum(t(part, out.logits) for t in batch_terms) * (weight / total)
        return loss, extra

    def train(
        self,
        model,
        adapter,
        k: int | Sequence[int],
        start: np.ndarray,
        *,
        batches,
        opt: LocalOpt,
        context: dict | None = None,
        terms: TermsFactory | None = None,
        sides: Sequence[Side] = (),
        tick: Callable[[], None] | None = None,
        batch_terms: Sequence[BatchTerm] = (),
    ) -> LocalResult:
        """Train subspace k, or the subspaces k (``start``: their flat vectors concatenated).
        ``context``: frozen subspaces beside them ({index: flat vector}); ``terms``: the extra
        loss terms (FedProx, O-LoRA, EWC), built from the parameters once they are loaded;
        ``sides``: parameter groups trained beside them (LLaVA projector, a method's mixer);
        ``tick``: called once the session is set up and after every optimizer step (the timing
        hook of ``fcit bench train``: set-up vs step time); ``batch_terms``: loss terms of each
        batch and the model's outputs (:class:`BatchTerm`; LwF), not part of the logged loss."""
        params = start_local(adapter, k, start, context)
        extra = terms(params) if terms is not None else []
        for s in sides:
            for p in s.params:
                p.requires_grad_(True)
        sess = self.session(
            model, params, opt.lr, opt.weight_decay, start=split_like(params, start), sides=sides
        )
        if tick is not None:
            tick()
        losses = []
        g = self.shard.size if self.shard is not None else 1
        scale = g if sess.group_average else 1  # DeepSpeed averages over the group, torch sums

        pending = []  # the batch terms of the batch just forwarded

        def step(_, loss):
            if pending:
                loss = loss + pending.pop()
            if extra:  # the strategy's and method's terms count once over the group
                more = sum(t() for t in extra)
                loss = loss + (more / g if g > 1 else more)
            sess.step(loss * scale if scale != 1 else loss)
            if tick is not None:
                tick()

        logits_kw = logits_kwargs(model) if batch_terms else None

        def forward(batch):
            loss, more = self._loss(sess, batch, batch_terms, logits_kw)
            if more is not None:
                pending.append(more)
            return loss

        try:
            groups = sess.param_groups
            losses = run_steps(
                batches, groups, opt.lr, opt.warmup_ratio, forward=forward, step=step
            )
        finally:
            vec = to_host(sess.result(params))
            side_vecs = [to_host(sess.result(s.params)) for s in sides]
            sess.close()
            for s in sides:
                for p in s.params:
                    p.requires_grad_(False)
        model.eval()
        if g > 1:  # each member's loss is its share of the batch's loss
            import torch.distributed as dist

            t = torch.tensor(losses, dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            losses = t.tolist()
        return LocalResult(vec, sum(losses) / max(1, len(losses)), len(batches), side_vecs)
