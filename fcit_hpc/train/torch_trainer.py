"""Plain-torch local trainer: AdamW + warm-up/cosine schedule, fresh for every client."""

from __future__ import annotations

import torch

from fcit_hpc.train.base import LocalSession, LocalTrainer


class _TorchSession(LocalSession):
    def __init__(self, model, params, lr, weight_decay):
        self.model = model
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.param_groups = self.opt.param_groups
        model.train()

    def forward(self, batch):
        return self.model(**batch).loss

    def step(self, loss):
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class TorchTrainer(LocalTrainer):
    def session(self, model, params, lr, weight_decay):
        return _TorchSession(model, params, lr, weight_decay)
