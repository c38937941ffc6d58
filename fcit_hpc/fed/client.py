"""Local work of a rank: identity tokens and local training of its virtual clients."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import torch

from fcit_hpc.config import Config
from fcit_hpc.model.identity import sample_identity_token
from fcit_hpc.train.base import make_batches

# update header, one float64 row per client
H_CLIENT, H_SUBSPACE, H_SAMPLES, H_LOSS, H_SECONDS, H_NUMEL, H_STEPS = range(7)
HEADER_WIDTH = 7


def client_seed(seed: int, stage: int, round_: int, client: int) -> int:
    """All randomness of a client's local work derives from (seed, stage, round, client id)."""
    return int(np.random.SeedSequence([seed, stage, round_, client]).generate_state(1)[0])


def compute_tokens(encoder, data, plan_rows: np.ndarray, dbg=None) -> tuple[np.ndarray, np.ndarray]:
    """Identity tokens of this rank's clients: int64 header [n, 3] (client, samples, dim) and the
    token values float32 [n·D]."""
    heads, vals = [], []
    for client, unit, _ in plan_rows:
        samples = data.client_samples(int(unit), int(client))
        mu = sample_identity_token(encoder, samples)
        if dbg is not None and client in dbg.nan_token_clients:
            mu[0] = np.nan
        if dbg is not None and client in dbg.bad_token_clients:
            mu = mu[:-1]
        heads.append([client, len(samples), mu.size])
        vals.append(mu)
    head = np.asarray(heads, dtype=np.int64).reshape(-1, 3)
    return head, (np.concatenate(vals) if vals else np.zeros(0, np.float32))


def train_clients(
    cfg: Config,
    rank: int,
    stage: int,
    round_: int,
    plan_rows: np.ndarray,
    subspaces: dict,
    global_adapter: np.ndarray,
    model,
    adapter,
    tok,
    trainer,
    data,
    method,
    ewc=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Train this rank's clients one after another, each from the global state.

    Returns the float64 header [n, HEADER_WIDTH] and the float32 deltas concatenated.
    """
    heads, deltas = [], []
    dbg = cfg.debug
    for client, unit, _ in plan_rows:
        client, unit = int(client), int(unit)
        k = subspaces[client]
        if k < 0:  # rejected at the token stage
            continue
        t0 = time.perf_counter()
        seed = client_seed(cfg.seed, stage, round_, client)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        samples = data.client_samples(unit, client)
        batches = make_batches(
            tok, samples, cfg.train.batch_size, cfg.model.max_seq_len, cfg.train.local_epochs, gen
        )
        start = global_adapter[k]
        prox = cfg.federation.prox_mu if cfg.federation.fed_alg == "fedprox" else 0.0
        res = trainer.train(
            model,
            adapter,
            k,
            start,
            batches,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            warmup_ratio=cfg.train.warmup_ratio,
            prox_mu=prox,
            context={i: global_adapter[i] for i in method.training_context(k)},
            ortho=method.ortho_lambda,
            ewc=ewc,
        )
        delta = (res.vector - start).astype(np.float32)
        if client in dbg.nan_clients:
            delta[:: max(1, delta.size // 7)] = np.nan
        if client in dbg.bad_shape_clients:
            delta = delta[:-1]
        heads.append(
            [client, k, len(samples), res.loss, time.perf_counter() - t0, delta.size, res.steps]
        )
        deltas.append(delta)
        if rank == dbg.kill_rank and stage == dbg.kill_stage and round_ == dbg.kill_round:
            os.kill(os.getpid(), signal.SIGKILL)  # dies mid-round, after its first client
    head = np.asarray(heads, dtype=np.float64).reshape(-1, HEADER_WIDTH)
    return head, (np.concatenate(deltas) if deltas else np.zeros(0, np.float32))
