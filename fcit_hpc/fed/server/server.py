"""The server (rank 0): everything the loop decides — plans, DKO, validation, aggregation, the
stage-end merge, the state, its file, the metrics log and the predictions files."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from fcit_hpc.errors import StateError
from fcit_hpc.fed.compress import residual_parts
from fcit_hpc.fed.role import Role
from fcit_hpc.fed.server.aggregate import RoundInfo, aggregate_round
from fcit_hpc.fed.server.dko import DkoResult, run_dko
from fcit_hpc.fed.server.metrics_log import MetricsLog
from fcit_hpc.fed.server.plan import plan_round
from fcit_hpc.fed.server.predictions import StageEval, write_predictions
from fcit_hpc.fed.server.private import PrivateCombine, init_privacy, record_round, stage_epsilon
from fcit_hpc.fed.server.run_state import check_state, init_method_state, init_state
from fcit_hpc.fed.server.stage_end import merge_stage_end
from fcit_hpc.fed.server.tracking import Trackers
from fcit_hpc.fed.wire import unpack_tokens, unpack_updates
from fcit_hpc.host import to_host
from fcit_hpc.model.projector import get_projector
from fcit_hpc.seeds import SALT_ROUND_RNG, derive_seed
from fcit_hpc.state.schema import STATE_FILE, ClientStatus, RunState, write_state
from fcit_hpc.timers import combine, phase, reduce_ranks, take

log = logging.getLogger("fcit.server")


class Server(Role):
    """Rank 0's role. ``evaluation`` supplies the summary and report at the end of the run."""

    def __init__(self, ctx, run_dir: Path, state: RunState | None, evaluation):
        self.ctx, self.run_dir, self.evaluation = ctx, Path(run_dir), evaluation
        trackers = None
        if any(vars(ctx.log).values()):
            rounds = ctx.federation.num_rounds
            trackers = Trackers(ctx.log, self.run_dir, rounds if ctx.method.trains else 0)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", trackers)
        self.dko_result = DkoResult()
        self.bar = None
        self.planned: set[int] = set()  # the client ids of the last plan
        data, method = ctx.data, ctx.method
        dim = ctx.encoder.dim if ctx.encoder is not None else 1
        shape = (data.num_stages, data.num_tasks)
        if state is None:
            proj = to_host(get_projector(ctx.model)) if ctx.projector_numel else None
            state = init_state(
                ctx.adapter,
                method,
                seed=ctx.seed,
                config_yaml=ctx.config_yaml,
                dim=dim,
                shape=shape,
                strategy=ctx.strategy,
                projector=proj,
            )
        where = self.run_dir / STATE_FILE
        stages = data.schedule.stages
        init_method_state(state, method, ctx.adapter.numel)
        init_privacy(state, ctx.privacy, data.num_stages)
        try:
            check_state(
                state,
                method,
                ctx.adapter.numel,
                where,
                projector_numel=ctx.projector_numel,
                mixer_numel=ctx.mixer_numel,
                shape=shape,
                dim=dim,
            )
            method.prepare_state(state, where, stages, data.num_tasks)
        except StateError as e:  # only rank 0 holds the state: it ends the whole job
            e.rank_local = True
            raise
        self.st = state
        self.test_features = None  # identity features of every test sample (gate mass), cached
        if state.rng_torch.size:
            torch.set_rng_state(torch.from_numpy(state.rng_torch.copy()))
        self.metrics.rewrite(state, data.task_names, method)

    def cursor(self):
        return np.array([self.st.stage, self.st.round, int(self.st.done)], np.int64)

    def start_progress(self, start_stage, last_round, num_rounds):
        from tqdm import tqdm

        per_stage = max(num_rounds, 1)
        total = self.ctx.data.num_stages * per_stage
        done = start_stage * per_stage + last_round + 1
        self.bar = tqdm(total=total, initial=done, desc="fcit", unit="round", dynamic_ncols=True)

    def plan(self, stage, round_):
        ctx = self.ctx
        plan = plan_round(
            ctx.federation,
            ctx.data.schedule,
            seed=ctx.seed,
            stage=stage,
            round_=round_,
            world=ctx.comm.size,
            gpus_per_client=ctx.train.gpus_per_client,
        )
        self.planned = {int(c) for c in plan[:, 0]}  # who may send in this phase
        return plan

    def state(self):
        return self.st

    def dko(self, heads, values):
        uploads = unpack_tokens(
            heads, values, planned=self.planned, decode=self.ctx.compress.decode_token
        )
        self.dko_result = run_dko(self.st, self.ctx.method, uploads)
        return self.dko_result.assignment()

    def dp_clip(self):
        return np.array([self.st.privacy_clip], np.float64)

    def residuals(self, plan):
        return residual_parts(self.st.residuals, plan, self.ctx.comm.size)

    def keep_residuals(self, residuals):
        self.st.residuals.update(residuals)

    def use_subspace(self, k):
        top = max(self.ctx.method.trained_subspaces(k))
        self.st.num_subspaces = max(self.st.num_subspaces, top + 1)

    def end_round(
        self, stage, round_, plan, heads, *, values, t0, down0, phases=None, private=None
    ):
        ctx, st, dko = self.ctx, self.st, self.dko_result
        bytes_down = ctx.comm.bytes_broadcast - down0
        seconds = time.perf_counter() - t0
        info = RoundInfo(
            stage,
            round_,
            plan,
            dko.decisions,
            token_bytes=dko.token_bytes,
            bytes_down=bytes_down,
            seconds=seconds,
        )
        with phase("aggregate"):
            sides = {name: v.size for name, v in st.sides().items()}
            decode = ctx.compress.update_decoder(
                st.adapter.shape[1], sides, ctx.method.trained_subspaces
            )
            updates = unpack_updates(
                heads, values, planned={int(c) for c in plan[:, 0]}, decode=decode
            )
            combiner = self._private(stage, round_, info, updates, private=private)
            trained = ctx.method.trained_subspaces
            agg = aggregate_round(
                st, updates, ctx.strategy, info, subspaces_of=trained, combine=combiner
            )
            self.dko_result = DkoResult()
            if ctx.privacy.dp != "off":
                rows = agg.client_rows
                ok = set(rows["client"][rows["status"] == ClientStatus.ACCEPTED].tolist())
                record_round(
                    st,
                    ctx.privacy,
                    seed=ctx.seed,
                    clients_per_round=ctx.federation.clients_per_round,
                    stage=stage,
                    round_=round_,
                    norms=private.norms,
                    accepted=ok,
                )
            st.append_metrics(agg.round_row, agg.client_rows)
            ctx.method.after_round(st, agg.client_rows)
            st.stage, st.round = stage, round_
            torch.manual_seed(derive_seed(ctx.seed, stage, round_, SALT_ROUND_RNG))
            st.rng_torch = torch.get_rng_state().numpy().copy()
        with phase("state_write"):
            write_state(self.run_dir, st)
        line = MetricsLog.round_line(st.rounds[-1], st.clients, st.privacy_norms)
        self.metrics.append(MetricsLog.with_phases(line, self._phases(phases)))
        self.bar.set_postfix(stage=stage, loss=f"{st.rounds[-1]['loss']:.3f}", S=st.num_subspaces)
        self.bar.update(1)

    def _private(self, stage, round_, info, updates, *, private):
        """The round's privacy results into ``info`` (drop-outs, protocol bytes); the means
        under DP or secure aggregation (None: the plain sample-weighted ones)."""
        if private is None:
            return None
        got = {u.client for u in updates}
        info.dropped = tuple((c, k) for c, k in private.trainers.items() if c not in got)
        if info.dropped:
            log.info(
                "stage %d round %d: client(s) %s trained and did not upload; the means are over "
                "the %d that did",
                stage,
                round_,
                ", ".join(str(c) for c, _ in info.dropped),
                len(got),
            )
        info.extra_bytes = private.sent
        ctx = self.ctx
        if ctx.privacy.dp == "off" and not ctx.privacy.secagg:
            return None
        return PrivateCombine(
            ctx.privacy,
            seed=ctx.seed,
            stage=stage,
            round_=round_,
            clients_per_round=ctx.federation.clients_per_round,
            clip=self.st.privacy_clip,
            sums=private.sums,
            side_sizes={name: v.size for name, v in self.st.sides().items()},
            slots=self.st.adapter.shape[0],
        )

    def after_rounds(self, stage):
        if not self.ctx.method.trains:
            self.bar.update(1)

    def stage_end_todo(self, stage):
        done = self.ctx.method.stage_end_done(self.st.method, stage)
        return np.array([0 if done else 1], np.int64)

    def merge_stage_end(self, stage, heads, values):
        uploads = unpack_tokens(heads, values, planned=self.planned)
        merge_stage_end(self.st, self.ctx.method, uploads, stage)

    def needs_eval(self, stage):
        return np.array([1 if np.isnan(self.st.accuracy[stage]).all() else 0], np.int64)

    @staticmethod
    def _phases(gathered) -> dict:
        """The ``phases`` entry of a record: every rank's gathered timer vector, rank 0's
        own work since the gather (aggregation, state write, diagnostics) added to its row."""
        per_rank = list(gathered) if gathered is not None else []
        mine = take()
        per_rank = [combine(per_rank[0], mine), *per_rank[1:]] if per_rank else [mine]
        return reduce_ranks(per_rank)

    def record_eval(self, stage, result: StageEval, phases=None):
        data = self.ctx.data
        with phase("state_write"):
            write_predictions(
                self.run_dir, stage, data.task_names, data.test, predictions=result.predictions
            )
        self.st.accuracy[stage] = result.accuracy
        st = self.st
        with phase("eval"):
            features = self.features if self.ctx.encoder is not None else None
            self.ctx.method.after_eval(st, stage, features)
        line = MetricsLog.eval_line(stage, result.accuracy, data.task_names)
        self.metrics.append(MetricsLog.with_phases(line, self._phases(phases)))
        for record in self.ctx.method.eval_records(st, stage, data.task_names):
            self.metrics.append(record)

    def features(self) -> list[np.ndarray | None]:
        """Identity features [M_t, D] of each task's test samples (None: no tests), encoded once
        per process on rank 0."""
        if self.test_features is None:
            data, enc = self.ctx.data, self.ctx.encoder
            self.test_features = [
                enc.encode_samples(data.test[t]) if data.test[t] else None
                for t in range(data.num_tasks)
            ]
        return self.test_features

    def end_stage(self, stage):
        st = self.st
        self.ctx.method.after_stage(st, stage)
        if st.privacy_epsilon.size:
            stage_epsilon(st, self.ctx.privacy, self.ctx.federation, stage)
            self.metrics.append(MetricsLog.privacy_line(st, stage))
        st.stage, st.round = stage + 1, -1
        st.done = stage + 1 == self.ctx.data.num_stages
        with phase("state_write"):  # counted in the next record
            write_state(self.run_dir, st)

    def stop_message(self, reason):
        if self.bar is not None:
            self.bar.close()
        st, d, path = self.st, self.run_dir, self.run_dir / STATE_FILE
        if not path.exists():
            where = f"before the first round; nothing stored but {d / 'config.yaml'}"
        elif st.round >= 0:
            where = f"after stage {st.stage} round {st.round}, the last completed round ({path})"
        elif st.done:
            where = f"after the last stage ({path})"
        else:
            where = f"after stage {st.stage - 1} and its evaluation ({path})"
        return f"stopped on {reason} {where}; continue with `fcit run --resume {d}`"

    def finish(self, report_missing_only=False):
        if self.bar is not None:
            self.bar.close()
        ctx, st = self.ctx, self.st
        if st.summary == {} or not st.task_names:
            with phase("report"):
                self.evaluation.finalize(st, ctx)
            with phase("state_write"):
                write_state(self.run_dir, st)
            line = {"kind": "summary", "stage": ctx.data.num_stages, **st.summary}
            self.metrics.append(MetricsLog.with_phases(json.dumps(line), self._phases(None)))
        if st.done and not (report_missing_only and (self.run_dir / "report.md").exists()):
            self.evaluation.report(self.run_dir, st)
        if self.metrics.trackers is not None:
            self.metrics.trackers.close()
        return st
