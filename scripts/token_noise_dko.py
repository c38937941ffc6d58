"""DKO's matching under noisy identity tokens (``privacy.token_noise``): the server's DKO run over
a config's whole schedule with the run's own code (plan, identity encoder, the token noise, the
method's matching), for several σ_t, without training — DKO's decisions depend on the tokens
only. One table: subspaces created, sample-weighted purity (share of a subspace's samples from
its majority data unit), the agreement of the grouping with the exact tokens' (Rand index over
pairs of client-rounds: same subspace in both or different in both; subspace ids may differ),
and each token's ε.

    python scripts/token_noise_dko.py CONFIG [key=value ...] [--sigmas 0 0.005 0.01 0.02 0.05]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from fcit_hpc.config import load_config
from fcit_hpc.fed.client import identity_token
from fcit_hpc.fed.comm import LocalComm
from fcit_hpc.fed.privacy import token_epsilon
from fcit_hpc.fed.private_upload import noisy_token
from fcit_hpc.fed.server.dko import run_dko
from fcit_hpc.fed.server.plan import plan_round
from fcit_hpc.fed.server.run_state import init_state
from fcit_hpc.fed.wire import TokenUpload
from fcit_hpc.methods.dko_diagnostics import purity
from fcit_hpc.run import build_context


def simulate(ctx, cfg) -> tuple[dict, np.ndarray, int]:
    """(stage, round, client) → subspace, counts [S_max, units], live subspaces."""
    data = ctx.data
    shape = (data.num_stages, data.num_tasks)
    st = init_state(
        ctx.adapter,
        ctx.method,
        seed=cfg.seed,
        config_yaml="",
        dim=ctx.encoder.dim,
        shape=shape,
        strategy=ctx.strategy,
    )
    counts = np.zeros((st.adapter.shape[0], data.num_stages), np.int64)
    out = {}
    for stage in range(data.num_stages):
        for rnd in range(cfg.federation.num_rounds):
            ups = []
            plan = plan_round(
                cfg.federation, data.schedule, seed=cfg.seed, stage=stage, round_=rnd, world=1
            )
            for c, unit, _ in plan:
                mu, n = identity_token(ctx, int(unit), int(c))
                noisy = noisy_token(
                    mu, std=cfg.privacy.token_noise, seed=cfg.seed, client=int(c), unit=int(unit)
                )
                ups.append(TokenUpload(int(c), n, noisy, 0))
            units = {int(c): int(u) for c, u, _ in plan}
            for c, d in run_dko(st, ctx.method, ups).decisions.items():
                out[(stage, rnd, c)] = d.subspace
                if d.subspace >= 0:
                    counts[d.subspace, units[c]] += next(u.samples for u in ups if u.client == c)
    return out, counts, st.num_subspaces


def rand_index(a: dict, b: dict) -> float:
    """Share of pairs of keys that both groupings put together, or both apart."""
    keys = sorted(a)
    x = np.array([a[k] for k in keys])
    y = np.array([b[k] for k in keys])
    same_x, same_y = x[:, None] == x[None, :], y[:, None] == y[None, :]
    iu = np.triu_indices(len(keys), 1)
    return float((same_x == same_y)[iu].mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--sigmas", nargs="+", type=float, default=[0, 0.005, 0.01, 0.02, 0.05])
    a = ap.parse_args(argv)
    cfg = load_config(a.config, [*a.overrides, "compare=[]"])
    ctx = build_context(cfg, LocalComm())
    ref = None
    print("| σ_t | ε per token (δ = 1e-5) | subspaces | purity | agreement with exact |")
    print("|---|---|---|---|---|")
    for s in a.sigmas:
        c = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, token_noise=s))
        got, counts, live = simulate(ctx, c)
        ref = ref if ref is not None else got
        same = rand_index(got, ref)
        eps = "∞" if s == 0 else f"{token_epsilon(s, 1e-5):,.0f}"
        print(f"| {s:g} | {eps} | {live} | {purity(counts)[1]:.2f} | {same:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
