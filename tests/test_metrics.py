import numpy as np
import pytest

from fcit_hpc.eval.metrics import cl_metrics, first_stages

from .published import PUBLISHED_HET_TASK

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


def test_first_stages_from_what_clients_trained():
    stages = [[0], [1], [2]]
    assert first_stages(stages, 3, [(0, 0), (1, 1), (2, 2)]) == [0, 1, 2]
    # Het-FCIT: a client of stage 0 may train task 2 (early) ...
    assert first_stages(stages, 3, [(0, 0), (0, 2), (1, 1)]) == [0, 1, 0]
    # ... and a task may be first trained after its nominal stage, or never (-> T = 3)
    assert first_stages(stages, 3, [(0, 1), (2, 0)]) == [2, 0, 3]
    with pytest.raises(ValueError):
        cl_metrics(R, [0, 1])


# first stage in which any client trains task i, read off the table by hand:
# task 0 first appears in stage 2 (late), task 7 in stage 1 (early), task 3 in stage 1
HET_FIRST = [2, 0, 0, 1, 0, 0, 0, 1]


def test_first_stages_of_the_published_het_table():
    trained = [(t, u) for t, row in enumerate(PUBLISHED_HET_TASK) for u in row]
    assert first_stages([[i] for i in range(8)], 8, trained) == HET_FIRST


def test_het_metrics_do_not_count_a_task_before_it_was_trained():
    """Every task at 0 before its first training and 100 from then on: Avg = 100 and BWT = 0
    exactly. Counting task 0 from stage 0 (the old rule) would put its two untrained zeros
    into the stage-0/1 means and give it BWT +100."""
    R = np.array([[100.0 if t >= HET_FIRST[i] else 0.0 for i in range(8)] for t in range(8)])
    m = cl_metrics(R, HET_FIRST)
    assert m["last"] == 100 and m["avg"] == 100
    assert m["bwt"] == 0 and m["forgetting"] == 0
    # zero-shot/FWT: tasks 0, 3, 7 (first stage > 0) just before their stage: all 0
    assert m["fwt"] == 0
    old_rule = [0, 0, 0, 1, 0, 0, 0, 1]  # min(nominal stage 0, trained stage 2) for task 0
    wrong = cl_metrics(R, old_rule)
    assert wrong["avg"] < 100 and wrong["bwt"] == pytest.approx(100 / 8)


def test_het_metrics_hand_computed():
    """Task 0 (first trained in stage 2): 60 zero-shot, 90 when trained, 30 at the end; every
    other task 50 throughout."""
    R = np.full((8, 8), 50.0)
    R[:2, 0], R[2:7, 0], R[7, 0] = 60.0, 90.0, 30.0
    m = cl_metrics(R, HET_FIRST)
    assert m["last"] == pytest.approx((30 + 7 * 50) / 8)
    # Avg: stage 0 sees tasks {1,2,4,5,6} (all 50); stage 1 adds 3, 7 (50); stages 2-6 also
    # task 0 at 90; stage 7 task 0 at 30
    stage_means = [50, 50] + [(90 + 7 * 50) / 8] * 5 + [(30 + 7 * 50) / 8]
    assert m["avg"] == pytest.approx(np.mean(stage_means))
    # forgetting and BWT of task 0 start at its first training (90), not at its zero-shot 60:
    # forgetting 90 - 30 = 60, BWT 30 - 90 = -60; the seven others 0
    assert m["forgetting"] == pytest.approx(60 / 8)
    assert m["bwt"] == pytest.approx(-60 / 8)
    # FWT over tasks 0, 3, 7: R[1][0] = 60, R[0][3] = 50, R[0][7] = 50
    assert m["fwt"] == pytest.approx((60 + 50 + 50) / 3)


def test_accuracy_before_training_above_accuracy_after():
    """A task the base model answers better than after training: forgetting and BWT count from
    the stage it is trained (max over t >= first stage), never the higher pre-training value."""
    R = np.array(
        [
            [40.0, 70.0, 0.0],  # task 1 before its stage: 70 (zero-shot)
            [30.0, 20.0, 0.0],  # task 1 trained at stage 1: 20
            [30.0, 10.0, 80.0],
        ]
    )
    m = cl_metrics(R, [0, 1, 2])
    # forgetting: task 0 max(40, 30) - 30 = 10; task 1 max(20) - 10 = 10 (not 70 - 10)
    assert m["forgetting"] == pytest.approx(10)
    # BWT: task 0 30 - 40 = -10; task 1 10 - 20 = -10
    assert m["bwt"] == pytest.approx(-10)
    assert m["avg"] == pytest.approx((40 + 25 + 40) / 3)
    assert m["fwt"] == pytest.approx((70 + 0) / 2)
    # a task never trained (first stage = T) counts in Last only
    never = cl_metrics(R, [0, 1, 3])
    assert never["last"] == pytest.approx(40)
    assert never["avg"] == pytest.approx((40 + 25 + 20) / 3)
    assert never["fwt"] == pytest.approx(70)


def test_zero_shot_uses_the_het_schedule():
    """A method that trains nothing has no client records: its first stages come from the plan
    the schedule gives (the Het table), not from the Hom stage order."""
    from fcit_hpc.benchmark.schedule import Schedule
    from fcit_hpc.config import load_config
    from fcit_hpc.fed.server import planned_units

    cfg = load_config("configs/paper_tables_het.yaml", ["compare=[]", "method.name=zero_shot"])
    assert cfg.clients_per_round == 5
    het = Schedule("task", "het", 8, "table", seed=cfg.seed)
    assert first_stages(het.stages, 8, planned_units(cfg.federation, het, cfg.seed)) == HET_FIRST
    hom = Schedule("task", "hom", 8, "table", seed=cfg.seed)
    assert first_stages(hom.stages, 8, planned_units(cfg.federation, hom, cfg.seed)) == list(
        range(8)
    )
