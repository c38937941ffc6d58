"""Sweeps (``sweep`` in the config): the grid of cells, their configs, the comparison's paired
difference, and a sweep run whose cells equal the same runs made one by one."""

from pathlib import Path

import numpy as np
import pytest

from fcit_hpc.compare import cell_config, paired_difference, sweep_cells
from fcit_hpc.config import load_config
from fcit_hpc.errors import ConfigError
from fcit_hpc.state.schema import comparable_content, read_state, same_content

from .conftest import ROOT, fcit, smoke_serial

CELLS = str(ROOT / "configs/paper_cells.yaml")


def test_paper_cells_are_the_12_cells_with_the_capability_lora():
    cfg = load_config(CELLS)
    cells = sweep_cells(cfg)
    assert len(cells) == 12
    got = set()
    for name, over in cells:
        c = cell_config(cfg, over, Path("/x") / name)
        b = c.benchmark
        got.add((b.scenario, b.setting, b.dirichlet_beta))
        # the paper's LoRA: task 8 subspaces (rank 64), capability 4 (rank 32), rank 8 each
        assert c.lora.max_subspaces == (8 if b.setting == "task" else 4)
        assert c.lora.lora_r == 8 and c.out_dir == f"/x/{name}" and c.sweep == []
        assert c.compare == ["finetune", "disco"]
    want = {(s, t, b) for s in ("hom", "het") for t in ("task", "capability") for b in (0.5, 1, 5)}
    assert got == want
    assert cells[0][0] == "hom_task_0.5" and cells[-1][0] == "het_capability-4_5.0"


def test_a_bad_cell_names_its_field(tmp_path):
    cfg = load_config(None, ["sweep=[[method.tau=0.5, method.tau=7]]"])
    _, over = sweep_cells(cfg)[1]
    with pytest.raises(ConfigError, match="method.tau"):
        cell_config(cfg, over, tmp_path)
    with pytest.raises(ConfigError, match=r"sweep\[0\]\[0\]"):
        load_config(None, ["sweep=[[seed=3]]"])
    with pytest.raises(ConfigError, match=r"sweep\[0\]"):
        load_config(None, ["sweep=[[]]"])


def test_sweep_cells_equal_the_runs_made_one_by_one(tmp_path):
    """A 2-cell τ sweep of the smoke config: every cell's state equals, bitwise, the plain run
    of the same override; sweep.md has one row per cell."""
    out = tmp_path / "sweep"
    p = fcit(
        "run",
        str(ROOT / "configs/smoke.yaml"),
        "--out",
        str(out),
        "sweep=[[method.tau=0.2, method.tau=0.999]]",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    table = (out / "sweep.md").read_text()
    assert "| 0.2 | DISCO |" in table and "| 0.999 | DISCO |" in table
    subs = []
    for tau in ("0.2", "0.999"):
        ref = smoke_serial(tmp_path / f"ref{tau}", f"method.tau={tau}")
        cell = out / tau / "disco" / "seed0"
        assert same_content(comparable_content(cell), comparable_content(ref)) == []
        subs.append(read_state(cell).num_subspaces)
    assert subs[0] < subs[1]  # the cells differ: a looser τ merges more clients


def test_paired_difference_against_the_formula(tmp_path, monkeypatch):
    lasts = {
        "finetune": [10.0, 20.0, 30.0],
        "olora": [12.0, 25.0, 26.0],
        "disco": [15.0, 22.0, 40.0],
    }
    lasts["multitask"] = [99.0, 99.0, 99.0]  # the bound is never "the best baseline"

    class St:
        def __init__(self, v):
            self.summary = {"last": v}

    def fake_read(d):
        d = Path(d)
        return St(lasts[d.parent.name][int(d.name[4:])])

    monkeypatch.setattr("fcit_hpc.compare.read_state", fake_read)
    text = paired_difference(tmp_path, ["finetune", "olora", "disco", "multitask"], [0, 1, 2])
    d = np.array([15 - 12, 22 - 25, 40 - 26.0])  # O-LoRA has the best mean (21.0 vs 20.0)
    assert "(O-LoRA)" in text and "+3.00, -3.00, +14.00" in text
    assert f"mean {d.mean():+.2f} ± {d.std():.2f}" in text and "2 of 3 seeds" in text
    assert paired_difference(tmp_path, ["finetune", "multitask"], [0]) == ""
