"""Local work of a rank, for each of its virtual clients: identity tokens, local training and the
stage-end upload (EWC's Fisher), packed for the wire (:mod:`fcit_hpc.fed.wire`)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import torch

from fcit_hpc.data.batches import make_batches
from fcit_hpc.fed.context import RunContext
from fcit_hpc.fed.private_upload import noisy_token
from fcit_hpc.fed.wire import pack_tokens, pack_updates
from fcit_hpc.model.identity import sample_identity_token
from fcit_hpc.model.projector import projector_params, set_projector
from fcit_hpc.seeds import SALT_FISHER_ROUND, client_seed
from fcit_hpc.timers import phase, timer
from fcit_hpc.train.base import LocalOpt, Side

__all__ = ["client_seed", "compute_tokens", "stage_end_uploads", "train_clients"]


# identity tokens a rank keeps (least recently used dropped first): 4,096 x D float32, 6 MiB at
# D = 384; a client selected again after that is encoded again (same samples, same token)
IDENTITY_CACHE = 4096


def identity_token(ctx: RunContext, unit: int, client: int) -> tuple[np.ndarray, int]:
    """(μ_k float32 [D], sample count) of ``client``'s samples in data unit ``unit``, kept in
    ``ctx.identity_cache`` (an OrderedDict, the last ``IDENTITY_CACHE`` clients): the samples
    and the identity encoder (frozen whatever the training does) are the same every round, so a
    client selected again is not read and encoded again. μ is a copy (callers may change it)."""
    cache = getattr(ctx, "identity_cache", None)
    key = (unit, client)
    if cache is None or key not in cache:
        samples = ctx.data.client_samples(unit, client)
        got = (sample_identity_token(ctx.encoder, samples), len(samples))
        if cache is None:
            return got
        cache[key] = got
        while len(cache) > IDENTITY_CACHE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    mu, n = cache[key]
    return mu.copy(), n


def compute_tokens(ctx: RunContext, plan_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Identity tokens μ_k of this rank's clients, packed as token messages."""
    dbg = ctx.debug
    rows, vals = [], []
    for client, unit, _ in plan_rows:
        mu, n = identity_token(ctx, int(unit), int(client))
        mu = noisy_token(
            mu, std=ctx.privacy.token_noise, seed=ctx.seed, client=int(client), unit=int(unit)
        )
        if client in dbg.nan_token_clients:
            mu[0] = np.nan
        if client in dbg.bad_token_clients:
            mu = mu[:-1]
        rows.append((int(client), n))
        vals.append(mu)
    return pack_tokens(rows, vals, [ctx.compress.encode_token(v) for v in vals])


def _client_batches(ctx: RunContext, unit: int, client: int, *, seed: int, epochs: int):
    samples = ctx.data.client_samples(unit, client)
    gen = torch.Generator().manual_seed(seed)
    t = ctx.train
    batches = make_batches(
        ctx.tok,
        samples,
        t.batch_size,
        ctx.max_seq_len,
        epochs=epochs,
        generator=gen,
        pack=t.packing,
    )
    return samples, batches


def side_groups(ctx: RunContext, view) -> list[Side]:
    """The shared side parameters a client trains beside its subspaces, loaded at the global
    values, in upload order (:meth:`RunState.sides`): the LLaVA projector (its own learning
    rate) and the method's mixer (MoELoRA's routers, M-LoRA's scales; the LoRA learning rate)."""
    t, sides = ctx.train, []
    if ctx.projector_numel:
        set_projector(ctx.model, view.projector)
        sides.append(Side(projector_params(ctx.model), t.projector_lr, view.projector))
    if ctx.mixer_numel:
        ctx.adapter.set_mixer(view.mixer)
        sides.append(Side(ctx.adapter.mixer_params(), t.lr, view.mixer))
    return sides


class SetupMark:
    """The trainer's ``tick``: its first call (the session is set up) moves the time since
    ``t0`` (batches, engine) from the ``train`` phase to ``setup``; later calls cost nothing."""

    def __init__(self, t0: float):
        self.t0 = t0

    def __call__(self) -> None:
        if self.t0 is not None:
            timer().carve("setup", time.perf_counter() - self.t0)
            self.t0 = None


