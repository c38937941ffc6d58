"""Local trainer protocol, data collation and the learning-rate schedule both trainers share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fcit_hpc.benchmark.synthetic import Sample
from fcit_hpc.host import to_host
from fcit_hpc.model.tokenizer import ByteTokenizer


@dataclass
class LocalResult:
    vector: np.ndarray  # float32 [numel] — the trained subspace after local training
    loss: float  # mean training loss over the local steps
    steps: int


def lr_at(step: int, total: int, base_lr: float, warmup_ratio: float) -> float:
    """Linear warm-up over ceil(warmup_ratio·total) steps, then cosine decay to 0."""
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return base_lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def encode_sample(tok: ByteTokenizer, s: Sample, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt masked out of the loss (-100).

    Too long: the answer is kept (up to max_len // 2 tokens) and the instruction loses its
    beginning, so the question itself (usually at the end) stays in view.
    """
    answer = [*tok.encode(s.answer), tok.eos_token_id][: max(1, max_len // 2)]
    prompt = tok.prompt(s.instruction)
    room = max_len - len(answer)
    if len(prompt) > room:
        head = 1 + tok.num_image_tokens  # <bos> and image tokens stay
        prompt = prompt[:head] + prompt[len(prompt) - (room - head) :]
    return prompt + answer, [-100] * len(prompt) + answer


def make_batches(
    tok: ByteTokenizer,
    samples: list[Sample],
    batch_size: int,
    max_len: int,
    epochs: int,
    generator: torch.Generator,
) -> list[dict[str, torch.Tensor]]:
    """Shuffled, right-padded batches for ``epochs`` passes over ``samples`` (with
    ``pixel_values`` [B, 3, H, W] for a multimodal model)."""
    max_len = max_len + tok.num_image_tokens
    enc = [encode_sample(tok, s, max_len) for s in samples]
    images = None
    if tok.num_image_tokens:
        from fcit_hpc.model.vision import load_image

        images = [load_image(s.image, tok.image_size) for s in samples]
    batches = []
    for _ in range(epochs):
        order = torch.randperm(len(enc), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            chunk = [enc[j] for j in order[i : i + batch_size]]
            T = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long)
            lab = torch.full((len(chunk), T), -100, dtype=torch.long)
            att = torch.zeros((len(chunk), T), dtype=torch.long)
            for b, (x, y) in enumerate(chunk):
                ids[b, : len(x)] = torch.tensor(x)
                lab[b, : len(y)] = torch.tensor(y)
                att[b, : len(x)] = 1
            batch = {"input_ids": ids, "attention_mask": att, "labels": lab}
            if images is not None:
                batch["pixel_values"] = torch.stack([images[j] for j in order[i : i + batch_size]])
            batches.append(batch)
    return batches


def start_local(adapter, k: int, start, prox_mu: float, context=None, ortho: float = 0.0, ewc=None):
    """Load the global subspace ``k`` and make it the only trainable one; load the frozen
    ``context`` subspaces ({index: flat vector}, O-LoRA's earlier tasks) that act beside it.

    Returns its parameters and the regularizer to add to the loss (None when there is none):
    FedProx (μ > 0) towards the global values, O-LoRA orthogonality (``ortho`` > 0) to the
    context subspaces, EWC (``ewc`` = (fisher, anchor, λ) flat over the subspace's vector).
    """
    context = context or {}
    for i, vec in sorted(context.items()):
        adapter.set(i, vec)
    adapter.set(k, start)
    adapter.train_subspace(k, tuple(sorted(context)))
    params = adapter.params(k)
    terms = []
    if prox_mu > 0:
        anchors = [p.detach().clone() for p in params]
        terms.append(lambda: prox_term(params, anchors, prox_mu))
    if ortho > 0 and context:
        olds = [[m.lora_A[i].detach() for i in sorted(context)] for m in adapter.layers]
        news = [m.lora_A[k] for m in adapter.layers]
        terms.append(lambda: ortho_term(news, olds, ortho))
    if ewc is not None and ewc[2] > 0:
        fisher, anchor = adapter.unflatten(ewc[0]), adapter.unflatten(ewc[1])
        terms.append(lambda: ewc_term(params, fisher, anchor, ewc[2]))
    if not terms:
        return params, None
    return params, lambda: sum(t() for t in terms)


def prox_term(params, anchors, mu: float) -> torch.Tensor:
    """FedProx: (μ/2)·Σ‖w − w_global‖²."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))


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
        grads = torch.autograd.grad(model(**batch).loss, params)
        for a, g in zip(acc, grads, strict=True):
            a += g.detach().float() ** 2
    n = max(1, len(batches))
    return to_host(torch.cat([a.reshape(-1) / n for a in acc]))


def ortho_term(news, olds, lam: float) -> torch.Tensor:
    """O-LoRA: λ·Σ_layers Σ_i ‖A_i A_new^T‖_F² (A [r, in]: rows span a subspace's input side)."""
    total = 0.0
    for a_new, prev in zip(news, olds, strict=True):
        for a_old in prev:
            total = total + ((a_old @ a_new.t()) ** 2).sum()
    return lam * total


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
    """Trains subspace ``k`` of the adapter from ``start`` on ``batches``. The loop (warm-up +
    cosine schedule, task loss + regularizers) is shared; a backend (plain torch, DeepSpeed ZeRO)
    only opens a :class:`LocalSession`."""

    def session(self, model, params, lr: float, weight_decay: float) -> LocalSession:
        raise NotImplementedError

    def train(
        self,
        model,
        adapter,
        k: int,
        start: np.ndarray,
        batches,
        *,
        lr: float,
        weight_decay: float,
        warmup_ratio: float,
        prox_mu: float,
        context: dict | None = None,
        ortho: float = 0.0,
        ewc=None,
    ) -> LocalResult:
        """``context``: frozen subspaces beside k (O-LoRA) with ``ortho`` their orthogonality
        weight; ``ewc``: (fisher, anchor, λ); ``prox_mu``: FedProx. See :func:`start_local`."""
        params, reg = start_local(adapter, k, start, prox_mu, context, ortho, ewc)
        sess = self.session(model, params, lr, weight_decay)
        losses = []
        try:
            for step, batch in enumerate(batches):
                for g in sess.param_groups:
                    g["lr"] = lr_at(step, len(batches), lr, warmup_ratio)
                loss = sess.forward(batch)
                losses.append(float(loss.detach()))
                if reg is not None:
                    loss = loss + reg()
                sess.step(loss)
        finally:
            vec = to_host(torch.cat([p.detach().float().reshape(-1) for p in params]))
            sess.close()
        model.eval()
        return LocalResult(vec, sum(losses) / max(1, len(losses)), len(batches))
