"""A rank's privacy steps on its clients' uploads in one round, between local training and the
wire: the drop-out knob, DP clipping and local noise (:mod:`fcit_hpc.fed.privacy`), and the
secure-aggregation masking (:mod:`fcit_hpc.fed.secure_round`)."""

from __future__ import annotations

import numpy as np

from fcit_hpc.config import PrivacyConfig
from fcit_hpc.fed import privacy
from fcit_hpc.fed.dropout import dropped_clients
from fcit_hpc.seeds import derive_seed

SIDES_GROUP = 1 << 16  # the secure-aggregation group of the side vectors (every training client)


def secure_groups(subspaces: dict[int, int], trained, sides: bool) -> dict[int, list[int]]:
    """group → sorted members: each subspace a client trains (``trained(k)`` for its assigned
    k ≥ 0), and ``SIDES_GROUP`` of every training client when there are side vectors."""
    groups: dict[int, list[int]] = {}
    for c, k in sorted(subspaces.items()):
        if k < 0:
            continue
        for j in trained(k):
            groups.setdefault(int(j), []).append(int(c))
        if sides:
            groups.setdefault(SIDES_GROUP, []).append(int(c))
    return groups


def round_dropouts(
    subspaces: dict[int, int], *, seed: int, stage: int, round_: int, dropout: float
) -> set[int]:
    """The clients of the round that train and do not upload (``dropout``:
    ``federation.dropout``)."""
    trainers = [c for c, k in subspaces.items() if k >= 0]
    return dropped_clients(seed, stage, round_, trainers, share=dropout)


def noisy_token(mu: np.ndarray, *, std: float, seed: int, client: int, unit: int) -> np.ndarray:
    """The identity token as it leaves the client: with ``std`` (``privacy.token_noise``) σ_t >
    0, clipped to norm 1 plus N(0, σ_t²), the same noise every round (seeded by the run's
    ``seed``, client and data unit)."""
    if std <= 0:
        return mu
    seed = derive_seed(seed, client, unit, privacy.SALT_DP_TOKEN)
    return privacy.noisy_token(mu, std, seed)


class PrivateUpload:
    """What happens to each update of this rank's clients before it leaves (``prepare``), and
    the DP norm records it sends beside them (``norm_rows``)."""

    def __init__(
        self,
        p: PrivacyConfig,
        *,
        seed: int,
        stage: int,
        round_: int,
        dropout: float,
        subspaces,
        clip: float,
        secure=None,
        numel: int = 0,
        trained=None,
    ):
        self.p, self.seed = p, seed
        self.stage, self.round, self.clip = stage, round_, clip
        self.secure, self.numel, self.trained = secure, numel, trained
        self.dropped = round_dropouts(
            subspaces, seed=seed, stage=stage, round_=round_, dropout=dropout
        )
        self.norms: list[tuple[int, float]] = []

    def prepare(self, client: int, k: int, samples: int, delta: np.ndarray):
        """The delta to send (empty under secure aggregation: the masked vectors travel on
        their own), or None when the client does not upload (it dropped out; under secure
        aggregation also when its update is malformed, which the masking would hide)."""
        if client in self.dropped:
            return None
        if self.p.dp != "off":
            delta, norm = privacy.clip(delta, self.clip)
            self.norms.append((client, norm))
            if self.p.dp == "local":
                keys = (self.seed, self.stage, self.round, client)
                delta = privacy.local_noise(delta, self.p.dp_noise, self.clip, keys)
        if self.secure is None:
            return delta
        ks = self.trained(k)
        sides = delta.size - len(ks) * self.numel
        if sides < 0 or not np.isfinite(delta).all():
            return None
        w = privacy.update_weight(self.p.dp, samples)
        delta = delta.astype(np.float64)  # w·Δ as the plain mean forms it (float64)
        for j, g in enumerate(ks):
            self.secure.mask(client, int(g), w * delta[j * self.numel : (j + 1) * self.numel])
        if sides:
            self.secure.mask(client, SIDES_GROUP, w * delta[len(ks) * self.numel :])
        return np.zeros(0, np.float32)

    def norm_rows(self) -> np.ndarray:
        """float64 [n·2]: (client, norm before clipping) of the uploads prepared here."""
        return np.asarray(self.norms, np.float64).reshape(-1)
