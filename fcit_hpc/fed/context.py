"""What every rank builds once per run: the model and its adapter, the data, the method, the
federated strategy, the local trainer and the identity encoder."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from fcit_hpc.benchmark.suite import FederatedData, ensure_data
from fcit_hpc.config import Config
from fcit_hpc.errors import FcitError
from fcit_hpc.fed.comm import Comm
from fcit_hpc.fed.compress import Compression
from fcit_hpc.fed.strategies import Strategy, strategy_from_config
from fcit_hpc.methods import make_method
from fcit_hpc.methods.base import Method
from fcit_hpc.model.build import build_model
from fcit_hpc.model.identity import SampleEncoder, make_encoder
from fcit_hpc.model.projector import projector_numel
from fcit_hpc.runtime import Runtime, apply_runtime, make_runtime

log = logging.getLogger("fcit")


@dataclass
class RunContext:
    cfg: Config
    comm: Comm
    runtime: Runtime
    model: torch.nn.Module
    adapter: object  # SubspaceAdapter
    tok: object  # ByteTokenizer | HFTokenizer
    trainer: object  # LocalTrainer
    data: FederatedData
    method: Method
    strategy: Strategy
    encoder: SampleEncoder | None
    # values of the LLaVA projector that clients train beside LoRA (0: frozen or none)
    projector_numel: int = 0
    # values of the method's mixers (MoELoRA's routers, M-LoRA's scales; 0: none)
    mixer_numel: int = 0
    # the evaluation's greedy decoder (static KV cache, CUDA graph), made at the first
    # evaluation and kept for the run (fcit_hpc.eval.generate.run_decoder)
    decoder: object = None
    # identity tokens by (data unit, client), encoded once (fed.client.identity_token); the
    # last IDENTITY_CACHE clients' only, so a rank's memory stays flat with 10,000 clients
    identity_cache: OrderedDict = field(default_factory=OrderedDict)
    # the upload codecs and this rank's error-feedback residuals (fed.compress.Compression)
    compress: Compression | None = None


def make_trainer(cfg: Config, runtime: Runtime):
    """The local trainer of ``train.backend`` on the runtime's device and client group."""
    if cfg.train.backend == "deepspeed":
        from fcit_hpc.train.ds_trainer import DeepSpeedTrainer

        t = cfg.train
        return DeepSpeedTrainer(t.zero_stage, t.offload, t.batch_size, runtime=runtime)
    from fcit_hpc.train.torch_trainer import TorchTrainer

    return TorchTrainer(runtime)


def runtime_for(cfg: Config, comm: Comm) -> Runtime:
    """This rank's runtime (raises ConfigError, on every rank alike, when it cannot be met)."""
    return make_runtime(cfg.train, cfg.federation, comm.rank, comm.size)


def _free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for a group's rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_group_worlds(cfg: Config, comm: Comm, rt: Runtime) -> None:
    """The torch.distributed world of each client group. Every leader picks a free port on its
    host (or FCIT_DS_PORT_BASE + its rank when that variable is set); host names and ports reach
    the members through rank 0 (gather, broadcast), so two jobs on one node never collide.
    DeepSpeed needs a world even for a group of one; plain torch only for groups of two or more."""
    import os
    import socket

    import numpy as np

    needs = cfg.train.backend == "deepspeed" or any(g.size > 1 for g in rt.groups)
    if not needs:
        return
    base = os.environ.get("FCIT_DS_PORT_BASE")
    port = (int(base) + rt.rank if base else _free_port()) if rt.is_leader else 0
    if any(g.size > 1 for g in rt.groups):
        name = np.frombuffer(socket.gethostname().encode() + b"\0", np.uint8)
        names = comm.gatherv(name)
        table = comm.bcast_array(np.concatenate(names) if names is not None else None)
        hosts = [h.decode() for h in bytes(table).split(b"\0")[:-1]]
        got = comm.gatherv(np.array([port], np.int64))
        ports = comm.bcast_array(np.concatenate(got) if got is not None else None).tolist()
    else:
        ports, hosts = None, None
    if rt.group is None:  # rank 0 serving only: no training, no world
        return
    from fcit_hpc.train.ds_trainer import init_group_world

    g = rt.group
    if g.size > 1:
        addr, port = hosts[g.leader], ports[g.leader]
    else:
        addr = "127.0.0.1"
    init_group_world(
        g.ranks.index(rt.rank), g.size, addr, port, rt.dist_backend, rt.launch.local_rank
    )


def _gather_hosts(comm: Comm) -> list[str] | None:
    """Rank 0: every rank's host name, in rank order (a start-up gather of bytes, no round
    traffic); the other ranks: None."""
    import socket

    import numpy as np

    got = comm.gatherv(np.frombuffer(socket.gethostname().encode(), np.uint8))
    return None if got is None else [bytes(a).decode(errors="replace") for a in got]


def host_summary(hosts: list[str]) -> str:
    """``n1: ranks 0-3; n2: ranks 4-7``: where the ranks run, one entry per host (first-seen
    order), each host's ranks as ranges."""
    by_host: dict[str, list[int]] = {}
    for rank, h in enumerate(hosts):
        by_host.setdefault(h, []).append(rank)
    parts = []
    for h, ranks in by_host.items():
        runs, start = [], ranks[0]
        for a, b in zip(ranks, ranks[1:] + [None], strict=True):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append(f"{h}: rank{'s' if len(ranks) > 1 else ''} {','.join(runs)}")
    return "; ".join(parts)


def prepare_caches(cfg: Config, comm: Comm) -> None:
    """One rank generates caches (data, embedded model); the others wait without spinning."""
    if comm.is_root:
        ensure_data(cfg)
        if cfg.model.name == "embedded":
            from fcit_hpc.model.embedded import ensure_embedded

            ensure_embedded(log.info)  # one thread (its recipe); the other ranks sleep
    comm.idle_barrier()


def build_context(cfg: Config, comm: Comm, runtime: Runtime | None = None) -> RunContext:
    rt = runtime if runtime is not None else runtime_for(cfg, comm)
    apply_runtime(rt)
    hosts = _gather_hosts(comm)
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
    method = make_method(cfg)
    model, adapter, tok = build_model(cfg, method.num_slots(), rt, method.slot_rank())
    method.install(adapter)
    data = FederatedData(cfg)
    if comm.is_root:  # every stage's client files, before the first round (rank 0 reads them)
        try:
            data.check_files()
        except FcitError as e:
            e.rank_local = True  # the other ranks do not know: the job is aborted
            raise
    method.check_stages(data.num_stages)
    encoder = None
    if method.uses_identity:
        encoder = SampleEncoder(
            make_encoder(cfg.method, rt.device),
            cfg.method.identity_source,
            model,
            tok.image_size,
            rt.device,
            pixels=tok.pixels if tok.num_image_tokens else None,
        )
    strategy = strategy_from_config(cfg.federation)
    init_group_worlds(cfg, comm, rt)
    trainer = make_trainer(cfg, rt)
    proj = projector_numel(model) if method.trains and cfg.train.projector_lr > 0 else 0
    return RunContext(
        cfg,
        comm,
        rt,
        model,
        adapter,
        tok,
        trainer,
        data,
        method,
        strategy,
        encoder,
        proj,
        adapter.mixer_numel,
        compress=Compression(cfg, (method.num_slots(), adapter.numel)),
    )
