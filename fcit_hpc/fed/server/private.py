"""The server's side of the privacy settings: the means under DP and secure aggregation
(:class:`PrivateCombine`), the DP records of a round (norms, the adaptive clip bound) and ε per
stage (:mod:`fcit_hpc.fed.privacy` for the formulas)."""

from __future__ import annotations

import logging

import numpy as np

from fcit_hpc.config import FederationConfig, PrivacyConfig, count_std
from fcit_hpc.fed import privacy
from fcit_hpc.fed.private_upload import SIDES_GROUP
from fcit_hpc.fed.server.aggregate import Combine
from fcit_hpc.fed.strategies import weighted_average
from fcit_hpc.fed.wire import Update
from fcit_hpc.seeds import derive_seed
from fcit_hpc.state.schema import NORM_DTYPE, RunState

log = logging.getLogger("fcit.server")


def update_multiplier(p: PrivacyConfig, clients_per_round: int) -> float:
    """The noise multiplier of the updates: z, or z_Δ under adaptive clipping."""
    if not p.dp_adaptive:
        return p.dp_noise
    return privacy.delta_multiplier(p.dp_noise, count_std(p, clients_per_round))


class PrivateCombine(Combine):
    """Means under the privacy settings. DP: equal weights, and under central DP N(0, (z·C/m)²)
    added to each mean of m clients. Secure aggregation: the means come from the unmasked group
    sums ``sums`` (group → float64 Σ w·Δ; the side vectors' group holds them concatenated, in
    ``side_sizes`` order), the updates carry no deltas."""

    def __init__(
        self,
        p: PrivacyConfig,
        *,
        seed: int,
        stage: int,
        round_: int,
        clients_per_round: int,
        clip: float,
        sums,
        side_sizes,
        slots: int,
    ):
        self.dp = p.dp
        self.multiplier = update_multiplier(p, clients_per_round) if p.dp == "central" else 0.0
        self.keys = (seed, stage, round_)
        self.clip, self.sums, self.slots = clip, sums, slots
        self.deltas = sums is None
        self.offsets, off = {}, 0
        for name, size in side_sizes.items():
            self.offsets[name] = (off, off + size)
            off += size

    def weight(self, u: Update) -> float:
        return privacy.update_weight(self.dp, u.samples)

    def _index(self, key: int | str) -> int:
        """A number per mean for its noise stream: the subspace, or slots + the side's rank."""
        return key if isinstance(key, int) else self.slots + list(self.offsets).index(key)

    def mean(self, key, got):
        total = float(np.sum(np.asarray([w for _, w in got], np.float64)))
        if self.sums is None:
            mean = weighted_average([v for v, _ in got], [w for _, w in got]).astype(np.float64)
        elif isinstance(key, str):
            a, b = self.offsets[key]
            mean = self.sums[SIDES_GROUP][a:b] / total
        else:
            mean = self.sums[key] / total
        if self.dp == "central":
            std = self.multiplier * self.clip / len(got)
            seed = derive_seed(*self.keys, self._index(key), privacy.SALT_DP_SERVER)
            mean = mean + privacy.gaussian(mean.shape, std, seed)
        return mean.astype(np.float32)


def init_privacy(st: RunState, p: PrivacyConfig, stages: int) -> None:
    """A DP run's records when the state has none (a fresh run); the noisy tokens' ε, logged."""
    if p.dp != "off" and not st.privacy_epsilon.size:
        st.privacy_epsilon = np.full(stages, np.nan)
        st.privacy_clip = float(p.dp_clip)
    if p.token_noise > 0:
        log.info(
            "privacy: each identity token costs ε = %.4g at δ = %g (σ_t = %g)",
            privacy.token_epsilon(p.token_noise, p.dp_delta),
            p.dp_delta,
            p.token_noise,
        )


def record_round(
    st: RunState,
    p: PrivacyConfig,
    *,
    seed: int,
    clients_per_round: int,
    stage: int,
    round_: int,
    norms,
    accepted: set[int],
) -> None:
    """Store the accepted clients' norms (``norms``: gathered float64 (client, norm) rows) with
    the bound they were clipped to; under adaptive clipping move the bound for the next round
    (Andrew et al.: b_i = 1[‖Δ_i‖ ≤ C])."""
    rows = sorted(
        (int(c), float(n)) for part in norms for c, n in part.reshape(-1, 2) if int(c) in accepted
    )
    recs = np.array([(stage, round_, c, n, st.privacy_clip) for c, n in rows], NORM_DTYPE)
    st.privacy_norms = np.concatenate([st.privacy_norms, recs])
    if p.dp_adaptive:
        bits = [int(n <= st.privacy_clip) for _, n in rows]
        seed = derive_seed(seed, stage, round_, privacy.SALT_DP_SERVER, 1)
        sigma_b = count_std(p, clients_per_round)
        st.privacy_clip = privacy.next_clip(
            st.privacy_clip, bits, sigma_b, p.dp_clip_lr, quantile=p.dp_quantile, seed=seed
        )


def budget(p: PrivacyConfig, fed: FederationConfig) -> privacy.Budget:
    """The run's DP accountant: ``p``'s mechanism at the sampling rate of ``fed``."""
    q = fed.clients_per_round / fed.num_clients
    return privacy.Budget(p.dp, p.dp_noise, q, p.dp_delta)


def stage_epsilon(st: RunState, p: PrivacyConfig, fed: FederationConfig, stage: int) -> float:
    """ε at δ after ``stage`` (every round of the run so far is a DP round), stored and logged."""
    norms = st.privacy_norms
    most = int(np.bincount(norms["client"]).max()) if norms.size else 0
    eps = budget(p, fed).epsilon_after(len(st.rounds), most)
    st.privacy_epsilon[stage] = eps
    log.info(
        "privacy: ε = %.4g at δ = %g after stage %d (%s DP, z = %g, %d rounds)",
        eps,
        p.dp_delta,
        stage,
        p.dp,
        p.dp_noise,
        len(st.rounds),
    )
    return eps
