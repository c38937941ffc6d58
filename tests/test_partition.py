import numpy as np
import pytest

from fcit_hpc.benchmark.partition import dirichlet_partition, dirichlet_sizes
from fcit_hpc.benchmark.schedule import HET_TABLE_TASK, Schedule
from fcit_hpc.errors import ConfigError


@pytest.mark.parametrize(
    "n,k,beta,m", [(500, 50, 0.5, 2), (500, 50, 5.0, 2), (97, 10, 1.0, 9), (60, 3, 0.1, 1)]
)
def test_every_sample_exactly_once_and_minimum(n, k, beta, m):
    for seed in range(5):
        shards = dirichlet_partition(n, k, beta, m, seed)
        allidx = np.concatenate(shards)
        assert sorted(allidx.tolist()) == list(range(n))
        assert min(len(s) for s in shards) >= m


def test_deterministic_for_a_seed():
    a = dirichlet_partition(300, 20, 1.0, 2, 3)
    b = dirichlet_partition(300, 20, 1.0, 2, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_spread_grows_as_beta_shrinks():
    def spread(beta):
        return np.mean([dirichlet_sizes(2000, 50, beta, 2, s).std() for s in range(30)])

    s05, s1, s5 = spread(0.5), spread(1.0), spread(5.0)
    assert s05 > s1 > s5


def test_bad_beta_and_too_few_samples():
    with pytest.raises(ConfigError, match="dirichlet_beta"):
        dirichlet_sizes(100, 10, 0.0, 1, 0)
    with pytest.raises(ConfigError, match="min_client_samples"):
        dirichlet_sizes(10, 10, 1.0, 2, 0)


def test_schedules():
    hom = Schedule("task", "hom", 8, "table", 0)
    assert hom.stages == [[t] for t in range(8)]
    assert {hom.unit_of(3, r, j) for r in range(3) for j in range(5)} == {3}
    het = Schedule("task", "het", 8, "table", 0)
    assert [het.unit_of(1, 0, j) for j in range(5)] == HET_TABLE_TASK[1]
    assert het.unit_of(1, 0, 5) == HET_TABLE_TASK[1][0]  # cycled beyond 5 clients
    cap = Schedule("capability", "hom", 8, "table", 0)
    assert cap.stages == [[0, 1], [2, 3], [4, 5], [6, 7]]
    rnd = Schedule("task", "het", 8, "random", 0)
    draws = [rnd.unit_of(2, r, j) for r in range(10) for j in range(5)]
    assert draws == [rnd.unit_of(2, r, j) for r in range(10) for j in range(5)]
    assert len(set(draws)) > 3
