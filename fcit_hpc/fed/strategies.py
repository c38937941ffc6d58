"""Federated aggregation and server optimizers as pure functions over flat vectors.

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

from dataclasses import dataclass

import numpy as np


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


@dataclass
class ServerOptConfig:
    fed_alg: str = "fedavg"
    eta: float = 1e-3
    tau: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    momentum: float = 0.9


def init_server_state(alg: str, shape: tuple[int, ...], tau: float) -> dict[str, np.ndarray]:
    """Optimizer state arrays (all float32, of ``shape``), stored in state.h5 under /server_opt."""
    if alg == "fedavgm":
        return {"m": np.zeros(shape, np.float32)}
    if alg in ("fedadam", "fedadagrad", "fedyogi"):
        return {"m": np.zeros(shape, np.float32), "v": np.full(shape, tau * tau, np.float32)}
    return {}


def server_update(
    x: np.ndarray, delta: np.ndarray, state: dict[str, np.ndarray], opt: ServerOptConfig
) -> np.ndarray:
    """New global vector from the current one ``x`` and the mean delta; updates ``state`` in place.

    ``state`` holds views of this subspace's rows (see init_server_state).
    """
    alg = opt.fed_alg
    x64, d = x.astype(np.float64), delta.astype(np.float64)
    if alg in ("fedavg", "fedprox"):
        return (x64 + d).astype(np.float32)
    if alg == "fedavgm":
        m = opt.momentum * state["m"].astype(np.float64) + d
        state["m"][...] = m
        return (x64 + m).astype(np.float32)
    m = opt.beta1 * state["m"].astype(np.float64) + (1 - opt.beta1) * d
    v = state["v"].astype(np.float64)
    d2 = d * d
    if alg == "fedadagrad":
        v = v + d2
    elif alg == "fedadam":
        v = opt.beta2 * v + (1 - opt.beta2) * d2
    elif alg == "fedyogi":
        v = v - (1 - opt.beta2) * d2 * np.sign(v - d2)
    else:
        raise ValueError(f"federation.fed_alg: unknown {alg!r}")
    state["m"][...] = m
    state["v"][...] = v
    return (x64 + opt.eta * m / (np.sqrt(v) + opt.tau)).astype(np.float32)
