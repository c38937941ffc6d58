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
The engine casts the whole module to the low precision; when it closes, the parameters get their
dtype back (the adapter is float32 again) and the trained ones their float32 masters.

ZeRO-3 partitions the module's parameters over the group: between uses a base tensor holds
nothing (``data`` is empty) and each member keeps 1/G of it (``ds_tensor``); the forward and
backward hooks gather a module's weights while it runs. Code outside the engine reads weights
directly (the adapter's get/set, the loss terms of FedProx, EWC and O-LoRA, evaluation, the EWC
Fisher, the identity encoders), so the engine lives for one client only, as at stages 0–2:

- the adapter (every subspace's LoRA weights and the layers' mixers) and the trained side
  parameters stay whole on every member (DeepSpeed's persistent parameters, re-gathered after
  each optimizer step); only the frozen base is partitioned, every tensor of it however small
  (``stage3_param_persistence_threshold`` 0);
- the client's start goes into the masters (``safe_set_full_fp32_param``), its result comes from
  them (``safe_get_full_fp32_param``, a collective over the group);
- when the client is done the whole module is gathered and the engine destroyed, and what the
  engine added to the module (parameter attributes, parameter dicts, module attributes, hooks) is
  removed: the module is a plain one again, with the whole base, for everything outside training.

``memory_efficient_linear`` is off: DeepSpeed would otherwise replace
``torch.nn.functional.linear`` for the whole process.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fcit_hpc.train.base import LocalSession, LocalTrainer

_WORLD: tuple | None = None


def init_group_world(
    member: int, size: int, master_addr: str, port: int, *, backend: str, local_rank: int
) -> None:
    """The torch.distributed world of this rank's client group (once per process). A world of
    one is reused whatever its rendezvous port (a second run in the same process picks another
    free port)."""
    global _WORLD
    key = (member, size, master_addr, port, backend)
    if _WORLD is not None:
        alone = size == 1 and _WORLD[1] == 1 and _WORLD[4] == backend
        if _WORLD != key and not alone:
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
    _unlink_shm_workspace(member, size, master_addr, port)


def shm_workspace(member: int, master_addr: str, port) -> Path:
    """The shared-memory file of this member's allreduce workspace, which DeepSpeed's CPU
    communication op (``deepspeed_shm_comm_op``) creates for every world whose members are all
    local (``LOCAL_SIZE`` = the world size): about 69 MB in ``/dev/shm``."""
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{port}_{member}")


def _unlink_shm_workspace(member: int, size: int, master_addr: str, port: int) -> None:
    """DeepSpeed never unlinks the workspace file, so every world a process ever made would keep
    its 69 MB in ``/dev/shm`` (RAM) after the process ends: a test suite or a series of runs
    fills the memory. Every member maps all members' files while the world is set up; once all
    have (a barrier), the names are removed and the mappings stay valid until the process ends."""
    if size > 1:
        import torch.distributed as dist

        dist.barrier()
    shm_workspace(member, master_addr, port).unlink(missing_ok=True)


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
    init_group_world(0, 1, "127.0.0.1", port, backend="gloo", local_rank=local_rank)


class DeepSpeedTrainer(LocalTrainer):
    def __init__(
        self, zero_stage: int, offload: bool, batch_size: int, local_rank: int = 0, *, runtime=None
    ):
        super().__init__(runtime)
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage: {zero_stage} is not one of 0, 1, 2, 3")
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
        if self.zero_stage == 3:
            if self.offload:
                zero["offload_param"] = {"device": "cpu"}
            # every tensor of the base is partitioned, however small (DeepSpeed's default keeps
            # tensors under 1e5 values whole on every member); the adapter is kept whole by
            # the session instead (module docstring)
            zero["stage3_param_persistence_threshold"] = 0
            # DeepSpeed would otherwise replace torch.nn.functional.linear process-wide
            zero["memory_efficient_linear"] = False
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

    def session(self, model, params, lr, weight_decay, *, start=None, sides=()):
        return _DeepSpeedSession(
            model, params, self._ds_config(lr, weight_decay), start, sides=sides
        )


