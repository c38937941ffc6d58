"""Federated optimizers as small strategy objects over flat vectors, in the style of Flower's
strategies: the weighted mean is a pure function, a strategy owns its server update (and state),
plus any term it adds to the clients' loss.

Server-side adaptive optimizers follow Reddi et al., "Adaptive Federated Optimization" (ICLR 2021):
with the sample-weighted mean client delta Δ = Σ_k n_k (x_k − x) / Σ_k n_k,

- FedAvg:      x ← x + Δ
- FedAvgM:     m ← β·m + Δ;                     x ← x + m            (Hsu et al., 2019)
- FedAdagrad:  m ← β1·m + (1−β1)Δ;  v ← v + Δ²;                     x ← x + η·m / (√v + τ)
- FedAdam:     m ← β1·m + (1−β1)Δ;  v ← β2·v + (1−β2)Δ²;            x ← x + η·m / (√v + τ)
- FedYogi:     m ← β1·m + (1−β1)Δ;  v ← v − (1−β2)Δ²·sign(v − Δ²);  x ← x + η·m / (√v + τ)
- FedProx:     server as FedAvg; clients add (μ/2)·‖w − x‖² to their loss (Li et al., 2020).

v starts at τ² as in the paper's pseudo-code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass

import numpy as np

LossTerm = Callable[[], "object"]  # () -> scalar torch.Tensor, added to a client's loss


def weighted_average(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Σ_k w_k v_k / Σ_k w_k, accumulated in float64 in the given order, returned as float32."""
    if not vectors:
        raise ValueError("weighted_average of no vectors")
    total = float(np.sum(np.asarray(weights, dtype=np.float64)))
    if total <= 0:
        raise ValueError("weighted_average: weights sum to zero")
    acc = np.zeros(vectors[0].shape, dtype=np.float64)
    for v, w in zip(vectors, weights, strict=True):
        acc += np.float64(w) * v.astype(np.float64)
    return (acc / total).astype(np.float32)


def prox_term(params, anchors, mu: float):
    """FedProx: (μ/2)·Σ‖w − w_global‖²."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))


@dataclass
class ServerOptConfig:
    fed_alg: str = "fedavg"
    eta: float = 1e-3
    tau: float = 1e-3
    beta1: float = 0.9
    _: KW_ONLY
    beta2: float = 0.99
    momentum: float = 0.9
    prox_mu: float = 0.0


def apply_delta(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """x + step in float64, returned as float32 (every strategy's last operation)."""
    return (x.astype(np.float64) + step.astype(np.float64)).astype(np.float32)


def adaptive_step(
    m: np.ndarray, v: np.ndarray, delta: np.ndarray, *, eta: float, tau: float, beta1: float
) -> tuple[np.ndarray, np.ndarray]:
    """FedOpt's first moment and step from the previous m, the new second moment v and Δ:
    m ← β1·m + (1−β1)Δ, step = η·m / (√v + τ) (float64)."""
    m = beta1 * m.astype(np.float64) + (1 - beta1) * delta.astype(np.float64)
    return m, eta * m / (np.sqrt(v) + tau)


class Strategy(ABC):
    """A federated optimizer: the server update of a global vector from the clients' mean delta
    (with its own state), and the terms it adds to the clients' loss. Aggregation (the weighted
    mean) is the pure function ``weighted_average``; subclasses only say how x moves."""

    def __init__(self, opt: ServerOptConfig):
        self.opt = opt

    def init_state(self, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Optimizer state arrays (float32, of ``shape``), stored in state.h5 under /server_opt."""
        return {}

    @abstractmethod
    def update(self, x: np.ndarray, delta: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        """New global vector from ``x`` and the mean delta; ``state`` (views of this subspace's
        rows) is updated in place."""

    def client_terms(self, params) -> list[LossTerm]:
        """Terms the clients add to their loss, given the trainable parameters at the global
        values (called after they are loaded)."""
        return []


class FedAvg(Strategy):
    """x ← x + Δ (McMahan et al., 2017). No state, no client term."""

    def update(self, x, delta, state):
        return apply_delta(x, delta)


class FedProx(FedAvg):
    """FedAvg on the server; clients add (μ/2)·‖w − x‖² (Li et al., 2020)."""

    def client_terms(self, params):
        mu = self.opt.prox_mu
        if mu <= 0:
            return []
        anchors = [p.detach().clone() for p in params]
        return [lambda: prox_term(params, anchors, mu)]


class FedAvgM(FedAvg):
    """Server momentum (Hsu et al., 2019)."""

    def init_state(self, shape):
        return {"m": np.zeros(shape, np.float32)}

    def update(self, x, delta, state):
        m = self.opt.momentum * state["m"].astype(np.float64) + delta.astype(np.float64)
        state["m"][...] = m
        return apply_delta(x, m)


class FedOpt(Strategy):
    """Adaptive server optimizers (Reddi et al., 2021); subclasses give the second moment."""

    def init_state(self, shape):
        tau = self.opt.tau
        return {"m": np.zeros(shape, np.float32), "v": np.full(shape, tau * tau, np.float32)}

    @abstractmethod
    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        """v's update from the previous v and Δ² (float64)."""

    def update(self, x, delta, state):
        opt = self.opt
        d = delta.astype(np.float64)
        v = self.second_moment(state["v"].astype(np.float64), d * d)
        m, step = adaptive_step(state["m"], v, d, eta=opt.eta, tau=opt.tau, beta1=opt.beta1)
        state["m"][...] = m
        state["v"][...] = v
        return apply_delta(x, step)


class FedAdagrad(FedOpt):
    def second_moment(self, v, d2):
        return v + d2


class FedAdam(FedOpt):
    def second_moment(self, v, d2):
        return self.opt.beta2 * v + (1 - self.opt.beta2) * d2


class FedYogi(FedOpt):
    def second_moment(self, v, d2):
        return v - (1 - self.opt.beta2) * d2 * np.sign(v - d2)


STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedprox": FedProx,
}


def make_strategy(opt: ServerOptConfig) -> Strategy:
    """The strategy of ``opt.fed_alg`` (the one dispatch on the federated optimizer)."""
    if opt.fed_alg not in STRATEGIES:
        raise ValueError(f"federation.fed_alg: unknown {opt.fed_alg!r}")
    return STRATEGIES[opt.fed_alg](opt)


def strategy_from_config(fed) -> Strategy:
    """The strategy of a ``FederationConfig`` (its federation section only)."""
    return make_strategy(
        ServerOptConfig(
            fed_alg=fed.fed_alg,
            eta=fed.fedopt_eta,
            tau=fed.fedopt_tau,
            beta1=fed.fedopt_beta1,
            beta2=fed.fedopt_beta2,
            momentum=fed.server_momentum,
            prox_mu=fed.prox_mu,
        )
    )
