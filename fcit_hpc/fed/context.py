"""What every rank holds for a run (:class:`RunContext`, built by ``fcit_hpc.run.build_context``),
and the start-up collectives below it: the client groups' torch.distributed worlds and where the
ranks run."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol

import torch

from fcit_hpc.benchmark.suite import FederatedData
from fcit_hpc.config import (
    DebugConfig,
    EvalConfig,
    FederationConfig,
    LogConfig,
    PrivacyConfig,
    TrainConfig,
)
from fcit_hpc.fed.comm import Comm
from fcit_hpc.fed.compress import Compression
from fcit_hpc.fed.strategies import Strategy
from fcit_hpc.methods.base import Method
from fcit_hpc.model.identity import SampleEncoder
from fcit_hpc.model.lora import SubspaceAdapter
from fcit_hpc.model.tokenizer import Tokenizer
from fcit_hpc.runtime import Runtime
from fcit_hpc.train.base import LocalTrainer

log = logging.getLogger("fcit")


class Decoder(Protocol):
    """The evaluation's greedy decoder (fcit_hpc.eval.decode.StaticGreedyDecoder)."""

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int, **kw): ...


@dataclass
class RunContext:
    """What every rank builds once per run (``fcit_hpc.run.build_context``): the objects, and
    the config sections the round, the clients, the server and evaluation read; never the
    whole config (each function below gets the section it reads)."""

    comm: Comm
    runtime: Runtime
    model: torch.nn.Module
    adapter: SubspaceAdapter
    _: KW_ONLY
    tok: Tokenizer | None
    trainer: LocalTrainer
    data: FederatedData
    method: Method
    strategy: Strategy
    encoder: SampleEncoder | None
    compress: Compression
    seed: int  # the run's seed: every draw derives from (seed, stage, round, client)
    config_yaml: str  # the resolved config, stored in state.h5 (resume checks it)
    federation: FederationConfig
    train: TrainConfig
    eval: EvalConfig
    privacy: PrivacyConfig
    log: LogConfig
    debug: DebugConfig
    max_seq_len: int  # model.max_seq_len: a training sample's token budget
    # values of the LLaVA projector that clients train beside LoRA (0: frozen or none)
    projector_numel: int = 0
    # values of the method's mixers (MoELoRA's routers, M-LoRA's scales; 0: none)
    mixer_numel: int = 0
    # the evaluation's greedy decoder (static KV cache, CUDA graph), made at the first
    # evaluation and kept for the run (fcit_hpc.eval.generate.run_decoder)
    decoder: Decoder | None = None
    # identity tokens by (data unit, client), encoded once (fed.client.identity_token); the
    # last IDENTITY_CACHE clients' only, so a rank's memory stays flat with 10,000 clients
    identity_cache: OrderedDict = field(default_factory=OrderedDict)


def _free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for a group's rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_group_worlds(backend: str, comm: Comm, rt: Runtime) -> None:
    """The torch.distributed world of each client group. Every leader picks a free port on its
    host (or FCIT_DS_PORT_BASE + its rank when that variable is set); host names and ports reach
    the members through rank 0 (gather, broadcast), so two jobs on one node never collide.
    DeepSpeed (``backend``, train.backend) needs a world even for a group of one; plain torch
    only for groups of two or more."""
    import os
    import socket

    import numpy as np

    needs = backend == "deepspeed" or any(g.size > 1 for g in rt.groups)
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
        g.ranks.index(rt.rank),
        g.size,
        addr,
        port,
        backend=rt.dist_backend,
        local_rank=rt.launch.local_rank,
    )


def gather_hosts(comm: Comm) -> list[str] | None:
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
