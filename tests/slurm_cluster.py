"""A one-node SLURM cluster on 127.0.0.1 for the tests: munged, slurmctld and slurmd started in a
private directory (own ports, own munge socket, own state) and stopped by pid afterwards.

Needs Debian's `slurm-wlm` and `munge` (`make test` installs them when it can)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []
        self.shm: Path | None = None  # the jobs' Open MPI shared-memory directory (start)
        self.env = dict(os.environ)

    # -- set-up ---------------------------------------------------------------------------------
    def _write_conf(self) -> Path:
        r = self.root
        for d in ("state", "spool", "log", "munge", "tmp"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        node = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True)
        node_line = node.stdout.splitlines()[0].strip()
        host = re.match(r"NodeName=(\S+)", node_line).group(1)
        self.socket = r / "munge" / "munge.socket"
        conf = f"""
ClusterName=fcittest
SlurmctldHost={host}(127.0.0.1)
SlurmUser={os.environ.get("USER", "root") if os.getuid() else "root"}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
        path = r / "slurm.conf"
        path.write_text(conf)
        # srun --mpi=pmix makes <base>/spmix_appdir_<uid>_<job>.<step> (default base /tmp) and does
        # not remove it when the step is torn down (requeue, SIGTERM); job ids start at 1 in every
        # test cluster, so a stale one from an earlier cluster fails that step's launch ("Cannot
        # create client cli tmpdir ... File exists"). This cluster keeps its own.
        (r / "mpi.conf").write_text(f"PMIxCliTmpDirBase={r}/tmp\n")
        return path

    def start(self) -> SlurmCluster:
        conf = self._write_conf()
        r = self.root
        self.env["SLURM_CONF"] = str(conf)
        # Open MPI's shared-memory segments are named after the job (for an srun step, after the
        # SLURM job id, which starts at 1 in every test cluster): this cluster's jobs keep theirs
        # in a directory of their own, so that no stale or concurrent cluster's segment is met.
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else r
        self.shm = Path(tempfile.mkdtemp(prefix="fcit-slurm-test-", dir=shm))
        self.env["OMPI_MCA_btl_sm_backing_directory"] = str(self.shm)
        self._spawn(
            [
                _exe("munged"),
                "-F",
                "-f",
                f"--socket={self.socket}",
                f"--key-file={r}/munge/munge.key",
                f"--pid-file={r}/munge/munged.pid",
                f"--seed-file={r}/munge/seed",
                f"--log-file={r}/log/munged.log",
            ],
        )
        self._wait(lambda: self.socket.exists(), "munged socket", r / "log" / "munged.log")
        self._spawn([_exe("slurmctld"), "-D", "-i", "-f", str(conf)])
        self._wait(
            lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]),
            "slurmctld",
            r / "log" / "slurmctld.log",
        )
        self._spawn([_exe("slurmd"), "-D", "-f", str(conf)])
        self._wait(self._node_idle, "slurmd (node idle)", r / "log" / "slurmd.log")
        return self

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / (Path(cmd[0]).name + ".stdout"), "wb")
        self.procs.append(
            subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def _out(self, cmd: list[str]) -> str:
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        return p.stdout + p.stderr

    def _ok(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def _node_idle(self) -> bool:
        out = self._out(["sinfo", "-h", "-o", "%T"]).strip()
        return out in ("idle", "mixed", "allocated")

    def _wait(self, cond, what: str, log: Path, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{p.args[0]} exited ({p.returncode}) while waiting for "
                        f"{what}:\n{self.logs()}"
                    )
            if cond():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"== {f.name}\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    # -- jobs -----------------------------------------------------------------------------------
    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600):
        """Submit with `sbatch --wait`; returns (job id, exit code of sbatch)."""
        p = subprocess.run(
            ["sbatch", "--parsable", "--wait", *args],
            cwd=cwd,
            env=self._job_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        m = re.search(r"^(\d+)", p.stdout.strip())
        return (int(m.group(1)) if m else None), p.returncode, p.stdout + p.stderr

    def submit(self, args: list[str], cwd: Path, env: dict | None = None) -> int:
        """Submit without waiting; returns the job id."""
        p = subprocess.run(
            ["sbatch", "--parsable", *args],
            cwd=cwd,
            env=self._job_env(env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        m = re.search(r"^(\d+)", p.stdout.strip())
        if m is None:
            raise RuntimeError(f"sbatch failed: {p.stdout}{p.stderr}\n{self.logs()}")
        return int(m.group(1))

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        out = self._out(["scontrol", "show", "job", "-o", str(job_id)])
        return dict(x.split("=", 1) for x in out.split() if "=" in x)

    def wait_job(self, job_id: int, cond, what: str, timeout: float = 240.0) -> dict[str, str]:
        """Poll the job until ``cond(info)`` holds; returns that info."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            info = self.job(job_id)
            if cond(info):
                return info
            time.sleep(0.3)
        raise RuntimeError(f"job {job_id}: timed out waiting for {what}: {info}\n{self.logs()}")

    def run(self, *cmd: str, check: bool = True) -> str:
        """A SLURM command (scontrol, scancel) on this cluster; raises on failure (``check``)."""
        p = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if p.returncode and check:
            raise RuntimeError(f"{' '.join(cmd)}: {p.stdout}{p.stderr}")
        return p.stdout

    def _job_env(self, env: dict | None) -> dict:
        e = dict(self.env)
        for k, v in (env or {}).items():  # None removes a variable
            e.pop(k, None) if v is None else e.__setitem__(k, v)
        return e

    # -- tear-down ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel the jobs left (a failed test's), then stop the daemons."""
        if self.procs and self._ok(["scancel", "--full", "--partition=debug"]):
            t0 = time.monotonic()
            while self._out(["squeue", "-h"]).strip() and time.monotonic() - t0 < 30:
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        if self.shm is not None:
            shutil.rmtree(self.shm, ignore_errors=True)
