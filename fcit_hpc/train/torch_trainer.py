"""Plain-torch local trainer: AdamW + warm-up/cosine schedule, fresh for every client."""

from __future__ import annotations

import torch

from fcit_hpc.train.base import LocalResult, LocalTrainer, lr_at, start_local


class TorchTrainer(LocalTrainer):
    def train(
        self,
        model,
        adapter,
        k,
        start,
        batches,
        *,
        lr,
        weight_decay,
        warmup_ratio,
        prox_mu,
        context=None,
        ortho=0.0,
        ewc=None,
    ):
        params, reg = start_local(adapter, k, start, prox_mu, context, ortho, ewc)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        model.train()
        losses = []
        for step, batch in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, len(batches), lr, warmup_ratio)
            loss = model(**batch).loss
            losses.append(float(loss.detach()))
            if reg is not None:
                loss = loss + reg()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        vec = adapter.get(k).numpy()
        return LocalResult(vec, sum(losses) / max(1, len(losses)), len(batches))
