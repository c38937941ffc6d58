"""DeepSpeed ZeRO local trainer.

Each client group (``train.gpus_per_client`` ranks; one rank alone by default) runs its own
torch.distributed world (nccl on GPUs, gloo on the CPU), so its engines' data-parallel group is the
client group and virtual clients stay independent; weights move between groups and the server
through mpi4py only (:mod:`fcit_hpc.fed.comm`).

A fresh engine (and optimizer) is built for every client: the optimizer must restart per client
and per round, and a DISCO client may train a different subspace each time. What that costs is
measured by ``fcit bench train`` (engine set-up against the client's local training time).

Precision: with ``train.precision`` bf16 or fp16 the engine runs its bf16 / fp16 block (the module
in the low precision, float32 master weights in the optimizer). The client's float32 start is
written into the masters (``safe_set_full_fp32_param``) and its result read from them
(``safe_get_full_fp32_param``), so the global subspace never passes through the low precision.
"""

from __future__ import annotations

import os

import torch

from fcit_hpc.train.base import LocalSession, LocalTrainer

_WORLD: tuple | None = None


def init_group_world(
    member: int, size: int, master_addr: str, port: int, backend: str, local_rank: int
) -> None:
    """The torch.distributed world of this rank's client group (once per process)."""
    global _WORLD
    key = (member, size, master_addr, port, backend)
    if _WORLD is not None:
        if _WORLD != key:
            raise RuntimeError(f"torch.distributed already set up as {_WORLD}, not {key}")
        return
    os.environ["RANK"] = str(member)
    os.environ["WORLD_SIZE"] = str(size)
    os.environ["LOCAL_RANK"] = str(local_rank)  # DeepSpeed checks it against the MPI env
    os.environ["LOCAL_SIZE"] = str(size)
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(port)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    _WORLD = key


def init_single_process_world(local_rank: int) -> None:
    """A world of one for this process (tests, a trainer made without a runtime): on a free
    port, or FCIT_DS_PORT_BASE + local rank when that variable is set."""
    if _WORLD is not None:
        return
    base = os.environ.get("FCIT_DS_PORT_BASE")
    if base:
        port = int(base) + local_rank
    else:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    init_group_world(0, 1, "127.0.0.1", port, "gloo", local_rank)


class DeepSpeedTrainer(LocalTrainer):
    def __init__(
        self, zero_stage: int, offload: bool, batch_size: int, local_rank: int = 0, runtime=None
    ):
        super().__init__(runtime)
        if zero_stage == 3:
            raise ValueError(
                "train.zero_stage: 3 partitions the frozen base model too; per-client engines "
                "support stages 0, 1 and 2"
            )
        self.zero_stage = zero_stage
        self.offload = offload
        self.batch_size = batch_size
        if runtime is None:
            init_single_process_world(local_rank)
        # with a runtime, fcit_hpc.fed.context sets up the group's world before training

    def _ds_config(self, lr: float, weight_decay: float) -> dict:
        zero: dict = {"stage": self.zero_stage}
        if self.offload and self.zero_stage > 0:
            zero["offload_optimizer"] = {"device": "cpu"}
        g = self.shard.size if self.shard is not None else 1
        cfg = {
            "train_micro_batch_size_per_gpu": -(-self.batch_size // g),
            "gradient_accumulation_steps": 1,
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True},
            },
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        precision = self.runtime.precision if self.runtime is not None else "fp32"
        if precision == "bf16":
            cfg["bf16"] = {"enabled": True}
        elif precision == "fp16":
            cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        return cfg

    def session(self, model, params, lr, weight_decay, start=None, sides=()):
        return _DeepSpeedSession(model, params, self._ds_config(lr, weight_decay), start, sides)


class _DeepSpeedSession(LocalSession):
    """A fresh engine per client (new optimizer state), destroyed afterwards."""

    group_average = True  # the engine averages gradients over its data-parallel group

    def __init__(self, model, params, config, start=None, sides=()):
        """``start``: the float32 values of ``params`` (the module may hold them rounded);
        ``sides``: more parameter groups with their own learning rates (the LLaVA projector,
        a method's mixer)."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        from fcit_hpc.train.base import split_like

        self.params = list(params) + [p for s in sides for p in s.params]
        if start is None:
            start = [p.detach().float().clone() for p in params]
        groups: list = [{"params": list(params)}]
        start = list(start)
        for s in sides:
            groups.append({"params": list(s.params), "lr": s.lr, "base_lr": s.lr})
            start += split_like(s.params, s.start)
        self.engine, opt, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=config
        )
        self.low_precision = "bf16" in config or "fp16" in config
        if self.low_precision:
            for p, v in zip(self.params, start, strict=True):
                hp = self._unfused_master(p)
                if hp is not None:
                    with torch.no_grad():
                        hp.copy_(v.to(hp.device).view_as(hp))
                else:
                    safe_set_full_fp32_param(p, v)
        self.param_groups = opt.param_groups
        self.engine.train()

    def _unfused_master(self, p):
        """The float32 master of ``p`` kept per parameter (ZeRO 0 with bf16 / fp16:
        DeepSpeed's unfused optimizer); None under ZeRO 1–2, whose masters are fragments of a
        flat buffer reached through ``safe_{get,set}_full_fp32_param``."""
        opt = self.engine.optimizer
        for lp_group, hp_group in zip(
            getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []), strict=False
        ):
            for lp, hp in zip(lp_group, hp_group, strict=False):
                if lp is p and isinstance(hp, torch.Tensor):
                    return hp
        return None

    def forward(self, batch):
        return self.engine(**batch)

    def step(self, loss):
        self.engine.backward(loss)
        self.engine.step()

    def result(self, params) -> torch.Tensor:
        if not self.low_precision:
            return super().result(params)
        from deepspeed.utils import safe_get_full_fp32_param

        full = []
        for p in params:
            hp = self._unfused_master(p)
            hp = safe_get_full_fp32_param(p) if hp is None else hp
            if hp is None:
                raise RuntimeError(
                    f"DeepSpeed's {type(self.engine.optimizer).__name__} keeps no float32 master "
                    "that fcit_hpc can read; use train.zero_stage 1 or 2 with bf16/fp16"
                )
            full.append(hp)
        return torch.cat([f.detach().float().reshape(-1) for f in full])

    def close(self):
        self.engine.eval()
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        for p in self.params:
            p.grad = None
