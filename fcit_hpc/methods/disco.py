"""DISCO: Dynamic Knowledge Organization (server) and Subspace Selective Activation (inference).

DKO: client tokens μ_k are matched, in client-id order, to global identity tokens G_1..G_S by cosine
similarity. Best similarity ≥ τ → the client trains that subspace and the token is merged by the
sample-weighted running mean (G·n + μ·m)/(n + m); otherwise a new global token and subspace are
created. When S reaches S_max, ``full_policy`` decides: ``nearest`` assigns the most similar
subspace (logged as FULL), ``error`` stops the run. The reference code's small-cluster guard
(``method.min_cluster_frac``): a new subspace only one client of the round would train, holding
under that share of the round's samples, is not created; the client joins its nearest subspace
(logged as SMALL).
"""

from __future__ import annotations

import numpy as np

from fcit_hpc.host import to_host
from fcit_hpc.methods.base import ACTIONS, FULL, MATCHED, NEW, SMALL, DkoDecision, Method

__all__ = [
    "ACTIONS",
    "FULL",
    "MATCHED",
    "NEW",
    "SMALL",
    "DkoDecision",
    "Disco",
    "dko_assign",
]


def cosine(a: np.ndarray, G: np.ndarray) -> np.ndarray:
    """cos(a, G_i) for every row of G (float64)."""
    a = a.astype(np.float64)
    G = G.astype(np.float64)
    na = np.linalg.norm(a)
    nG = np.linalg.norm(G, axis=1)
    return (G @ a) / np.maximum(na * nG, 1e-12)


def dko_assign(
    G: np.ndarray,
    counts: np.ndarray,
    live: int,
    clients: list[int],
    tokens: list[np.ndarray],
    samples: list[int],
    tau: float,
    full_policy: str = "nearest",
    min_cluster_frac: float = 0.0,
) -> tuple[list[DkoDecision], int]:
    """Match tokens to global tokens; updates ``G`` [S_max, D] and ``counts`` [S_max] in place.

    Small-cluster guard (``min_cluster_frac`` > 0, the reference code's): a first pass on copies
    of ``G``/``counts`` finds the new subspaces that only one client of the round would train
    while it holds under ``min_cluster_frac`` of the round's samples; in the real pass those
    clients join their nearest live subspace instead (SMALL) — unless none exists yet. A new
    subspace of two or more clients is never merged. ``min_cluster_frac`` = 0: no first pass.

    Returns the decisions (one per client, in the given order) and the new number of live subspaces.
    """
    small: set[int] = set()
    if min_cluster_frac > 0:
        small = small_singletons(G, counts, live, clients, tokens, samples, tau, min_cluster_frac)
    return _dko_pass(G, counts, live, clients, tokens, samples, tau, full_policy, small)


def small_singletons(
    G: np.ndarray,
    counts: np.ndarray,
    live: int,
    clients: list[int],
    tokens: list[np.ndarray],
    samples: list[int],
    tau: float,
    min_cluster_frac: float,
) -> set[int]:
    """The clients that, in a plain DKO pass (on copies; a full S_max assigns the nearest), create
    a new subspace that no other client of the round joins while holding under
    ``min_cluster_frac`` of the round's samples."""
    decisions, _ = _dko_pass(
        G.copy(), counts.copy(), live, clients, tokens, samples, tau, "nearest", set()
    )
    members: dict[int, int] = {}
    for d in decisions:
        members[d.subspace] = members.get(d.subspace, 0) + 1
    limit = min_cluster_frac * float(sum(samples))
    return {
        d.client
        for d, m in zip(decisions, samples, strict=True)
        if d.action == NEW and members[d.subspace] == 1 and m < limit
    }


