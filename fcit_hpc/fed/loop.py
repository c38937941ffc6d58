"""The federated continual loop: the round/stage driver every rank runs. The role is decided once
(rank 0: :class:`~fcit_hpc.fed.server.Server`; others: :class:`~fcit_hpc.fed.role.Role`).

Per round: plan (Bcast) → global state (Bcast) → [identity tokens (Gatherv) → DKO on the server →
subspace per client (Bcast)] → local training of each rank's virtual clients → updates (Gatherv)
→ validation, aggregation in client-id order, server update → state.h5. After every stage: the
method's stage-end phase (EWC's Fisher), then evaluation of every task on all ranks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fcit_hpc.errors import FcitError, Preempted
from fcit_hpc.fed import preempt
from fcit_hpc.fed.client import compute_tokens, stage_end_uploads, train_clients
from fcit_hpc.fed.comm import Comm
from fcit_hpc.fed.context import RunContext
from fcit_hpc.fed.private_upload import SIDES_GROUP, PrivateUpload, secure_groups
from fcit_hpc.fed.role import PrivateRound, Role
from fcit_hpc.fed.secure_round import SecureRound
from fcit_hpc.fed.server import Server
from fcit_hpc.model.projector import set_projector
from fcit_hpc.state.schema import MethodState, RunState
from fcit_hpc.timers import phase, take


@contextmanager
def local_work() -> Iterator[None]:
    """A rank's own work on lazily read data (client files, images): an input error there is
    known to this rank only, so it is marked rank-local (see ``FcitError.rank_local``)."""
    try:
        yield
    except FcitError as e:
        e.rank_local = True
        raise


def run_federated(
    ctx: RunContext, run_dir: Path, state: RunState | None, evaluation
) -> RunState | None:
    """Run (or continue, when ``state`` is given on rank 0) the whole schedule on the run's
    context (``fcit_hpc.run.build_context``). ``evaluation``: evaluates a stage on all ranks,
    summarises and reports the run (see ``fcit_hpc.eval.stage``). Returns the final state on
    rank 0, None elsewhere."""
    comm = ctx.comm
    with phase("startup"), preempt.phase("set-up (the server's state)"):
        role = Server(ctx, run_dir, state, evaluation) if comm.is_root else Role()
    cursor = comm.bcast_array(role.cursor())
    if cursor[2]:
        return role.finish(report_missing_only=True)  # killed after its end: report.md
    start_stage, last_round = int(cursor[0]), int(cursor[1])
    num_rounds = ctx.federation.num_rounds if ctx.method.trains else 0
    role.start_progress(start_stage, last_round, num_rounds)
    for stage in range(start_stage, ctx.data.num_stages):
        first = last_round + 1 if stage == start_stage else 0
        with preempt.phase(f"stage {stage}'s rounds", deferred=True):
            for rnd in range(first, num_rounds):
                safe_point(ctx, role, stage, rnd)
                run_round(ctx, role, stage, rnd)
            safe_point(ctx, role, stage, num_rounds)
            role.after_rounds(stage)
            if ctx.method.has_stage_end and num_rounds > 0:  # once per stage, also on resume
                if comm.bcast_array(role.stage_end_todo(stage))[0]:
                    run_stage_end(ctx, role, stage, num_rounds - 1)
                    safe_point(ctx, role, stage, num_rounds)
        if comm.bcast_array(role.needs_eval(stage))[0] and ctx.eval.enabled:
            with phase("comm"):
                view = broadcast_view(comm, role.state(), ctx.mixer_numel > 0, ctx.method)
            for k in range(view.adapter.shape[0]):
                ctx.adapter.set(k, view.adapter[k])
            if view.projector.size:
                set_projector(ctx.model, view.projector)
            if view.mixer.size:
                ctx.adapter.set_mixer(view.mixer)
            with local_work(), phase("eval"), preempt.phase(f"stage {stage}'s evaluation"):
                result = evaluation.evaluate(ctx, view)
            role.record_eval(stage, result, comm.gatherv(take()))
        role.end_stage(stage)
    return role.finish()


def safe_point(ctx: RunContext, role: Role, stage: int, rnd: int) -> None:
    """Between rounds (before round ``rnd`` of ``stage``; ``rnd`` = rounds per stage: before the
    stage's end and evaluation): all ranks stop here together when any was asked to
    (:mod:`~fcit_hpc.fed.preempt`); the last completed round is already stored."""
    dbg = ctx.debug
    if ctx.comm.is_root and dbg.hold_file and (stage, rnd) == (dbg.hold_stage, dbg.hold_round):
        preempt.hold(Path(dbg.hold_file), f"before stage {stage} round {rnd}")
    signame = preempt.agree(ctx.comm)
    if signame:
        raise Preempted(role.stop_message(signame))


def broadcast_view(
    comm: Comm, st: RunState | None, mixer: bool = False, method=None, *, compress=None
) -> RunState:
    """Every rank gets the global adapter, tokens, live count, projector, for a method with
    mixers (``mixer``) the mixer, and the arrays of the method's own state its clients need
    (``method.client_arrays``; for local work and evaluation); the server's view is its state
    itself. ``compress``: the run's :class:`~fcit_hpc.fed.compress.Compression` in training
    rounds, whose download codec the adapter travels through; when it is lossy every rank, the
    server too, sees the decoded adapter (the server's state stays exact)."""
    lossy = compress is not None and not compress.download.lossless
    if lossy:
        adapter = compress.broadcast_adapter(comm, st.adapter if st is not None else None)
    else:
        adapter = comm.bcast_array(st.adapter if st is not None else None)
    tokens = comm.bcast_array(st.tokens if st is not None else None)
    live = comm.bcast_array(np.array([st.num_subspaces if st is not None else 0], np.int64))
    names = method.client_arrays if method is not None else ()
    arrays = {k: comm.bcast_array(st.method.arrays[k] if st is not None else None) for k in names}
    projector = comm.bcast_array(st.projector if st is not None else None)
    mix = comm.bcast_array(st.mixer if st is not None else None) if mixer else np.zeros(0)
    if st is not None:
        return dataclasses.replace(st, adapter=adapter) if lossy else st
    return RunState(
        "",
        adapter,
        tokens,
        np.zeros(len(tokens)),
        accuracy=np.zeros((0, 0)),
        num_subspaces=int(live[0]),
        projector=projector,
        mixer=np.asarray(mix, np.float32),
        method=MethodState(method.name if names else "", arrays),
    )


def my_rows(ctx: RunContext, plan: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows this rank trains, rows it reports): the clients planned on its client group's
    leader; only the leader reports (tokens, updates, stage-end uploads) to the server."""
    rt = ctx.runtime
    mine = plan[plan[:, 2] == rt.group.leader] if rt.group is not None else plan[:0]
    return mine, (mine if rt.is_leader else mine[:0])


def run_round(ctx: RunContext, role: Role, stage: int, rnd: int) -> None:
    """One round on every rank (collectives in the same order everywhere)."""
    comm = ctx.comm
    t0 = time.perf_counter()
    down0 = comm.bytes_broadcast  # everything broadcast from here on is this round's downlink
    with phase("comm"):
        plan = comm.bcast_array(role.plan(stage, rnd))
        view = broadcast_view(
            comm, role.state(), ctx.mixer_numel > 0, ctx.method, compress=ctx.compress
        )
    mine, lead = my_rows(ctx, plan)
    if ctx.method.uses_identity:  # DKO: identity tokens up, subspace assignment down
        with local_work(), phase("identity"):
            head, body = compute_tokens(ctx, lead)
        with phase("comm"):
            heads = comm.gatherv(head)
            bodies = comm.gatherv(body)
        with phase("dko"):
            decided = role.dko(heads, bodies)
        with phase("comm"):
            assign = comm.bcast_array(decided)
        subspaces = {int(c): int(k) for c, k in assign}
    else:  # one subspace for the whole stage (Finetune: always 0; O-LoRA: the stage's own)
        k = ctx.method.stage_subspace(stage)
        subspaces = {int(c): k for c in plan[:, 0]}
        role.use_subspace(k)
    with phase("comm"):
        upload = private_upload(ctx, role, stage, rnd, subspaces=subspaces, lead=lead)
    feedback = ctx.compress.keeps_residuals  # error feedback: residuals to and from the clients
    if feedback:
        with phase("comm"):
            ctx.compress.receive(comm, role.residuals(plan))
    with local_work():
        head, body = train_clients(
            ctx, stage, rnd, mine, subspaces=subspaces, view=view, upload=upload
        )
    with phase("comm"):
        heads = comm.gatherv(head)
        bodies = comm.gatherv(body)
        private = private_results(ctx, upload, subspaces)
        if feedback:
            role.keep_residuals(ctx.compress.send_back(comm))
    # every rank's phase seconds to rank 0 (not counted as round traffic: no part of the method)
    role.end_round(
        stage,
        rnd,
        plan,
        heads,
        values=bodies,
        t0=t0,
        down0=down0,
        phases=comm.gatherv(take()),
        private=private,
    )


def private_upload(ctx: RunContext, role: Role, stage: int, rnd: int, *, subspaces, lead):
    """The round's privacy steps on the uploads (None without drop-outs, DP or secure
    aggregation): the clip bound from the server, secure aggregation's key advertisement and
    key sharing (docs/privacy.md)."""
    comm, p = ctx.comm, ctx.privacy
    if p.dp == "off" and not p.secagg and ctx.federation.dropout == 0:
        return None
    clip = float(comm.bcast_array(role.dp_clip())[0]) if p.dp != "off" else 0.0
    secure = None
    if p.secagg:
        sides = ctx.projector_numel + ctx.mixer_numel > 0
        groups = secure_groups(subspaces, ctx.method.trained_subspaces, sides)
        secure = SecureRound(
            comm, p, seed=ctx.seed, stage=stage, round_=rnd, groups=groups, mine=lead[:, 0]
        )
        secure.advertise_keys()
        secure.share_keys()
    numel, trained = ctx.adapter.numel, ctx.method.trained_subspaces
    return PrivateUpload(
        p,
        seed=ctx.seed,
        stage=stage,
        round_=rnd,
        dropout=ctx.federation.dropout,
        subspaces=subspaces,
        clip=clip,
        secure=secure,
        numel=numel,
        trained=trained,
    )


def private_results(ctx: RunContext, upload, subspaces) -> PrivateRound | None:
    """After the updates: the DP norms and secure aggregation's masked vectors and unmasking;
    what the server needs of them (on rank 0)."""
    if upload is None:
        return None
    comm = ctx.comm
    norms = comm.gatherv(upload.norm_rows()) if ctx.privacy.dp != "off" else None
    sums, sent = None, {}
    if upload.secure is not None:
        sec = upload.secure
        sizes = {g: ctx.adapter.numel for g in sec.groups}
        if sides := ctx.projector_numel + ctx.mixer_numel:
            sizes[SIDES_GROUP] = sides
        sums = sec.unmask(sec.upload(), sizes)
        sent = sec.sent
    trainers = {c for c, k in subspaces.items() if k >= 0}
    return PrivateRound(norms, sums, sent, {c: subspaces[c] for c in sorted(trainers)})


def run_stage_end(ctx: RunContext, role: Role, stage: int, last_round: int) -> None:
    """The method's stage-end phase: the clients of the stage's last round upload a statistic
    (EWC: diagonal Fisher at the global adapter), the server merges it."""
    comm = ctx.comm
    with phase("comm"):
        plan = comm.bcast_array(role.plan(stage, last_round))
        view = broadcast_view(comm, role.state(), ctx.mixer_numel > 0, ctx.method)
    with local_work(), phase("stage_end"):
        head, body = stage_end_uploads(ctx, stage, my_rows(ctx, plan)[1], view)
    with phase("comm"):
        heads = comm.gatherv(head)
        bodies = comm.gatherv(body)
    with phase("stage_end"):
        role.merge_stage_end(stage, heads, bodies)
