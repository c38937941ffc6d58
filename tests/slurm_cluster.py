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


# what both clusters' slurm.conf share; ``node`` ("" or ".%n") and ``spool`` ("" or "/%n") name
# slurmd's files for one node or for each node (%n: its name)
_CONF = """
ClusterName={cluster}
SlurmctldHost={ctld_host}
SlurmUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool{spool}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd{node}.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd{node}.log
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
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class SlurmCluster:
    SHM_PREFIX = "fcit-slurm-test-"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []
        self.shm: Path | None = None  # the jobs' Open MPI shared-memory directory (start)
        self.env = dict(os.environ)

    def cmd(self, args: list[str], node: str | None = None) -> list[str]:
        """``args`` as run on ``node``: every SLURM command and daemon goes through this (here
        unchanged; :class:`TwoNodeCluster` runs them in the node's namespaces)."""
        return list(args)

    # -- set-up ---------------------------------------------------------------------------------
    def _make_dirs_and_key(self, *dirs: str) -> str:
        """The cluster's directories (``dirs`` besides the common ones) and a fresh munge key;
        returns the first line of ``slurmd -C`` (NodeName=... CPUs=... RealMemory=...)."""
        r = self.root
        for d in ("state", "log", "munge", "tmp", *dirs):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        node = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True)
        self.socket = r / "munge" / "munge.socket"
        return node.stdout.splitlines()[0].strip()

    def _write_conf_files(self, nodes: str, per_node: bool = False, **head) -> Path:
        """slurm.conf (``_CONF`` with ``head`` and the ``nodes`` lines) and mpi.conf."""
        r = self.root
        node, spool = (".%n", "/%n") if per_node else ("", "")
        conf = _CONF.format(r=r, socket=self.socket, node=node, spool=spool, nodes=nodes, **head)
        path = r / "slurm.conf"
        path.write_text(conf)
        # srun --mpi=pmix makes <base>/spmix_appdir_<uid>_<job>.<step> (default base /tmp) and does
        # not remove it when the step is torn down (requeue, SIGTERM); job ids start at 1 in every
        # test cluster, so a stale one from an earlier cluster fails that step's launch ("Cannot
        # create client cli tmpdir ... File exists"). This cluster keeps its own.
        (r / "mpi.conf").write_text(f"PMIxCliTmpDirBase={r}/tmp\n")
        return path

    def _write_conf(self) -> Path:
        node_line = self._make_dirs_and_key("spool")
        host = re.match(r"NodeName=(\S+)", node_line).group(1)
        return self._write_conf_files(
            f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN\n",
            cluster="fcittest",
            ctld_host=f"{host}(127.0.0.1)",
            user=os.environ.get("USER", "root") if os.getuid() else "root",
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
        )

    def _start_munged(self) -> Path:
        """slurm.conf, the jobs' environment and munged: all that the SLURM daemons need;
        returns the slurm.conf."""
        conf = self._write_conf()
        r = self.root
        self.env["SLURM_CONF"] = str(conf)
        # Open MPI's shared-memory segments are named after the job (for an srun step, after the
        # SLURM job id, which starts at 1 in every test cluster): this cluster's jobs keep theirs
        # in a directory of their own, so that no stale or concurrent cluster's segment is met.
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else r
        self.shm = Path(tempfile.mkdtemp(prefix=self.SHM_PREFIX, dir=shm))
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
        return conf

    def start(self) -> SlurmCluster:
        conf = self._start_munged()
        self._spawn(self.cmd([_exe("slurmctld"), "-D", "-i", "-f", str(conf)]), "slurmctld")
        self._wait(self._ctld_up, "slurmctld", self.root / "log" / "slurmctld.log")
        self._start_slurmd(conf)
        return self

    def _start_slurmd(self, conf: Path) -> None:
        self._spawn(self.cmd([_exe("slurmd"), "-D", "-f", str(conf)]), "slurmd")
        self._wait(self._node_idle, "slurmd (node idle)", self.root / "log" / "slurmd.log")

    def _spawn(self, cmd: list[str], name: str | None = None) -> None:
        """A daemon (``cmd`` as given: the caller applies :meth:`cmd`), its output in log/."""
        log = open(self.root / "log" / ((name or Path(cmd[0]).name) + ".stdout"), "wb")
        self.procs.append(
            subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def _out(self, cmd: list[str]) -> str:
        p = subprocess.run(self.cmd(cmd), env=self.env, capture_output=True, text=True)
        return p.stdout + p.stderr

    def _ok(self, cmd: list[str]) -> bool:
        return subprocess.run(self.cmd(cmd), env=self.env, capture_output=True).returncode == 0

    def _ctld_up(self) -> bool:
        return self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"])

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
            self.cmd(["sbatch", "--parsable", "--wait", *args]),
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
            self.cmd(["sbatch", "--parsable", *args]),
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
        p = subprocess.run(
            self.cmd(list(cmd)), env=self.env, capture_output=True, text=True, timeout=60
        )
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


class TwoNodeCluster(SlurmCluster):
    """Two SLURM nodes on this machine: each in its own network namespace (``ip netns``) and UTS
    namespace (its own host name, ``n1``/``n2``), joined by a veth pair on the project's test subnet
    ``SUBNET``; slurmctld runs beside slurmd in ``n1``; one munged (its Unix socket is a file, seen
    from both). Name resolution inside the namespaces comes from ``/etc/netns/<ns>/hosts``, which
    ``ip netns exec`` binds over ``/etc/hosts``. Traffic goes only between the two namespaces.
    Every SLURM command of the test runs in ``n1`` (:meth:`cmd`). :meth:`stop` tears it all down.

    Needs root (``ip netns``, ``unshare``) and iproute2; `make test` installs iproute2."""

    SUBNET = "10.213.0"  # .1 = n1, .2 = n2
    NODES = ("n1", "n2")
    SHM_PREFIX = "fcit-slurm2-test-"

    def __init__(self, root: Path):
        super().__init__(root)
        tag = f"{os.getpid() % 100000}"
        self.ns = {n: f"fcit{tag}-{n}" for n in self.NODES}
        self.veth = {n: f"fv{tag}{n}" for n in self.NODES}
        self.addr = {n: f"{self.SUBNET}.{i + 1}" for i, n in enumerate(self.NODES)}
        self._made: list[str] = []  # namespaces made (for the tear-down)

    def cmd(self, args: list[str], node: str | None = "n1") -> list[str]:
        """``args`` run in ``node``'s namespaces, with its host name."""
        # nsenter, not `ip netns exec`: that one remounts /sys for the namespace, without the
        # cgroup file system slurmd needs; a private mount namespace binds the hosts file instead
        # and each node's own local directory over the PMIx directory (``mpi.conf``), whose
        # per-step subdirectories carry no node name: a node-local /tmp, as real nodes have
        hosts = Path("/etc/netns", self.ns[node], "hosts")
        local, tmp = self.root / "local" / node, self.root / "tmp"
        inner = (
            f"mount --bind {hosts} /etc/hosts && mount --bind {local} {tmp} && "
            f'hostname {node} && exec "$@"'
        )
        netns = f"--net=/run/netns/{self.ns[node]}"
        return ["nsenter", netns, "unshare", "--uts", "--mount", "sh", "-c", inner, "sh"] + [
            str(a) for a in args
        ]

    def _network(self) -> None:
        ip = shutil.which("ip") or "/usr/sbin/ip"
        for n in self.NODES:
            subprocess.run([ip, "netns", "add", self.ns[n]], check=True, capture_output=True)
            self._made.append(n)
            hosts = Path("/etc/netns", self.ns[n])
            hosts.mkdir(parents=True, exist_ok=True)
            (hosts / "hosts").write_text(
                "127.0.0.1 localhost\n" + "".join(f"{self.addr[m]} {m}\n" for m in self.NODES)
            )
        a, b = self.NODES
        run = lambda *c: subprocess.run([ip, *c], check=True, capture_output=True)  # noqa: E731
        run("link", "add", self.veth[a], "type", "veth", "peer", "name", self.veth[b])
        for n in self.NODES:
            run("link", "set", self.veth[n], "netns", self.ns[n])
            run("-n", self.ns[n], "addr", "add", f"{self.addr[n]}/24", "dev", self.veth[n])
            run("-n", self.ns[n], "link", "set", self.veth[n], "up")
            run("-n", self.ns[n], "link", "set", "lo", "up")

    def _write_conf(self) -> Path:
        node_line = self._make_dirs_and_key(
            *(f"{d}/{n}" for n in self.NODES for d in ("spool", "local"))
        )
        hardware = node_line.split(None, 1)[1].strip()  # CPUs=... RealMemory=...
        # the two slurmd are in different network namespaces: the same port serves both
        return self._write_conf_files(
            "".join(
                f"NodeName={n} NodeAddr={self.addr[n]} NodeHostname={n} {hardware} State=UNKNOWN\n"
                for n in self.NODES
            ),
            per_node=True,
            cluster="fcittwo",
            ctld_host=f"n1({self.addr['n1']})",
            user="root",
            ctld_port=6917,
            slurmd_port=6918,
        )

    def start(self) -> TwoNodeCluster:
        if os.getuid() != 0:
            raise RuntimeError("the two-node SLURM cluster needs root (ip netns, unshare)")
        lacking = [b for b in ("ip", "nsenter", "unshare", "mount") if shutil.which(b) is None]
        if lacking:
            raise RuntimeError(f"the two-node SLURM cluster needs {lacking} (iproute2, util-linux)")
        self._network()
        return super().start()

    def _start_slurmd(self, conf: Path) -> None:
        for n in self.NODES:
            self._spawn(self.cmd([_exe("slurmd"), "-D", "-f", str(conf)], node=n), f"slurmd.{n}")
        self._wait(self._node_idle, "both slurmd (nodes idle)", self.root / "log")

    def _node_idle(self) -> bool:
        states = self._out(["sinfo", "-h", "-N", "-o", "%N %T"]).split()
        return states == ["n1", "idle", "n2", "idle"]

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for n in self._made:  # deleting a namespace deletes its end of the veth pair, and both
                subprocess.run(["ip", "netns", "del", self.ns[n]], capture_output=True)
                shutil.rmtree(Path("/etc/netns", self.ns[n]), ignore_errors=True)
            self._made.clear()
