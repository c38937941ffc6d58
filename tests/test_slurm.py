"""slurm/fcit.sbatch against a real slurmctld + slurmd (one node on 127.0.0.1): mpirun and
`srun --mpi=pmix` launches give the serial run's state; a job killed mid-run is resubmitted with
FCIT_RESUME and ends bitwise equal to the serial run; a job requeued by `scontrol requeue`, and
one stopped by `scancel --signal=TERM` (exit 75, requeued by the script), continue by themselves
and end bitwise equal to it."""

import os
import time

import pytest

from fcit_hpc.state.schema import comparable_content, read_state, same_content

from .conftest import KILL_RANK1_STAGE1_ROUND1, ROOT
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


def test_step_that_fails_to_launch_fails_the_job(cluster, tmp_path):
    """srun (SLURM 22.05) exits 0 when its step's tasks fail to launch; the script must not report
    that as a finished run. The launch is made to fail as a stale PMIx directory made it fail once
    (``<PMIxCliTmpDirBase>/spmix_appdir_<uid>_<job>.0`` left by an earlier cluster's job)."""
    run, log = tmp_path / "run", tmp_path / "nolaunch.log"
    job = cluster.submit(
        ["--hold", "--ntasks=2", f"--output={log}", f"--error={log}", SBATCH, SMOKE]
        + ["--out", str(run)],
        cwd=ROOT,
        env=_job_env(FCIT_LAUNCH="srun"),
    )
    stale = cluster.root / "tmp" / f"spmix_appdir_{os.getuid()}_{job}.0"
    stale.mkdir()
    try:
        cluster.run("scontrol", "release", str(job))
        info = cluster.wait_job(job, lambda i: i["JobState"] in ("COMPLETED", "FAILED"), "the end")
    finally:
        stale.rmdir()
    text = log.read_text(errors="replace")
    assert "launch failed" in text, text  # the cause is the one meant (srun's own message)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", (info, text)
    assert "srun exited 0 but fcit did not get to its end" in text, text
    assert not (run / "state.h5").exists()


def test_killed_job_resubmitted_with_resume(cluster, serial_run, tmp_path):
    run = tmp_path / "run"
    kill = KILL_RANK1_STAGE1_ROUND1
    rc, log = _submit(cluster, tmp_path, "killed", SMOKE, "--out", str(run), *kill)
    assert rc != 0, "the job whose rank was killed must fail"
    st = read_state(run)
    assert (st.stage, st.round, st.done) == (1, 0, False)
    rc, log = _submit(cluster, tmp_path, "resumed", FCIT_RESUME=str(run))
    assert rc == 0, log[-3000:]
    assert same_content(comparable_content(serial_run), comparable_content(run)) == []
    assert os.path.exists(run / "report.md")


def _log_has(path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


def _run_to_hold_then(cluster, tmp_path, name, hold_at, act, launch="mpirun", sbatch_args=()):
    """Submit smoke held before round ``hold_at`` (debug.hold_file), call ``act(job)`` there,
    let the hold go, release the requeued job (a requeued job waits about 2 min, BeginTime, for
    its nodes to be cleaned; the test cannot wait that long) and wait until it completes.
    Returns (run dir, log of both starts, job info at the end)."""
    run, hold, log = tmp_path / "run", tmp_path / "hold", tmp_path / f"{name}.log"
    hold.touch()
    stage, rnd = hold_at
    job = cluster.submit(
        [
            *(sbatch_args or ["--ntasks=2"]),
            f"--output={log}",
            f"--error={log}",
            "--open-mode=append",  # the requeued start appends to the same log
            SBATCH,
            SMOKE,
            "--out",
            str(run),
            f"debug.hold_file={hold}",
            f"debug.hold_stage={stage}",
            f"debug.hold_round={rnd}",
        ],
        cwd=ROOT,
        env=_job_env(FCIT_LAUNCH=launch),
    )
    where = f"before stage {stage} round {rnd}"
    held = f"holding {where}"
    try:
        cluster.wait_job(job, lambda i: _log_has(log, held), held)
        act(job)
        # Let the file go only once the signal has ended the hold (rank 0 logs it) or the first
        # start is over (mpirun's prterun, signalled by the requeue, kills the ranks at once):
        # else rank 0 may see the file gone first and run one more round before the signal.
        ended = f"debug: hold {where} ended by SIG"
        cluster.wait_job(
            job,
            lambda i: _log_has(log, ended) or (i["Restarts"] == "1" and i["JobState"] == "PENDING"),
            "the signal at the hold, or the end of the first start",
        )
    finally:
        hold.unlink()  # the requeued start runs through
    cluster.wait_job(job, lambda i: i.get("Restarts") == "1", "the requeue")
    cluster.wait_job(job, lambda i: i["JobState"] != "COMPLETING", "the requeue to settle")
    if cluster.job(job)["JobState"] == "PENDING":  # (it may have started meanwhile)
        # Not at once: the requeue revoked the job's credential at a time stamped to the second,
        # and slurmd refuses a credential made in that same second ("Killing non-startable batch
        # JobId=N: Job credential revoked", the job ends FAILED). Two seconds on is past it, and
        # `StartTime=now` has the scheduler start it then (a later StartTime waits for its next
        # periodic pass, up to a minute).
        time.sleep(2)
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    info = cluster.wait_job(job, lambda i: i["JobState"] in ("COMPLETED", "FAILED"), "the end")
    text = log.read_text(errors="replace")
    if info["JobState"] != "COMPLETED":  # what SLURM said goes with the assertion's message
        text += f"\n-- job {job}: {info}\n{cluster.logs()}"
    return run, text, info


def test_scontrol_requeue_before_the_first_round_continues_by_itself(cluster, serial_run, tmp_path):
    """`scontrol requeue` of a running job that has not stored a round yet: SLURM kills it and
    starts it again; the script's `--continue` starts the run afresh from its config.yaml."""
    seen = {}

    def requeue(job):
        run = tmp_path / "run"
        seen["state"], seen["config"] = (run / "state.h5").exists(), (run / "config.yaml").exists()
        cluster.run("scontrol", "requeue", str(job))

    run, log, info = _run_to_hold_then(cluster, tmp_path, "requeue", (0, 0), requeue)
    assert seen == {"state": False, "config": True}
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-15000:]
    assert "start 2: fcit run" in log and "starting afresh from" in log, log[-3000:]
    assert same_content(comparable_content(serial_run), comparable_content(run)) == []


def test_scancel_signal_term_stops_at_a_round_and_requeues(cluster, serial_run, tmp_path):
    """`scancel --signal=TERM` (srun launch: the step's tasks get it): every rank stops after the
    last completed round (stage 1 round 0), fcit exits 75, the script requeues the job, and the
    requeued start continues from state.h5 to the uninterrupted run's state."""
    seen = {}

    def term(job):
        st = read_state(tmp_path / "run")
        seen["cursor"] = (st.stage, st.round)
        cluster.run("scancel", "--signal=TERM", str(job))

    run, log, info = _run_to_hold_then(cluster, tmp_path, "term", (1, 1), term, launch="srun")
    assert seen["cursor"] == (1, 0)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-15000:]
    assert "fcit: stopped on SIGTERM after stage 1 round 0, the last completed round" in log
    assert "requeueing job" in log and "start 2: fcit run" in log, log[-3000:]
    assert same_content(comparable_content(serial_run), comparable_content(run)) == []
