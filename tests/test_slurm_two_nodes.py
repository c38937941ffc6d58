"""slurm/fcit.sbatch on a real two-node SLURM cluster (tests/slurm_cluster.TwoNodeCluster: two
slurmd in their own network and UTS namespaces, joined by a veth pair, one slurmctld): the smoke
config with one rank per node, launched by mpirun and by `srun --mpi=pmix`, ends bitwise equal to
the one-process run; the srun job is stopped by `scancel --signal=TERM` on the way, requeued by
the script, and continues across both nodes to the same state."""

import pytest

from fcit_hpc.state.schema import comparable_content, read_state, same_content

from .conftest import ROOT
from .slurm_cluster import TwoNodeCluster, missing_binaries
from .test_slurm import _job_env, _run_to_hold_then

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
SMOKE = str(ROOT / "configs/smoke.yaml")
SBATCH = str(ROOT / "slurm/fcit.sbatch")
ONE_RANK_PER_NODE = ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    assert not missing, f"SLURM test needs {missing}: `make test` installs slurm-wlm and munge"
    c = TwoNodeCluster(tmp_path_factory.mktemp("slurm2"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _ranks_on_both_nodes(log: str) -> bool:
    return "2 rank(s) on 2 host(s): n1: rank 0; n2: rank 1" in log


def test_two_nodes_mpirun_equals_one_process(cluster, serial_run, tmp_path):
    run, out = tmp_path / "run", tmp_path / "mpirun.log"
    job, rc, msg = cluster.sbatch(
        [*ONE_RANK_PER_NODE, f"--output={out}", f"--error={out}", SBATCH, SMOKE, "--out", str(run)],
        cwd=ROOT,
        env=_job_env(FCIT_LAUNCH="mpirun"),
    )
    log = out.read_text(errors="replace") if out.exists() else msg
    assert rc == 0, log[-3000:] + cluster.logs()
    assert _ranks_on_both_nodes(log), log[-3000:]
    assert cluster.job(job)["NodeList"] == "n[1-2]"
    st = read_state(run)
    assert st.done and set(int(r) for r in st.clients["rank"]) == {0, 1}
    assert same_content(comparable_content(serial_run), comparable_content(run)) == []


def test_two_nodes_srun_stopped_requeued_and_continued_equals_one_process(
    cluster, serial_run, tmp_path
):
    seen = {}

    def term(job):
        seen["cursor"] = (read_state(tmp_path / "run").stage, read_state(tmp_path / "run").round)
        cluster.run("scancel", "--signal=TERM", str(job))

    run, log, info = _run_to_hold_then(
        cluster, tmp_path, "term", (1, 1), term, launch="srun", sbatch_args=ONE_RANK_PER_NODE
    )
    assert seen["cursor"] == (1, 0)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-15000:]
    assert "fcit: stopped on SIGTERM after stage 1 round 0, the last completed round" in log
    assert "requeueing job" in log and "start 2: fcit run" in log, log[-3000:]
    assert log.count("2 rank(s) on 2 host(s): n1: rank 0; n2: rank 1") == 2, log[-3000:]
    assert same_content(comparable_content(serial_run), comparable_content(run)) == []
