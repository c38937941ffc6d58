"""A federated run with evaluation: what ``fcit run`` and ``compare`` start on every rank.

This is the run's entry point and the one place that reads the whole :class:`Config`:
:func:`build_context` hands each part its own section (the model its ``model`` and ``lora``
sections, the method its own settings, the data its ``benchmark`` section, the strategy its
``federation`` section, the trainer its ``train`` section ...); everything below takes a
section, never the whole config (tests/test_layout.py checks it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fcit_hpc.benchmark.suite import FederatedData, ensure_data
from fcit_hpc.config import Config, to_yaml
from fcit_hpc.errors import FcitError
from fcit_hpc.eval.stage import Evaluation
from fcit_hpc.fed import loop, preempt
from fcit_hpc.fed.comm import Comm
from fcit_hpc.fed.compress import Compression
from fcit_hpc.fed.context import RunContext, gather_hosts, host_summary, init_group_worlds
from fcit_hpc.fed.strategies import strategy_from_config
from fcit_hpc.methods import make_method
from fcit_hpc.model.build import build_model
from fcit_hpc.model.identity import SampleEncoder, make_encoder
from fcit_hpc.model.liger import resolve_ops
from fcit_hpc.model.projector import projector_numel
from fcit_hpc.runtime import Runtime, apply_runtime, make_runtime
from fcit_hpc.state.schema import RunState
from fcit_hpc.timers import phase, reset

log = logging.getLogger("fcit")


def run_federated(
    cfg: Config, comm: Comm, run_dir: Path, state: RunState | None, *, runtime=None
) -> RunState | None:
    """Run (or continue) the whole schedule; the final state on rank 0, None elsewhere.
    ``runtime``: this rank's device and client group (made from the config when None)."""
    reset(sync=cfg.train.sync_timers)  # phase timers (fcit_hpc.timers), from here
    with phase("startup"), preempt.phase("set-up (model, data)"):
        ctx = build_context(cfg, comm, runtime)
    return loop.run_federated(ctx, run_dir, state, Evaluation())


def runtime_for(cfg: Config, comm: Comm) -> Runtime:
    """This rank's runtime (raises ConfigError, on every rank alike, when it cannot be met)."""
    return make_runtime(cfg.train, cfg.federation, comm.rank, comm.size)


def make_trainer(cfg: Config, runtime: Runtime):
    """The local trainer of ``train.backend`` on the runtime's device and client group."""
    t = cfg.train
    if t.backend == "deepspeed":
        from fcit_hpc.train.ds_trainer import DeepSpeedTrainer

        return DeepSpeedTrainer(t.zero_stage, t.offload, t.batch_size, runtime=runtime)
    from fcit_hpc.train.torch_trainer import TorchTrainer

    return TorchTrainer(runtime)


def run_model(cfg: Config, num_subspaces: int, runtime: Runtime, rank: int | None = None):
    """(model, adapter, tokenizer) of the run on its runtime: the ``model`` and ``lora``
    sections, with the Liger kernels and projector precision its ``train`` section asks for."""
    return build_model(
        cfg.model,
        cfg.lora,
        num_subspaces,
        runtime=runtime,
        rank=rank,
        liger_ops=resolve_ops(cfg.train, runtime.device),
        train_projector=cfg.train.projector_lr > 0,
    )


def prepare_caches(cfg: Config, comm: Comm) -> None:
    """One rank generates caches (data, embedded model); the others wait without spinning."""
    if comm.is_root:
        ensure_data(cfg.benchmark, num_clients=cfg.federation.num_clients, seed=cfg.seed)
        if cfg.model.name == "embedded":
            from fcit_hpc.model.embedded import ensure_embedded

            ensure_embedded(log.info)  # one thread (its recipe); the other ranks sleep
    comm.idle_barrier()


def build_context(cfg: Config, comm: Comm, runtime: Runtime | None = None) -> RunContext:
    """Every rank's objects of the run, each made from its own config section."""
    rt = runtime if runtime is not None else runtime_for(cfg, comm)
    apply_runtime(rt)
    hosts = gather_hosts(comm)
    if comm.is_root:
        log.info("%d rank(s) on %d host(s): %s", comm.size, len(set(hosts)), host_summary(hosts))
        log.info(
            "runtime: %s, %s, %d rank(s), %d client group(s) of %d",
            rt.device,
            rt.precision,
            comm.size,
            len(rt.groups),
            cfg.train.gpus_per_client,
        )
    torch.set_num_threads(cfg.train.num_threads)
    prepare_caches(cfg, comm)
    method = make_method(cfg.method, cfg.lora)
    method.check_trainer(cfg.train.backend, cfg.train.zero_stage)
    model, adapter, tok = run_model(cfg, method.num_slots(), rt, method.slot_rank())
    method.install(adapter)
    data = FederatedData(cfg.benchmark, num_clients=cfg.federation.num_clients, seed=cfg.seed)
    if comm.is_root:  # every stage's client files, before the first round (rank 0 reads them)
        try:
            data.check_files()
        except FcitError as e:
            e.rank_local = True  # the other ranks do not know: the job is aborted
            raise
    method.check_stages(data.num_stages)
    encoder = None
    if method.uses_identity:
        settings = method.settings  # an IdentitySettings
        encoder = SampleEncoder(
            make_encoder(settings, rt.device),
            settings.identity_source,
            model,
            tok.image_size,
            device=rt.device,
            pixels=tok.pixels if tok.num_image_tokens else None,
        )
    strategy = strategy_from_config(cfg.federation)
    init_group_worlds(cfg.train.backend, comm, rt)
    trainer = make_trainer(cfg, rt)
    proj = projector_numel(model) if method.trains and cfg.train.projector_lr > 0 else 0
    return RunContext(
        comm=comm,
        runtime=rt,
        model=model,
        adapter=adapter,
        tok=tok,
        trainer=trainer,
        data=data,
        method=method,
        strategy=strategy,
        encoder=encoder,
        compress=Compression(cfg.compress, (method.num_slots(), adapter.numel)),
        seed=cfg.seed,
        config_yaml=to_yaml(cfg),
        federation=cfg.federation,
        train=cfg.train,
        eval=cfg.eval,
        privacy=cfg.privacy,
        log=cfg.log,
        debug=cfg.debug,
        max_seq_len=cfg.model.max_seq_len,
        projector_numel=proj,
        mixer_numel=adapter.mixer_numel,
    )
