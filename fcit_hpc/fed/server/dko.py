"""DKO on the server: validate the gathered identity tokens, then let the method assign a subspace
to every client in client-id order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from fcit_hpc.fed.wire import TokenUpload
from fcit_hpc.methods.base import DkoDecision

log = logging.getLogger("fcit.server")


@dataclass
class DkoResult:
    decisions: dict[int, DkoDecision] = field(default_factory=dict)  # client -> decision
    token_bytes: dict[int, int] = field(default_factory=dict)  # client -> bytes of its upload

    def assignment(self) -> np.ndarray:
        """int64 [n, 2]: (client, subspace; -1 = rejected) in client-id order (what is sent)."""
        return np.array(
            [[c, d.subspace] for c, d in sorted(self.decisions.items())], np.int64
        ).reshape(-1, 2)


def token_problem(mu: np.ndarray, dim: int) -> str | None:
    """Why an identity token is rejected (None: it is accepted)."""
    if mu.size != dim:
        return f"dimension {mu.size} != {dim}"
    if not np.isfinite(mu).all():
        return "contains NaN/Inf"
    return None


def run_dko(st, method, uploads: list[TokenUpload]) -> DkoResult:
    """Rejected tokens get subspace -1; the method assigns the others (mutates ``st``)."""
    dim = st.tokens.shape[1]
    res, ok = DkoResult(), []
    for u in uploads:
        res.token_bytes[u.client] = u.nbytes
        problem = token_problem(u.values, dim)
        if problem is None:
            ok.append(u)
            continue
        log.warning("client %d: identity token rejected, %s", u.client, problem)
        res.decisions[u.client] = DkoDecision(u.client, -1, float("nan"), 0)
    clients = [u.client for u in ok]
    for d in method.assign(st, clients, [u.values for u in ok], [u.samples for u in ok]):
        res.decisions[d.client] = d
    return res
