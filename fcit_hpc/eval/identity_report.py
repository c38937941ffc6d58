"""Identity separation of a suite: mean cosine similarity of client identity tokens within a task
and across tasks. Descriptive figures: DKO matches at τ = 0.9, so the closer within-task tokens come
down to it and across-task tokens up to it, the more ambiguous its matching (nothing here is a
requirement)."""

from __future__ import annotations

import numpy as np

from fcit_hpc.model.identity import identity_token


def separation(
    encoder,
    instructions_per_task: dict[str, list[str]],
    client_size: int = 20,
    clients: int = 4,
    *,
    seed: int = 0,
) -> dict:
    """Tokens of ``clients`` disjoint pseudo-clients of ``client_size`` samples per task."""
    rng = np.random.default_rng(seed)
    toks = {}
    for name, ins in instructions_per_task.items():
        idx = rng.permutation(len(ins))
        groups = [idx[k * client_size : (k + 1) * client_size] for k in range(clients)]
        toks[name] = [identity_token(encoder, [ins[i] for i in g]) for g in groups if len(g)]

    def cos(a, b):
        return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))

    names = list(toks)
    within = {
        n: float(np.mean([cos(a, b) for i, a in enumerate(toks[n]) for b in toks[n][i + 1 :]]))
        for n in names
    }
    pairs = {
        (m, n): float(np.mean([cos(a, b) for a in toks[m] for b in toks[n]]))
        for i, m in enumerate(names)
        for n in names[i + 1 :]
    }
    return {
        "within_mean": float(np.mean(list(within.values()))),
        "within_min": min(within.values()),
        "loosest_task": min(within, key=within.get),
        "across_mean": float(np.mean(list(pairs.values()))),
        "across_max": max(pairs.values()),
        "closest_pair": max(pairs, key=pairs.get),
        "within": within,
    }
