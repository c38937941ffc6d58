"""slurm/fcit.sbatch against a real slurmctld + slurmd (one node on 127.0.0.1): mpirun and
`srun --mpi=pmix` launches give the serial run's state; a job killed mid-run is resubmitted with
FCIT_RESUME and ends bitwise equal to the serial run."""

import os

import pytest

from fcit_hpc.state.schema import comparable_content, read_state, same_content

from .conftest import ROOT
from .slurm_cluster import SlurmCluster, missing_binaries

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
SMOKE = str(ROOT / "configs/smoke.yaml")
SBATCH = str(ROOT / "slurm/fcit.sbatch")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    assert not missing, (
        f"SLURM test needs {missing}: `make test` installs slurm-wlm and munge (apt, as root)"
    )
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _job_env(**extra) -> dict:
    env = {"FCIT_VENV": str(ROOT / ".venv"), "TRITON_INTERPRET": None}
    env.update(extra)
    return env


def _submit(cluster, tmp_path, name, *args, **env):
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    job, rc, msg = cluster.sbatch(
        ["--ntasks=2", f"--output={out}", f"--error={err}", SBATCH, *args],
        cwd=ROOT,
        env=_job_env(**env),
    )
    assert job is not None, msg + cluster.logs()
    log = (out.read_text() if out.exists() else "") + (err.read_text() if err.exists() else "")
    return rc, log


def test_srun_pmix_starts_a_step(cluster):
    """`srun --mpi=pmix` loads the PMIx library (on Debian the unversioned libpmix.so comes with
    libpmix-dev; `srun --mpi=list` names pmix even without it), and the set-up check agrees."""
    import subprocess

    p = subprocess.run(
        ["srun", "-n1", "--mpi=pmix", "true"], env=cluster.env, capture_output=True, text=True
    )
    check = subprocess.run([str(ROOT / "slurm/check_pmix.sh")], capture_output=True, text=True)
    assert p.returncode == 0 and check.returncode == 0, p.stderr + check.stderr


@pytest.mark.parametrize("launch", ["mpirun", "srun"])
def test_sbatch_run_equals_serial(cluster, serial_run, tmp_path, launch):
    run = tmp_path / "run"
    rc, log = _submit(cluster, tmp_path, launch, SMOKE, "--out", str(run), FCIT_LAUNCH=launch)
    assert rc == 0, log[-3000:]
    st = read_state(run)
    assert st.done and set(int(r) for r in st.clients["rank"]) == {0, 1}  # two real ranks
    assert same_content(comparable_content(serial_run), comparable_content(run)) == []


def test_killed_job_resubmitted_with_resume(cluster, serial_run, tmp_path):
    run = tmp_path / "run"
    kill = ["debug.kill_rank=1", "debug.kill_stage=1", "debug.kill_round=1"]
    rc, log = _submit(cluster, tmp_path, "killed", SMOKE, "--out", str(run), *kill)
    assert rc != 0, "the job whose rank was killed must fail"
    st = read_state(run)
    assert (st.stage, st.round, st.done) == (1, 0, False)
    rc, log = _submit(cluster, tmp_path, "resumed", FCIT_RESUME=str(run))
    assert rc == 0, log[-3000:]
    assert same_content(comparable_content(serial_run), comparable_content(run)) == []
    assert os.path.exists(run / "report.md")
