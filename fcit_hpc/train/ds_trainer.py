"""DeepSpeed ZeRO local trainer.

Each MPI rank runs its own single-process torch.distributed world (gloo), so its engine's
data-parallel group holds only itself and virtual clients stay independent; weights move between
ranks through mpi4py only. A fresh engine (and optimizer) is built for every client: the optimizer
must restart per client and per round, and a DISCO client may train a different subspace each time.
"""

from __future__ import annotations

import os

from fcit_hpc.train.base import LocalSession, LocalTrainer

_INITIALISED = False


def init_single_process_world(local_rank: int, port_base: int = 29500) -> None:
    """torch.distributed world of size 1 for this process (distinct port per local rank)."""
    global _INITIALISED
    if _INITIALISED:
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["RANK"] = "0"
    os.environ["WORLD_SIZE"] = "1"
    os.environ["LOCAL_RANK"] = str(local_rank)  # DeepSpeed checks it against the MPI env
    os.environ["LOCAL_SIZE"] = "1"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    port = int(os.environ.get("FCIT_DS_PORT_BASE", port_base)) + local_rank
    os.environ["MASTER_PORT"] = str(port)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    _INITIALISED = True


class DeepSpeedTrainer(LocalTrainer):
    def __init__(self, zero_stage: int, offload: bool, batch_size: int, local_rank: int = 0):
        if zero_stage == 3:
            raise ValueError(
                "train.zero_stage: 3 partitions the frozen base model too; per-client engines "
                "support stages 0, 1 and 2"
            )
        self.zero_stage = zero_stage
        self.offload = offload
        self.batch_size = batch_size
        init_single_process_world(local_rank)

    def _ds_config(self, lr: float, weight_decay: float) -> dict:
        zero: dict = {"stage": self.zero_stage}
        if self.offload and self.zero_stage > 0:
            zero["offload_optimizer"] = {"device": "cpu"}
        return {
            "train_micro_batch_size_per_gpu": self.batch_size,
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

    def session(self, model, params, lr, weight_decay):
        return _DeepSpeedSession(model, params, self._ds_config(lr, weight_decay))


class _DeepSpeedSession(LocalSession):
    """A fresh engine per client (new optimizer state), destroyed afterwards."""

    def __init__(self, model, params, config):
        import deepspeed

        self.params = params
        self.engine, opt, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=config
        )
        self.param_groups = opt.param_groups
        self.engine.train()

    def forward(self, batch):
        return self.engine(**batch).loss

    def step(self, loss):
        self.engine.backward(loss)
        self.engine.step()

    def close(self):
        self.engine.eval()
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        for p in self.params:
            p.grad = None
