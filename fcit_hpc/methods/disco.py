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

from dataclasses import dataclass

import numpy as np

from fcit_hpc.host import to_host
from fcit_hpc.methods.base import (
    ACTIONS,
    FULL,
    MATCHED,
    NEW,
    SMALL,
    DkoDecision,
    IdentitySettings,
    Method,
)

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


def norms(X: np.ndarray) -> np.ndarray:
    """|x| of every row of X [n, D] (float64 [n]); a row's value does not depend on the others."""
    X = np.asarray(X, np.float64)
    return np.sqrt(np.einsum("nd,nd->n", X, X))


def cosines(A: np.ndarray, nA: np.ndarray, G: np.ndarray, nG: np.ndarray) -> np.ndarray:
    """cos(a_n, G_k) [n, S] for tokens A [n, D] and global tokens G [S, D] (float64) with their
    norms ``nA`` [n], ``nG`` [S]. Every entry is one product sum over D in order (``einsum``
    without BLAS), so it is the same bits whichever other rows are in the call: DKO computes a
    whole round at once, or a row against a few moved tokens, and gets what one pair would."""
    return np.einsum("nd,kd->nk", A, G) / np.maximum(np.outer(nA, nG), 1e-12)


def cosine(a: np.ndarray, G: np.ndarray) -> np.ndarray:
    """cos(a, G_i) for every row of G (float64 [S])."""
    a = np.asarray(a, np.float64)[None]
    G = np.asarray(G, np.float64).reshape(-1, a.shape[1])
    return cosines(a, norms(a), G, norms(G))[0]


def dko_assign(
    G: np.ndarray,
    counts: np.ndarray,
    live: int,
    clients: list[int],
    *,
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
    When the first pass finds no such client (the usual round), its result is the real pass's
    (same inputs, nothing demoted) and is kept: one pass, not two.
    """

    def one_pass(g, c, policy, small):
        return _dko_pass(
            g,
            c,
            live,
            clients,
            tokens=tokens,
            samples=samples,
            tau=tau,
            full_policy=policy,
            small=small,
        )

    if min_cluster_frac <= 0:
        return one_pass(G, counts, full_policy, set())
    G1, counts1 = G.copy(), counts.copy()
    first, live1 = one_pass(G1, counts1, "nearest", set())
    small = small_singletons(first, samples, min_cluster_frac)
    if not small and (full_policy == "nearest" or all(d.action != FULL for d in first)):
        G[:], counts[:] = G1, counts1
        return first, live1
    return one_pass(G, counts, full_policy, small)


def small_singletons(
    decisions: list[DkoDecision], samples: list[int], min_cluster_frac: float
) -> set[int]:
    """The clients that, in a plain DKO pass (``decisions``; a full S_max assigns the nearest),
    create a new subspace that no other client of the round joins while holding under
    ``min_cluster_frac`` of the round's samples."""
    members: dict[int, int] = {}
    for d in decisions:
        members[d.subspace] = members.get(d.subspace, 0) + 1
    limit = min_cluster_frac * float(sum(samples))
    return {
        d.client
        for d, m in zip(decisions, samples, strict=True)
        if d.action == NEW and members[d.subspace] == 1 and m < limit
    }


def _dko_pass(G, counts, live, clients, *, tokens, samples, tau, full_policy, small: set[int]):
    """One DKO pass in client-id order (updates ``G``, ``counts``). Vectorised over clients and
    subspaces: the similarities of every client to the tokens as they are at the start are one
    product (:func:`cosines`, [n, S_max]); the walk in client order, which the method defines
    (a merge moves the token the next client is compared with), then recomputes only the
    entries of the tokens moved or created since — one row against those few, not against all.
    The values are those of comparing each client alone with the tokens of its moment."""
    s_max = G.shape[0]
    decisions: list[DkoDecision] = []
    if not clients:
        return decisions, live
    A = np.stack([np.asarray(t) for t in tokens]).astype(np.float64)  # [n, D]
    nA = norms(A)  # [n]
    G64 = G.astype(np.float64)  # [S_max, D], kept equal to G (float32 values) row by row
    nG = norms(G64)  # [S_max]
    first = cosines(A, nA, G64, nG)  # [n, S_max]: every client against the tokens at the start
    moved = np.zeros(s_max, bool)  # tokens merged into (or created) since ``first``
    redo = np.zeros(0, np.int64)  # their indices
    for i, (cid, m) in enumerate(zip(clients, samples, strict=True)):
        row = first[i]
        if redo.size:
            row = row.copy()
            row[redo] = cosines(A[i : i + 1], nA[i : i + 1], G64[redo], nG[redo])[0]
        sims = row[:live]
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
        G[k] = ((G64[k] * n + A[i] * m) / (n + m)).astype(G.dtype)
        counts[k] = n + m
        G64[k] = G[k]
        nG[k] = norms(G64[k : k + 1])[0]
        if not moved[k]:
            moved[k] = True
            redo = np.flatnonzero(moved)
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


@dataclass(frozen=True)
class DiscoSettings(IdentitySettings):
    tau: float  # DKO's matching threshold
    full_policy: str  # when lora.max_subspaces is reached: nearest | error
    min_cluster_frac: float  # DKO's small-cluster guard
    epsilon: float  # SSA's softmax temperature
    ssa: str  # SSA's gate: softmax | cosine | argmax | concat


class Disco(Method):
    """DISCO = DKO on the server + SSA at inference (registered as ``method.name: disco``)."""

    name = "disco"
    uses_identity = True
    settings_class = DiscoSettings

    def num_slots(self) -> int:
        return self.lora.max_subspaces

    def assign(self, state, clients, tokens, samples):
        m = self.settings
        decisions, state.num_subspaces = dko_assign(
            state.tokens,
            state.token_counts,
            state.num_subspaces,
            clients,
            tokens=tokens,
            samples=samples,
            tau=m.tau,
            full_policy=m.full_policy,
            min_cluster_frac=m.min_cluster_frac,
        )
        return decisions

    def activation(self, features: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """SSA's gate α [M, S] of instruction features [M, D] over the live tokens [S, D]."""
        return ssa_activation(features, tokens, self.settings.epsilon, self.settings.ssa)

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
            m, (samples, task_unit, gate) = self.settings, stored(st)
            tokens = st.tokens[: st.num_subspaces]
            gate[stage] = stage_gate_mass(
                features(), tokens, samples, task_unit, epsilon=m.epsilon, mode=m.ssa
            )

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
        alpha = self.activation(features, state.tokens[:live])
        adapter.set_activation(torch.from_numpy(alpha))