class _DeepSpeedSession(LocalSession):
    """A fresh engine per client (new optimizer state), destroyed afterwards."""

    group_average = True  # the engine averages gradients over its data-parallel group

    def __init__(self, model, params, config, start=None, *, sides=()):
        """``start``: the float32 values of ``params`` (the module may hold them rounded);
        ``sides``: more parameter groups with their own learning rates (the LLaVA projector,
        a method's mixer)."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        from fcit_hpc.train.base import split_like

        self.model = model
        self.params = list(params) + [p for s in sides for p in s.params]
        if start is None:
            start = [p.detach().float().clone() for p in params]
        groups: list = [{"params": list(params)}]
        start = list(start)
        for s in sides:
            groups.append({"params": list(s.params), "lr": s.lr, "base_lr": s.lr})
            start += split_like(s.params, s.start)
        self.zero3 = config["zero_optimization"]["stage"] == 3
        self.low_precision = "bf16" in config or "fp16" in config
        # the engine casts the whole module to the low precision: the float32 parameters (the
        # adapter, the sides) are made float32 again afterwards (module docstring)
        self.dtypes = {p: p.dtype for p in model.parameters()}
        self.restore = _Zero3Restore(model) if self.zero3 else None
        self.engine, opt, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=config
        )
        if self.zero3:
            _keep_whole(self.engine, _adapter_params(model) + self.params)
        if self.low_precision or self.zero3:
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
        DeepSpeed's unfused optimizer); None under ZeRO 1–3, whose masters are fragments of a
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
        """The float32 masters (ZeRO-3: gathered over the group, a collective)."""
        if not (self.low_precision or self.zero3):
            return super().result(params)
        from deepspeed.utils import safe_get_full_fp32_param

        full = []
        for p in params:
            hp = self._unfused_master(p)
            hp = safe_get_full_fp32_param(p) if hp is None else hp
            if hp is None:
                raise RuntimeError(
                    f"DeepSpeed's {type(self.engine.optimizer).__name__} keeps no float32 master "
                    "that fcit_hpc can read; use train.zero_stage 1, 2 or 3 with bf16/fp16"
                )
            full.append(hp)
        return torch.cat([f.detach().float().reshape(-1) for f in full])

    def close(self):
        """Destroy the engine; leave the module as it was before it, with the trained values:
        the parameters in their dtype, the trained ones at their float32 masters, and under
        ZeRO-3 every parameter gathered whole and plain again (a collective)."""
        trained = {}
        if self.low_precision or self.zero3:
            trained = {p: self.result([p]).view(p.shape) for p in self.params}
        if self.zero3:
            _gather_all(self.engine, self.model)
        self.engine.eval()
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        # The engine's __del__ calls destroy() again whenever the garbage collector reaches it,
        # and the optimizer's destroy() clears ``_hp_mapping`` (the link to the float32 master)
        # on every parameter it once held: the same parameters a later client's engine is
        # training by then, which would silently lose their masters. Once destroyed, the engine
        # keeps no optimizer to destroy twice.
        self.engine.optimizer = None
        # destroy() leaves the engine's own hooks on the module: they would run on every later
        # forward (evaluation, the next clients) and keep the engine and its optimizer alive
        for name in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(self.engine, name, None)
            if handle is not None:
                handle.remove()
        if self.restore is not None:
            self.restore.undo()
        with torch.no_grad():
            for p, dtype in self.dtypes.items():
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)
            for p, v in trained.items():
                p.copy_(v)
        for p in self.params:
            p.grad = None


def _adapter_params(model) -> list:
    """The LoRA weights of every subspace and the layers' mixers (not the wrapped base)."""
    from fcit_hpc.model.lora import SubspaceLoRALinear

    out = []
    for m in model.modules():
        if isinstance(m, SubspaceLoRALinear):
            out += [p for n, p in m.named_parameters() if not n.startswith("base.")]
    return out


