import sys

import numpy as np
import pytest

from fcit_hpc.fed.comm import LocalComm

from .conftest import ROOT, mpiexec


def test_local_comm_is_world_of_one():
    c = LocalComm()
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = c.bcast_array(a)
    assert np.array_equal(a, b) and b is not a
    assert [x.tolist() for x in c.gatherv(np.array([1, 2]))] == [[1, 2]]
    assert c.scatterv([np.array([5, 6])], np.int64).tolist() == [5, 6]


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2, 3])
def test_mpi_collectives(n):
    p = mpiexec(n, sys.executable, str(ROOT / "tests/mpi/comm_check.py"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(line for line in p.stdout.splitlines() if "ok" in line) == [
        f"rank {i}/{n} ok" for i in range(n)
    ]


def test_no_module_but_comm_imports_mpi4py():
    offenders = [
        str(f.relative_to(ROOT))
        for f in (ROOT / "fcit_hpc").rglob("*.py")
        if ("import mpi4py" in f.read_text() or "from mpi4py" in f.read_text())
        and f.name != "comm.py"
    ]
    assert offenders == []
