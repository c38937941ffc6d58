"""The federated continual loop, run by every rank. Rank 0 is the server (and may host clients).

Per round: plan (Bcast) → global adapter (Bcast) → [DISCO: identity tokens (Gatherv) → DKO on
rank 0 → subspace per client (Bcast)] → local training of each rank's virtual clients → headers
and deltas (Gatherv) → validation, aggregation in client-id order, server optimizer → state.h5.
After every stage: evaluation of every task on all ranks.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from fcit_hpc.benchmark.suite import FederatedData, ensure_data
from fcit_hpc.config import Config, to_yaml
from fcit_hpc.eval.generate import evaluate
from fcit_hpc.fed import server
from fcit_hpc.fed.client import compute_tokens, train_clients
from fcit_hpc.fed.comm import Comm, local_rank, wire_nbytes
from fcit_hpc.fed.strategies import init_server_state
from fcit_hpc.host import to_host
from fcit_hpc.methods import make_method
from fcit_hpc.methods.disco import DkoDecision
from fcit_hpc.model.build import build_model
from fcit_hpc.model.identity import SampleEncoder, make_encoder
from fcit_hpc.state.schema import STATUS, RunState, write_state

log = logging.getLogger("fcit")


def _derive(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def init_state(cfg: Config, adapter, method, dim: int, shape: tuple[int, int]) -> RunState:
    """Fresh global state: every subspace A ~ N(0, 0.01), B = 0 (seeded), no tokens yet."""
    s_max = method.num_slots()
    gen = torch.Generator().manual_seed(_derive(cfg.seed, 77))
    vecs = np.stack([to_host(adapter.init_vector(gen)) for _ in range(s_max)])
    st = RunState(
        config_yaml=to_yaml(cfg),
        adapter=vecs,
        tokens=np.zeros((s_max, dim), np.float32),
        token_counts=np.zeros(s_max, np.float64),
        accuracy=np.full(shape, np.nan),  # [stages, tasks]
        server_opt=init_server_state(cfg.federation.fed_alg, vecs.shape, cfg.federation.fedopt_tau),
    )
    if not method.uses_identity:
        st.num_subspaces = 1
    return st


class MetricsLog:
    """RUN_DIR/metrics.jsonl, one JSON object per round and per evaluation (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = path

    def rewrite(self, st: RunState, task_names) -> None:
        """Regenerate the log from the state (on resume: drops lines of an unfinished round)."""
        lines = [self._round_line(r, st.clients) for r in st.rounds]
        for t in range(st.accuracy.shape[0]):
            if not np.isnan(st.accuracy[t]).all():
                lines.append(self._eval_line(t, st.accuracy[t], task_names))
        lines.sort(key=lambda s: (json.loads(s)["stage"], json.loads(s).get("round", 1 << 30)))
        self.path.write_text("".join(x + "\n" for x in lines))

    @staticmethod
    def _round_line(r, clients) -> str:
        cs = clients[(clients["stage"] == r["stage"]) & (clients["round"] == r["round"])]
        return json.dumps(
            {
                "kind": "round",
                "stage": int(r["stage"]),
                "round": int(r["round"]),
                "loss": float(r["loss"]),
                "samples": int(r["samples"]),
                "seconds": round(float(r["seconds"]), 4),
                "bytes_sent": int(r["bytes_sent"]),
                "bytes_recv": int(r["bytes_recv"]),
                "accepted": int(r["accepted"]),
                "rejected": int(r["rejected"]),
                "num_subspaces": int(r["num_subspaces"]),
                "clients": [
                    {
                        "client": int(c["client"]),
                        "subspace": int(c["subspace"]),
                        "samples": int(c["samples"]),
                        "status": STATUS[int(c["status"])],
                        "similarity": None
                        if np.isnan(c["similarity"])
                        else round(float(c["similarity"]), 4),
                        "dko": int(c["dko_action"]),
                    }
                    for c in cs
                ],
            }
        )

    @staticmethod
    def _eval_line(stage, acc, names) -> str:
        return json.dumps(
            {
                "kind": "eval",
                "stage": int(stage),
                "accuracy": {n: float(a) for n, a in zip(names, acc, strict=True)},
            }
        )

    def append(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")


def run_federated(
    cfg: Config, comm: Comm, run_dir: Path, state: RunState | None
) -> RunState | None:
    """Run (or continue, when ``state`` is given on rank 0) the whole schedule."""
    torch.set_num_threads(cfg.train.num_threads)
    if comm.is_root:  # one rank generates caches (data, embedded model); the others wait
        ensure_data(cfg)
        if cfg.model.name == "embedded":
            from fcit_hpc.model.embedded import ensure_embedded

            ensure_embedded(log.info)  # one thread (its recipe); the other ranks sleep
    comm.idle_barrier()
    model, adapter, tok = build_model(cfg)
    method = make_method(cfg)
    data = FederatedData(cfg)
    method.check_stages(data.num_stages)
    encoder = None
    if method.uses_identity:
        encoder = SampleEncoder(
            make_encoder(cfg.method), cfg.method.identity_source, model, tok.image_size
        )
    if cfg.train.backend == "deepspeed":
        from fcit_hpc.train.ds_trainer import DeepSpeedTrainer

        trainer = DeepSpeedTrainer(
            cfg.train.zero_stage, cfg.train.offload, cfg.train.batch_size, local_rank()
        )
    else:
        from fcit_hpc.train.torch_trainer import TorchTrainer

        trainer = TorchTrainer()
    root = comm.is_root
    st = None
    metrics = MetricsLog(run_dir / "metrics.jsonl") if root else None
    if root:
        dim = encoder.dim if encoder is not None else 1
        shape = (data.num_stages, data.num_tasks)
        st = state if state is not None else init_state(cfg, adapter, method, dim, shape)
        if st.adapter.shape != (method.num_slots(), adapter.numel):
            from fcit_hpc.errors import StateError

            raise StateError(
                f"{run_dir / 'state.h5'}: /global/adapter shape "
                f"{st.adapter.shape} does not fit the model "
                f"({method.num_slots()}, {adapter.numel})"
            )
        if st.rng_torch.size:
            torch.set_rng_state(torch.from_numpy(st.rng_torch.copy()))
        metrics.rewrite(st, data.task_names)
        cursor = np.array([st.stage, st.round, int(st.done)], np.int64)
    else:
        cursor = None
    cursor = comm.bcast_array(cursor)
    if cursor[2]:
        return st
    start_stage, last_round = int(cursor[0]), int(cursor[1])
    num_rounds = cfg.federation.num_rounds if method.trains else 0
    total = data.num_stages * max(num_rounds, 1)
    bar = None
    if root:
        from tqdm import tqdm

        done_rounds = start_stage * max(num_rounds, 1) + last_round + 1
        bar = tqdm(total=total, initial=done_rounds, desc="fcit", unit="round", dynamic_ncols=True)
    for stage in range(start_stage, data.num_stages):
        first = last_round + 1 if stage == start_stage else 0
        for rnd in range(first, num_rounds):
            st = _round(
                cfg, comm, stage, rnd, st, model, adapter, tok, trainer, data, method, encoder
            )
            if root:
                metrics.append(MetricsLog._round_line(st.rounds[-1], st.clients))
                write_state(run_dir, st)
                bar.set_postfix(
                    stage=stage, loss=f"{st.rounds[-1]['loss']:.3f}", S=st.num_subspaces
                )
                bar.update(1)
        if not method.trains and root:
            bar.update(1)
        if method.needs_fisher and num_rounds > 0:  # EWC: consolidate the stage (once)
            todo = np.array([1 if root and st.ewc_stages <= stage else 0], np.int64)
            if comm.bcast_array(todo)[0]:
                _fisher_phase(cfg, comm, stage, num_rounds - 1, st, model, adapter, tok, data)
        # evaluation after the stage (skipped if a resumed run had done it)
        needs_eval = np.array([1 if root and np.isnan(st.accuracy[stage]).all() else 0], np.int64)
        needs_eval = comm.bcast_array(needs_eval)
        if cfg.eval.enabled and needs_eval[0]:
            view = _broadcast_view(comm, st)
            for k in range(view.adapter.shape[0]):
                adapter.set(k, view.adapter[k])
            acc = evaluate(cfg, comm, model, adapter, tok, method, view, data, encoder)
            if root:
                st.accuracy[stage] = acc
                metrics.append(MetricsLog._eval_line(stage, acc, data.task_names))
        if root:
            st.stage, st.round = stage + 1, -1
            st.done = stage + 1 == data.num_stages
            write_state(run_dir, st)
    if bar is not None:
        bar.close()
    if root and (st.summary == {} or not st.task_names):
        _finalize(cfg, st, data, method, encoder)
        write_state(run_dir, st)
        metrics.append(json.dumps({"kind": "summary", "stage": data.num_stages, **st.summary}))
    if root and st.done:
        from fcit_hpc.eval.report import write_report

        write_report(run_dir, st)
    return st


def _finalize(cfg, st: RunState, data, method, encoder) -> None:
    """Continual-learning metrics and the SSA activation map (test task x subspace, mean α)."""
    from fcit_hpc.eval.metrics import cl_metrics, first_stages

    st.task_names = list(data.task_names)
    if method.trains:  # the run's own client records: who really trained what, and when
        trained = [(int(c["stage"]), int(c["unit"])) for c in st.clients if c["status"] == 0]
    else:  # the schedule's plan (Het-FCIT's table for Zero-shot too)
        trained = server.planned_units(cfg, data.schedule)
    st.first_stage = np.asarray(first_stages(data.schedule.stages, data.num_tasks, trained))
    if cfg.eval.enabled and not np.isnan(st.accuracy).any():
        st.summary = cl_metrics(st.accuracy, list(st.first_stage))
    else:
        st.summary = {"last": float("nan")}
    live = st.num_subspaces
    if method.uses_identity and live and encoder is not None:
        from fcit_hpc.methods.disco import ssa_activation

        rows = []
        for t in range(data.num_tasks):
            ins = data.test[t]
            if not ins:
                rows.append(np.full(live, np.nan))
                continue
            a = ssa_activation(
                encoder.encode_samples(ins), st.tokens[:live], cfg.method.epsilon, cfg.method.ssa
            )
            rows.append(a.mean(0))
        st.activation = np.stack(rows)


def _broadcast_view(comm: Comm, st: RunState | None) -> RunState:
    """Every rank gets the global adapter, tokens and live count (for local work / evaluation)."""
    adapter = comm.bcast_array(st.adapter if st is not None else None)
    tokens = comm.bcast_array(st.tokens if st is not None else None)
    live = comm.bcast_array(np.array([st.num_subspaces if st is not None else 0], np.int64))
    fisher = comm.bcast_array(st.ewc_fisher if st is not None else None)
    anchor = comm.bcast_array(st.ewc_anchor if st is not None else None)
    if st is not None:
        return st
    return RunState(
        "",
        adapter,
        tokens,
        np.zeros(len(tokens)),
        np.zeros((0, 0)),
        num_subspaces=int(live[0]),
        ewc_fisher=fisher,
        ewc_anchor=anchor,
    )


def _round(cfg, comm, stage, rnd, st, model, adapter, tok, trainer, data, method, encoder):
    root = comm.is_root
    t0 = time.perf_counter()
    down0 = comm.bytes_broadcast  # everything broadcast from here on is this round's downlink
    plan = server.plan_round(cfg, data.schedule, stage, rnd, comm.size) if root else None
    plan = comm.bcast_array(plan)
    view = _broadcast_view(comm, st)
    mine = plan[plan[:, 2] == comm.rank]
    # --- DKO: identity tokens up, subspace assignment down
    decisions: dict[int, DkoDecision] = {}
    token_bytes: dict[int, int] = {}  # client -> bytes of its identity-token upload
    if method.uses_identity:
        head, vals = compute_tokens(encoder, data, mine, cfg.debug)
        heads = comm.gatherv(head.reshape(-1))
        values = comm.gatherv(vals)
        assign = None
        if root:
            decisions, token_bytes = _dko(cfg, st, method, heads, values)
            assign = np.array([[c, d.subspace] for c, d in sorted(decisions.items())], np.int64)
        assign = comm.bcast_array(assign)
        subspaces = {int(c): int(k) for c, k in assign}
    else:  # one subspace for the whole stage (Finetune: always 0; O-LoRA: the stage's own)
        k = method.stage_subspace(stage)
        subspaces = {int(c): k for c in plan[:, 0]}
        if root:
            st.num_subspaces = max(st.num_subspaces, k + 1)
    # --- local training of this rank's virtual clients
    head, deltas = train_clients(
        cfg,
        comm.rank,
        stage,
        rnd,
        mine,
        subspaces,
        view.adapter,
        model,
        adapter,
        tok,
        trainer,
        data,
        method,
        ewc=(view.ewc_fisher, view.ewc_anchor, method.ewc_lambda) if view.ewc_fisher.size else None,
    )
    heads = comm.gatherv(head.reshape(-1))
    values = comm.gatherv(deltas)
    if root:
        updates = server.parse_updates(heads, values)
        bytes_down = comm.bytes_broadcast - down0
        row, crows = server.aggregate_round(
            cfg,
            st,
            updates,
            adapter.numel,
            stage,
            rnd,
            plan,
            decisions,
            time.perf_counter() - t0,
            bytes_down,
            token_bytes,
        )
        st.append_metrics(row, crows)
        st.stage, st.round = stage, rnd
        torch.manual_seed(_derive(cfg.seed, stage, rnd, 999))
        st.rng_torch = torch.get_rng_state().numpy().copy()
    return st


def _unpack(heads, values):
    """(client, count, values, upload bytes) per client, in client-id order, from gathered int64
    headers [n·3] = (client, count, size) and the matching flat values of every rank."""
    out = []
    for h, v in zip(heads, values, strict=True):
        off = 0
        for row in h.reshape(-1, 3):
            client, n, size = (int(x) for x in row)
            vals = v[off : off + size]
            out.append((client, n, vals, wire_nbytes(row, vals)))
            off += size
    return sorted(out, key=lambda e: e[0])


def _fisher_phase(cfg, comm, stage, last_round, st, model, adapter, tok, data) -> None:
    """EWC at the end of a stage: the clients of its last round compute the diagonal Fisher of
    their data at the global adapter; rank 0 adds the sample-weighted mean to the running Fisher
    and sets the anchor to this stage's adapter. Non-finite or wrong-size uploads are rejected."""
    from fcit_hpc.fed.client import client_seed
    from fcit_hpc.train.base import fisher_diagonal, make_batches

    root = comm.is_root
    plan = server.plan_round(cfg, data.schedule, stage, last_round, comm.size) if root else None
    plan = comm.bcast_array(plan)
    view = _broadcast_view(comm, st)
    heads, vals = [], []
    for client, unit, _ in plan[plan[:, 2] == comm.rank]:
        samples = data.client_samples(int(unit), int(client))
        gen = torch.Generator().manual_seed(client_seed(cfg.seed, stage, 1 << 20, int(client)))
        batches = make_batches(tok, samples, cfg.train.batch_size, cfg.model.max_seq_len, 1, gen)
        f = fisher_diagonal(model, adapter, view.adapter[0], batches)
        heads.append([int(client), len(samples), f.size])
        vals.append(f.astype(np.float32))
    head = np.asarray(heads, np.int64).reshape(-1)
    body = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    all_heads, all_vals = comm.gatherv(head), comm.gatherv(body)
    if not root:
        return
    numel = st.adapter.shape[1]
    acc, total = np.zeros(numel, np.float64), 0
    for client, n, f, _ in _unpack(all_heads, all_vals):
        if f.size != numel or not np.isfinite(f).all() or (f < 0).any():
            log.warning(
                "client %d: Fisher rejected (size %d, expected %d, or not finite >= 0)",
                client,
                f.size,
                numel,
            )
            continue
        acc += f.astype(np.float64) * n
        total += n
    if total:
        prev = st.ewc_fisher if st.ewc_fisher.size else np.zeros(numel, np.float32)
        st.ewc_fisher = (prev.astype(np.float64) + acc / total).astype(np.float32)
        st.ewc_anchor = st.adapter[0].copy()
    st.ewc_stages = stage + 1


def _dko(cfg, st, method, heads, values) -> tuple[dict[int, DkoDecision], dict[int, int]]:
    """Validate gathered tokens, then let the method assign subspaces in client-id order.
    Returns the decisions and the bytes of every client's token upload."""
    dim = st.tokens.shape[1]
    decisions, ok, nbytes = {}, [], {}
    for client, samples, mu, size in _unpack(heads, values):
        nbytes[client] = size
        if mu.size != dim:
            log.warning(
                "client %d: identity token rejected, dimension %d != %d", client, mu.size, dim
            )
        elif not np.isfinite(mu).all():
            log.warning("client %d: identity token rejected, contains NaN/Inf", client)
        else:
            ok.append((client, samples, mu))
            continue
        decisions[client] = DkoDecision(client, -1, float("nan"), 0)
    for d in method.assign(st, [c for c, _, _ in ok], [m for _, _, m in ok], [n for _, n, _ in ok]):
        decisions[d.client] = d
    return decisions, nbytes
