"""What every rank builds once per run: the model and its adapter, the data, the method, the
federated strategy, the local trainer and the identity encoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fcit_hpc.benchmark.suite import FederatedData, ensure_data
from fcit_hpc.config import Config
from fcit_hpc.fed.comm import Comm, local_rank
from fcit_hpc.fed.strategies import FedAvg, strategy_from_config
from fcit_hpc.methods import make_method
from fcit_hpc.methods.base import Method
from fcit_hpc.model.build import build_model
from fcit_hpc.model.identity import SampleEncoder, make_encoder

log = logging.getLogger("fcit")


@dataclass
class RunContext:
    cfg: Config
    comm: Comm
    model: torch.nn.Module
    adapter: object  # SubspaceAdapter
    tok: object  # ByteTokenizer | HFTokenizer
    trainer: object  # LocalTrainer
    data: FederatedData
    method: Method
    strategy: FedAvg
    encoder: SampleEncoder | None


def make_trainer(cfg: Config):
    """The local trainer of ``train.backend``."""
    if cfg.train.backend == "deepspeed":
        from fcit_hpc.train.ds_trainer import DeepSpeedTrainer

        t = cfg.train
        return DeepSpeedTrainer(t.zero_stage, t.offload, t.batch_size, local_rank())
    from fcit_hpc.train.torch_trainer import TorchTrainer

    return TorchTrainer()


def prepare_caches(cfg: Config, comm: Comm) -> None:
    """One rank generates caches (data, embedded model); the others wait without spinning."""
    if comm.is_root:
        ensure_data(cfg)
        if cfg.model.name == "embedded":
            from fcit_hpc.model.embedded import ensure_embedded

            ensure_embedded(log.info)  # one thread (its recipe); the other ranks sleep
    comm.idle_barrier()


def build_context(cfg: Config, comm: Comm) -> RunContext:
    torch.set_num_threads(cfg.train.num_threads)
    prepare_caches(cfg, comm)
    method = make_method(cfg)
    model, adapter, tok = build_model(cfg, method.num_slots())
    data = FederatedData(cfg)
    method.check_stages(data.num_stages)
    encoder = None
    if method.uses_identity:
        device = next(model.parameters()).device  # the encoders follow the model (cpu for now)
        encoder = SampleEncoder(
            make_encoder(cfg.method, device),
            cfg.method.identity_source,
            model,
            tok.image_size,
            device,
        )
    strategy = strategy_from_config(cfg.federation)
    trainer = make_trainer(cfg)
    return RunContext(cfg, comm, model, adapter, tok, trainer, data, method, strategy, encoder)