def train_one(ctx: RunContext, k: int, start: np.ndarray, batches, *, view, tick=None):
    """Local training of the subspaces a client assigned k trains (``start``: their global
    vectors concatenated), with the strategy's and the method's loss terms (the method's batch
    terms too) and the side parameters beside them. ``tick``: the trainer's timing hook."""
    adapter, t = ctx.adapter, ctx.train
    ks = ctx.method.trained_subspaces(k)
    context = {i: view.adapter[i] for i in ctx.method.training_context(k)}

    def terms(params):
        return ctx.strategy.client_terms(params) + ctx.method.client_terms(
            adapter, k, context, params, view=view
        )

    opt = LocalOpt(t.lr, t.weight_decay, t.warmup_ratio)
    sides = side_groups(ctx, view)
    batch_terms = ctx.method.batch_terms(ctx.model, adapter, k, view)
    return ctx.trainer.train(
        ctx.model,
        adapter,
        ks,
        start,
        batches=batches,
        opt=opt,
        context=context,
        terms=terms,
        sides=sides,
        tick=tick,
        batch_terms=batch_terms,
    )


def _debug_delta(dbg, client: int, delta: np.ndarray) -> np.ndarray:
    """Malformed uploads on request (config ``debug``), to exercise the server's validation."""
    if client in dbg.nan_clients:
        delta[:: max(1, delta.size // 7)] = np.nan
    if client in dbg.bad_shape_clients:
        delta = delta[:-1]
    return delta


def train_clients(
    ctx: RunContext,
    stage: int,
    round_: int,
    plan_rows: np.ndarray,
    *,
    subspaces: dict,
    view,
    upload=None,
):
    """Train this rank's clients one after another, each from the global state ``view``; packed
    as update messages. Clients assigned subspace -1 (token rejected) train nothing. In a client
    group every member trains the same clients together; only the leader's pack holds them.
    ``upload``: the round's :class:`~fcit_hpc.fed.private_upload.PrivateUpload` (drop-outs, DP,
    secure aggregation), None without them."""
    rows, deltas = [], []
    dbg = ctx.debug
    for client, unit, _ in plan_rows:
        client, unit = int(client), int(unit)
        k = subspaces[client]
        if k < 0:
            continue
        with phase("train"):
            t0 = time.perf_counter()
            seed = client_seed(ctx.seed, stage, round_, client)
            torch.manual_seed(seed)
            samples, batches = _client_batches(
                ctx, unit, client, seed=seed, epochs=ctx.train.local_epochs
            )
            start = np.concatenate([view.adapter[i] for i in ctx.method.trained_subspaces(k)])
            res = train_one(ctx, k, start, batches, view=view, tick=SetupMark(t0))
        # the update: the trained subspaces' deltas, then each side's (projector, mixer)
        parts = [(res.vector - start).astype(np.float32)]
        for vec, begin in zip(res.sides, view.sides().values(), strict=True):
            parts.append((vec - begin).astype(np.float32))
        delta = _debug_delta(dbg, client, np.concatenate(parts))
        if upload is not None and ctx.runtime.is_leader:
            delta = upload.prepare(client, k, len(samples), delta)
            if delta is None:  # dropped out: trained, uploads nothing
                continue
        rows.append((client, k, len(samples), res.loss, time.perf_counter() - t0, res.steps))
        deltas.append(delta)
        if ctx.comm.rank == dbg.kill_rank and (stage, round_) == (dbg.kill_stage, dbg.kill_round):
            # mid-round, after its first client: dies (KILL) or is asked to stop (TERM, USR1)
            os.kill(os.getpid(), signal.Signals[f"SIG{dbg.kill_signal}"])
    if not ctx.runtime.is_leader:
        rows, deltas = [], []
    return pack_updates(rows, deltas, encode_updates(ctx, rows, deltas, view))


def encode_updates(
    ctx: RunContext, rows: list[tuple], deltas: list[np.ndarray], view
) -> list[np.ndarray]:
    """Each update's payload for the wire, coded by the run's codecs (``compress``) with the
    client's error feedback (:mod:`fcit_hpc.fed.compress`)."""
    sides = {name: v.size for name, v in view.sides().items()}
    return [
        ctx.compress.encode_update(
            c, ctx.method.trained_subspaces(k), ctx.adapter.numel, sides, delta=d
        )
        for (c, k, *_), d in zip(rows, deltas, strict=True)
    ]


def stage_end_uploads(ctx: RunContext, stage: int, plan_rows: np.ndarray, view):
    """The method's stage-end statistic (EWC: diagonal Fisher) of this rank's clients of the
    stage's last round, at the global adapter; packed as token messages."""
    rows, vals = [], []
    for client, unit, _ in plan_rows:
        seed = client_seed(ctx.seed, stage, SALT_FISHER_ROUND, int(client))
        samples, batches = _client_batches(ctx, int(unit), int(client), seed=seed, epochs=1)
        vals.append(ctx.method.stage_end_upload(ctx.model, ctx.adapter, view, batches))
        rows.append((int(client), len(samples)))
    return pack_tokens(rows, vals)