def _dko_pass(G, counts, live, clients, tokens, samples, tau, full_policy, small: set[int]):
    s_max = G.shape[0]
    decisions = []
    for cid, mu, m in zip(clients, tokens, samples, strict=True):
        sims = cosine(mu, G[:live]) if live else np.zeros(0)
        best = int(np.argmax(sims)) if live else -1
        best_sim = float(sims[best]) if live else float("nan")
        if live and best_sim >= tau:
            k, action = best, MATCHED
        elif live and cid in small:
            k, action = best, SMALL
        elif live < s_max:
            k, action = live, NEW
            live += 1
        elif full_policy == "nearest":
            k, action = best, FULL
        else:
            raise RuntimeError(
                f"DKO: client {cid} matches no subspace (best cos {best_sim:.3f} < τ={tau}) "
                f"and all {s_max} subspaces (lora.max_subspaces) are in use"
            )
        n = counts[k]
        G[k] = ((G[k].astype(np.float64) * n + mu.astype(np.float64) * m) / (n + m)).astype(G.dtype)
        counts[k] = n + m
        decisions.append(DkoDecision(cid, k, best_sim, action))
    return decisions, live


def ssa_activation(features: np.ndarray, G: np.ndarray, epsilon: float, mode: str) -> np.ndarray:
    """α [M, S] over the live tokens G [S, D] for instruction features [M, D].

    softmax: softmax(cos/ε); cosine: raw cos; argmax: one-hot of the best; concat: all ones.
    """
    import torch

    from fcit_kernels import ssa_gate

    f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    g = torch.from_numpy(np.ascontiguousarray(G, dtype=np.float32))
    return to_host(ssa_gate(f, g, epsilon, mode))


class Disco(Method):
    """DISCO = DKO on the server + SSA at inference (registered as ``method.name: disco``)."""

    name = "disco"
    uses_identity = True

    def num_slots(self) -> int:
        return self.cfg.lora.max_subspaces

    def assign(self, state, clients, tokens, samples):
        m = self.cfg.method
        decisions, state.num_subspaces = dko_assign(
            state.tokens,
            state.token_counts,
            state.num_subspaces,
            clients,
            tokens,
            samples,
            m.tau,
            m.full_policy,
            m.min_cluster_frac,
        )
        return decisions

    # --- the DKO diagnostics, its own state (fcit_hpc.methods.dko_diagnostics) ---
    def init_state(self, numel):
        from fcit_hpc.methods.dko_diagnostics import fresh

        return fresh(self.name)

    def prepare_state(self, st, where, stages, num_tasks):
        from fcit_hpc.methods import dko_diagnostics as dko

        dko.init(st, where, stages, num_tasks)
        dko.check(st, where, stages, num_tasks)

    def after_round(self, st, client_rows):
        from fcit_hpc.methods.dko_diagnostics import add_samples, stored

        add_samples(stored(st)[0], client_rows)

    def after_eval(self, st, stage, features):
        from fcit_hpc.methods.dko_diagnostics import stage_gate_mass, stored

        if features is not None:
            m, (samples, task_unit, gate) = self.cfg.method, stored(st)
            tokens = st.tokens[: st.num_subspaces]
            gate[stage] = stage_gate_mass(features(), tokens, samples, task_unit, m.epsilon, m.ssa)

    def eval_records(self, st, stage, task_names):
        from fcit_hpc.methods.dko_diagnostics import stage_record

        return [stage_record(st, stage, task_names)]

    def summary(self, st):
        from fcit_hpc.methods.dko_diagnostics import summary

        return summary(st)

    def report_lines(self, st, fmt):
        from fcit_hpc.methods.dko_diagnostics import report_lines

        return report_lines(st, fmt)

    def set_inference(self, adapter, state, features):
        """SSA: α [B, S_live] from the batch's features [B, D], one gate row per sample."""
        import torch

        live = state.num_subspaces
        if live == 0:
            adapter.train_subspace(None)
            return
        m = self.cfg.method
        alpha = ssa_activation(features, state.tokens[:live], m.epsilon, m.ssa)
        adapter.set_activation(torch.from_numpy(alpha))
