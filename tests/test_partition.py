import numpy as np
import pytest

from fcit_hpc.benchmark.partition import dirichlet_partition, dirichlet_sizes
from fcit_hpc.benchmark.schedule import Schedule
from fcit_hpc.errors import ConfigError

from .published import PUBLISHED_HET_CAPABILITY, PUBLISHED_HET_TASK


@pytest.mark.parametrize(
    "n,k,beta,m", [(500, 50, 0.5, 2), (500, 50, 5.0, 2), (97, 10, 1.0, 9), (60, 3, 0.1, 1)]
)
def test_every_sample_exactly_once_and_minimum(n, k, beta, m):
    for seed in range(5):
        shards = dirichlet_partition(n, k, beta, m, seed=seed)
        allidx = np.concatenate(shards)
        assert sorted(allidx.tolist()) == list(range(n))
        assert min(len(s) for s in shards) >= m


def test_deterministic_for_a_seed():
    a = dirichlet_partition(300, 20, 1.0, 2, seed=3)
    b = dirichlet_partition(300, 20, 1.0, 2, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_spread_grows_as_beta_shrinks():
    def spread(beta):
        return np.mean([dirichlet_sizes(2000, 50, beta, 2, seed=s).std() for s in range(30)])

    s05, s1, s5 = spread(0.5), spread(1.0), spread(5.0)
    assert s05 > s1 > s5


def test_bad_beta_and_too_few_samples():
    with pytest.raises(ConfigError, match="dirichlet_beta"):
        dirichlet_sizes(100, 10, 0.0, 1, seed=0)
    with pytest.raises(ConfigError, match="min_client_samples"):
        dirichlet_sizes(10, 10, 1.0, 2, seed=0)


def test_schedules():
    hom = Schedule("task", "hom", 8, "table", seed=0)
    assert hom.stages == [[t] for t in range(8)]
    assert {hom.unit_of(3, r, j) for r in range(3) for j in range(5)} == {3}
    cap = Schedule("capability", "hom", 8, "table", seed=0)
    assert cap.stages == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize(
    "setting,table", [("task", PUBLISHED_HET_TASK), ("capability", PUBLISHED_HET_CAPABILITY)]
)
def test_het_table_is_the_published_one(setting, table):
    het = Schedule(setting, "het", 8, "table", seed=0)
    assert het.num_stages == len(table)
    for t, row in enumerate(table):
        for r in (0, 1, 7):
            # slots beyond the 5 published clients cycle through the row
            got = [het.unit_of(t, r, j) for j in range(12)]
            assert got == [row[j % len(row)] for j in range(12)], (setting, t, r)


def test_het_random_is_uniform_seeded_and_in_range():
    stages, rounds, slots = 8, 50, 5
    n = stages * rounds * slots  # draws, each uniform over the 8 stages if the assignment is right

    def draws(seed):
        rnd = Schedule("task", "het", stages, "random", seed=seed)
        return np.array(
            [
                rnd.unit_of(t, r, j)
                for t in range(stages)
                for r in range(rounds)
                for j in range(slots)
            ]
        )

    d0 = draws(0)
    assert d0.dtype.kind == "i" and d0.min() >= 0 and d0.max() < stages
    # per stage: Binomial(n, 1/8); the count must lie within mean ± 5σ
    p = 1 / stages
    mean, sigma = n * p, np.sqrt(n * p * (1 - p))  # 250, ~14.8
    counts = np.bincount(d0, minlength=stages)
    assert np.all(np.abs(counts - mean) <= 5 * sigma), counts
    assert np.array_equal(draws(0), d0)  # a fresh schedule with the same seed draws the same
    # another seed: independent draws agree on a slot with probability 1/8 -> Binomial(n, 1/8)
    agree = int((draws(1) == d0).sum())
    assert agree <= mean + 5 * sigma, agree
