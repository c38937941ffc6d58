import numpy as np
import pytest

from fcit_hpc.eval.metrics import cl_metrics, first_stages

R = np.array(
    [
        [80.0, 10.0, 5.0],
        [60.0, 90.0, 20.0],
        [50.0, 70.0, 85.0],
    ]
)


def test_hand_computed_metrics():
    m = cl_metrics(R, [0, 1, 2])
    assert m["last"] == pytest.approx((50 + 70 + 85) / 3)
    # Avg: stage0 mean(80); stage1 mean(60, 90); stage2 mean(50, 70, 85)
    assert m["avg"] == pytest.approx((80 + 75 + 205 / 3) / 3)
    # forgetting: task0 max(80, 60) - 50 = 30; task1 max(90) - 70 = 20
    assert m["forgetting"] == pytest.approx(25)
    # BWT: (50 - 80 + 70 - 90) / 2
    assert m["bwt"] == pytest.approx(-25)
    # FWT: task1 before stage1 = 10; task2 before stage2 = 20
    assert m["fwt"] == pytest.approx(15)


def test_single_stage_and_no_forgetting():
    m = cl_metrics(np.array([[40.0, 60.0]]), [0, 0])
    assert m["last"] == 50 and m["avg"] == 50
    assert np.isnan(m["forgetting"]) and np.isnan(m["bwt"]) and np.isnan(m["fwt"])
    flat = cl_metrics(np.array([[50.0, 0.0], [50.0, 50.0]]), [0, 1])
    assert flat["forgetting"] == 0 and flat["bwt"] == 0


def test_first_stages_het_trains_early():
    stages = [[0], [1], [2]]
    assert first_stages(stages, 3) == [0, 1, 2]
    # in Het-FCIT a client of stage 0 may train task 2
    assert first_stages(stages, 3, [(0, 0), (0, 2), (1, 1)]) == [0, 1, 0]
    with pytest.raises(ValueError):
        cl_metrics(R, [0, 1])
