"""Plain-torch local trainer: AdamW + warm-up/cosine schedule, fresh for every client.

fp16 uses a gradient scaler (bf16 and fp32 need none). In a client group the gradients of the
trained subspace are summed over the group's torch.distributed world after every backward.
"""

from __future__ import annotations

import torch

from fcit_hpc.train.base import LocalSession, LocalTrainer


class _TorchSession(LocalSession):
    def __init__(
        self, model, params, lr, weight_decay, *, scaler=None, group_size: int = 1, sides=()
    ):
        self.model = model
        self.params = list(params) + [p for s in sides for p in s.params]
        groups = [{"params": list(params)}]
        for s in sides:
            groups.append({"params": list(s.params), "lr": s.lr, "base_lr": s.lr})
        self.opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        self.param_groups = self.opt.param_groups
        self.scaler = scaler
        self.group_size = group_size
        model.train()

    def forward(self, batch):
        return self.model(**batch)

    def _reduce(self) -> None:
        import torch.distributed as dist

        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)  # one collective for the subspace, not one per tensor
            off = 0
            for g in grads:
                g.copy_(flat[off : off + g.numel()].view_as(g))
                off += g.numel()

    def step(self, loss):
        if self.scaler is None:
            loss.backward()
            if self.group_size > 1:
                self._reduce()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            if self.group_size > 1:
                self._reduce()
            self.scaler.step(self.opt)
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)


class TorchTrainer(LocalTrainer):
    def session(self, model, params, lr, weight_decay, *, start=None, sides=()):
        rt = self.runtime
        scaler = None
        if rt is not None and rt.precision == "fp16":
            scaler = torch.amp.GradScaler(rt.device.type)
        g = self.shard.size if self.shard is not None else 1
        return _TorchSession(
            model, params, lr, weight_decay, scaler=scaler, group_size=g, sides=sides
        )
