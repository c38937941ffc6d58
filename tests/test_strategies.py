"""Aggregation and server optimizers against their formulas on hand-computed numbers."""

import numpy as np
import pytest

from fcit_hpc.fed.strategies import ServerOptConfig, make_strategy, weighted_average


def test_weighted_average_hand_computed():
    v = [np.array([1.0, 2.0], np.float32), np.array([4.0, -1.0], np.float32)]
    # (1*1 + 3*4)/4 = 3.25 ; (1*2 + 3*-1)/4 = -0.25
    np.testing.assert_array_equal(weighted_average(v, [1, 3]), np.array([3.25, -0.25], np.float32))


def test_weighted_average_rejects_empty_and_zero_weights():
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([np.ones(2, np.float32)], [0])


def _run(alg, deltas, **kw):
    opt = ServerOptConfig(fed_alg=alg, eta=0.1, tau=0.01, beta1=0.9, beta2=0.99, momentum=0.5, **kw)
    x = np.array([1.0], np.float32)
    strategy = make_strategy(opt)
    st = strategy.init_state(x.shape)
    for d in deltas:
        x = strategy.update(x, np.array([d], np.float32), st)
    return float(x[0]), st


def test_fedavg_and_fedprox_add_the_mean_delta():
    assert _run("fedavg", [0.5])[0] == pytest.approx(1.5)
    assert _run("fedprox", [0.5, -0.25])[0] == pytest.approx(1.25)


def test_fedavgm_momentum():
    # m1 = 0.5 -> x = 1.5 ; m2 = 0.5*0.5 + 0.5 = 0.75 -> x = 2.25
    x, st = _run("fedavgm", [0.5, 0.5])
    assert x == pytest.approx(2.25)
    assert st["m"][0] == pytest.approx(0.75)


def test_fedadam_two_steps():
    # v0 = tau^2 = 1e-4. step1: m = 0.1*0.5 = 0.05; v = 0.99e-4 + 0.01*0.25 = 0.002599
    m1, v1 = 0.05, 0.99 * 1e-4 + 0.01 * 0.25
    x1 = 1 + 0.1 * m1 / (np.sqrt(v1) + 0.01)
    m2, v2 = 0.9 * m1 + 0.1 * 0.2, 0.99 * v1 + 0.01 * 0.04
    x2 = x1 + 0.1 * m2 / (np.sqrt(v2) + 0.01)
    x, st = _run("fedadam", [0.5, 0.2])
    assert x == pytest.approx(x2, rel=1e-6)
    assert st["v"][0] == pytest.approx(v2, rel=1e-6)


def test_fedadagrad_accumulates_squares():
    v1 = 1e-4 + 0.25
    m1 = 0.05
    assert _run("fedadagrad", [0.5])[0] == pytest.approx(1 + 0.1 * m1 / (np.sqrt(v1) + 0.01))


def test_fedyogi_sign_rule():
    # v0 = 1e-4 < d^2 = 0.25 -> sign(v - d^2) = -1 -> v = 1e-4 + 0.01*0.25
    v1 = 1e-4 + 0.01 * 0.25
    x, st = _run("fedyogi", [0.5])
    assert st["v"][0] == pytest.approx(v1, rel=1e-6)
    assert x == pytest.approx(1 + 0.1 * 0.05 / (np.sqrt(v1) + 0.01), rel=1e-6)
    # when v > d^2 the rule decreases v: from v1 with d=0.01: v = v1 - 0.01*1e-4
    x2, st2 = _run("fedyogi", [0.5, 0.01])
    assert st2["v"][0] == pytest.approx(v1 - 0.01 * 1e-4, rel=1e-6)


def test_one_strategy_per_registered_fed_alg_and_fedprox_client_term():
    import torch

    from fcit_hpc.fed.strategies import STRATEGIES, FedProx, make_strategy
    from fcit_hpc.registry import FED_ALGS

    assert set(STRATEGIES) == set(FED_ALGS)
    assert make_strategy(ServerOptConfig("fedavg")).client_terms([]) == []
    p = [torch.tensor([1.0, 2.0], requires_grad=True)]
    (term,) = FedProx(ServerOptConfig("fedprox", prox_mu=0.5)).client_terms(p)
    with torch.no_grad():
        p[0] += torch.tensor([1.0, -2.0])
    assert float(term()) == pytest.approx(0.5 * 0.5 * (1 + 4))


def test_registry_lists_every_method_once():
    from fcit_hpc.config import METHODS
    from fcit_hpc.methods import method_class
    from fcit_hpc.registry import COMPARE_LABELS
    from fcit_hpc.registry import METHODS as REG

    assert tuple(REG) == METHODS
    for name in REG:
        assert method_class(name).name == name and name in COMPARE_LABELS
