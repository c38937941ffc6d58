"""Client-level differential privacy: clipping of each client's update, Gaussian noise at the
server (central DP) or at each client (local DP), adaptive clipping, noisy identity tokens, and
the privacy budget ε at δ from Google's ``dp-accounting`` (RDP accountant).

- DP-FedAvg (McMahan et al., ICLR 2018): each client clips its whole update (the deltas of the
  subspaces it trained and of the side vectors) to L2 norm C, on the client (so it composes with
  secure aggregation, as Flower's ``DifferentialPrivacyClientSideFixedClipping``). The server
  averages with equal weights (the mean's sensitivity is then C/m for m clients) and adds
  N(0, (z·C/m)²) to each subspace's mean and to the side vectors' mean: every released sum gets
  noise z·C and a client changes the concatenation of all of them by at most C.
- Local DP: each client adds N(0, (z·C)²) to its clipped update before it leaves.
- Adaptive clipping (Andrew et al., NeurIPS 2021), as Flower's ``...AdaptiveClipping``: clients
  report b_i = 1[‖Δ_i‖ ≤ C]; the server forms b̄ = (Σ b_i + N(0, σ_b²)) / m and sets
  C ← C·exp(−η_C (b̄ − γ)) for target quantile γ. The update noise uses
  z_Δ = (z^−2 − (2σ_b)^−2)^−1/2, so the pair costs what one Gaussian of multiplier z costs.
- Accounting: central DP is a Poisson-subsampled Gaussian (q = clients per round / clients,
  multiplier z) composed over the rounds run so far; local DP is, for the client that uploaded
  most often, a Gaussian of multiplier z/2 (any two of its clipped updates differ by ≤ 2C; the
  server sees who uploads, so no subsampling amplification) composed over its uploads.
- Identity tokens (``privacy.token_noise`` σ_t > 0): a client clips μ_k to norm 1 and adds
  N(0, σ_t²) once per (client, data unit), seeded; the same noisy token is re-sent each round
  (post-processing costs nothing). Its ε is that of a Gaussian of multiplier σ_t/2.

Every noise stream derives from (seed, stage, round[, client], salt): runs stay world-size
invariant and a resumed run bitwise equal.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from fcit_hpc.seeds import derive_seed

SALT_DP_SERVER = 4_099  # the server's update noise and the adaptive clipping's count noise
SALT_DP_CLIENT = 4_111  # a client's local-DP noise
SALT_DP_TOKEN = 4_127  # a client's identity-token noise


def update_weight(dp: str, samples: int) -> float:
    """A client's weight in a subspace's mean: its sample count, or 1 under DP (``dp``:
    privacy.dp), whose sensitivity bound holds per client. The clients' masked sums (secure
    aggregation) and the server's means must use the same weight."""
    return 1.0 if dp != "off" else float(samples)


def clip(delta: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """(Δ·min(1, C/‖Δ‖₂), ‖Δ‖₂): the update scaled into the L2 ball of radius C (float32 out,
    norm and scale in float64)."""
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return (delta.astype(np.float64) * scale).astype(np.float32), norm


def gaussian(shape, std: float, seed: int) -> np.ndarray:
    """N(0, std²) float64 noise of ``shape`` from a seeded generator (PCG64)."""
    return np.random.default_rng(seed).normal(0.0, std, shape)


def local_noise(delta: np.ndarray, z: float, bound: float, seed_keys: tuple[int, ...]):
    """Local DP: the clipped update plus N(0, (z·C)²), float32."""
    noise = gaussian(delta.shape, z * bound, derive_seed(*seed_keys, SALT_DP_CLIENT))
    return (delta.astype(np.float64) + noise).astype(np.float32)


def delta_multiplier(z: float, count_std: float) -> float:
    """z_Δ of adaptive clipping (Andrew et al., Thm. 1): the update's share of the budget z when
    the clipped-count bit sum takes N(0, σ_b²)."""
    if z <= 0:
        return 0.0
    if 2 * count_std <= z:
        raise ValueError(
            f"adaptive clipping: privacy.dp_count_std {count_std} must exceed z/2 = {z / 2}"
        )
    return (z**-2 - (2 * count_std) ** -2) ** -0.5


def next_clip(
    bound: float,
    clipped_bits: list[int],
    count_std: float,
    lr: float,
    *,
    quantile: float,
    seed: int,
) -> float:
    """C ← C·exp(−η_C (b̄ − γ)), b̄ = (Σ b_i + N(0, σ_b²)) / m; b_i = 1[‖Δ_i‖ ≤ C]."""
    m = len(clipped_bits)
    if m == 0:
        return bound
    noisy = (sum(clipped_bits) + float(gaussian((), count_std, seed))) / m
    return float(bound * math.exp(-lr * (noisy - quantile)))


def noisy_token(mu: np.ndarray, std: float, seed: int) -> np.ndarray:
    """μ clipped to norm 1 plus N(0, std²) per coordinate, float32."""
    mu = mu.astype(np.float64)
    norm = float(np.linalg.norm(mu))
    if norm > 1.0:
        mu = mu / norm
    return (mu + gaussian(mu.shape, std, seed)).astype(np.float32)


# --- accounting ---------------------------------------------------------------------------------


def epsilon(z: float, q: float, steps: int, delta: float, *, orders=None) -> float:
    """ε at δ of ``steps`` compositions of a Poisson-subsampled (rate q) Gaussian of noise
    multiplier z, by dp-accounting's RDP accountant (``orders``: its default grid when None);
    0 for no steps, inf for z = 0."""
    from dp_accounting import dp_event, rdp

    if steps == 0:
        return 0.0
    acc = rdp.RdpAccountant(orders) if orders is not None else rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    absl = logging.getLogger("absl")  # it warns for each fractional order it cannot use
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(dp_event.SelfComposedDpEvent(event, steps))
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


@dataclass(frozen=True)
class Budget:
    """What the accountant needs of a run's privacy settings."""

    mode: str  # off | central | local
    z: float  # noise multiplier
    q: float  # client sampling rate per round
    delta: float

    def epsilon_after(self, rounds: int, most_uploads: int) -> float:
        """ε after ``rounds`` DP rounds (central) or ``most_uploads`` uploads of one client
        (local); NaN without DP."""
        if self.mode == "central":
            return epsilon(self.z, self.q, rounds, self.delta)
        if self.mode == "local":
            return epsilon(self.z / 2, 1.0, most_uploads, self.delta)
        return float("nan")


def token_epsilon(std: float, delta: float) -> float:
    """ε at δ of one noisy identity token (Gaussian of multiplier σ_t/2: ‖μ − μ'‖ ≤ 2)."""
    return epsilon(std / 2, 1.0, 1, delta) if std > 0 else float("inf")