def _keep_whole(engine, params) -> None:
    """ZeRO-3: keep ``params`` whole on every member of the group (DeepSpeed's persistent
    parameters: gathered once, re-gathered after every optimizer step, never released by the
    forward and backward hooks). Code outside the engine's forward reads them directly: the
    strategy's and method's loss terms, the frozen subspaces and mixers a layer uses."""
    offload = engine.optimizer.parameter_offload
    known = {id(p) for p in offload.persistent_parameters}
    new = []
    for p in params:
        if id(p) not in known:
            known.add(id(p))
            p.ds_persist = True
            offload.persistent_parameters.append(p)  # the list the optimizer re-gathers
            new.append(p)
    if new:
        new[0].all_gather(param_list=new)


def _gather_all(engine, model) -> None:
    """ZeRO-3: every parameter of the module gathered whole on every member (a collective).
    Everything is released first, so that every member gathers the same list."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    engine.optimizer.parameter_offload.partition_all_parameters()
    ps = [p for p in model.parameters() if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if ps:
        ps[0].all_gather(param_list=ps)


_HOOKS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def deepspeed_hooks(module) -> list:
    """(module, hook dict, key) of every hook a DeepSpeed function holds on ``module`` or its
    submodules (other hooks, e.g. those transformers installs on a first forward, are left)."""
    found = []
    for m in module.modules():
        for h in _HOOKS:
            for key, fn in getattr(m, h).items():
                fn = getattr(fn, "func", fn)  # functools.partial
                if (getattr(fn, "__module__", None) or "").startswith("deepspeed"):
                    found.append((m, h, key))
    return found


# what ZeRO-3 sets on a module besides ``ds_*`` attributes and DeepSpeed objects
_DS_MODULE_ATTRS = {
    "_external_params",
    "_original_parameters",
    "applied_pre_backward_ref_cnt",
    "pre_bwd_fn",
    "post_bwd_fn",
}


def _from_deepspeed(name: str, value) -> bool:
    if name.startswith("ds_") or name in _DS_MODULE_ATTRS:
        return True
    owner = getattr(value, "__module__", None) or type(value).__module__
    return owner.startswith("deepspeed")


class _Zero3Restore:
    """What building a ZeRO-3 engine changes on a module, to undo after the engine: the engine
    converts every parameter into a partitioned one (``ds_tensor`` holds this member's part,
    ``data`` is empty between uses; attributes and methods are added to the parameter),
    replaces each module's parameter dict and adds attributes and hooks to the modules. Once
    the parameters are gathered whole and the engine destroyed (its hooks removed), :meth:`undo`
    leaves plain parameters holding the whole values and plain modules."""

    def __init__(self, model):
        self.model = model
        self.modules = [(m, set(vars(m)), m._parameters) for m in model.modules()]
        self.params = [(p, set(vars(p))) for p in model.parameters()]

    def undo(self) -> None:
        from deepspeed.runtime.zero import parameter_offload

        for m, attrs, plist in self.modules:
            m._parameters = plist
            for a in set(vars(m)) - attrs:
                if _from_deepspeed(a, vars(m)[a]):  # not e.g. transformers' lazy flags
                    delattr(m, a)
        for p, attrs in self.params:
            if tuple(p.shape) != tuple(p.ds_shape):
                raise RuntimeError("a ZeRO-3 parameter was not gathered before the engine closed")
            for a in set(vars(p)) - attrs:
                delattr(p, a)
        stack = parameter_offload.FWD_MODULE_STACK
        stack[:] = [m for m in stack if m is not self.model]
        for m, h, key in deepspeed_hooks(self.model):  # none once destroyed; a safeguard
            del getattr(m, h)[key]
