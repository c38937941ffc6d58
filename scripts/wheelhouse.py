#!/usr/bin/env python3
"""`make wheelhouse`: every wheel of requirements.lock that another machine (an air-gapped GPU node)
needs, for its Python version and platform, in one folder that scripts/install_offline.sh installs
from with no index.

- Wheels of the lock are downloaded as binaries for the target (``pip download --no-deps
  --only-binary=:all: --python-version --implementation cp --platform ...``, several manylinux
  tags); a package with no wheel on the index is built here from its sdist, and kept only when the
  result is pure Python (``*-none-any``), which installs on any Python.
- DeepSpeed (an sdist only) is built here into a ``py3-none-any`` wheel with its ops left to JIT
  (``DS_BUILD_OPS=0``, ``pip wheel --no-deps --no-build-isolation``: the build imports torch).
- The project's own wheel (fcit_hpc with fcit_kernels and its package data) is built from a clean
  copy of the checkout's files.
- The folder also gets requirements.lock and wheelhouse.json (the target, what was left out), which
  the installer reads.

``--exclude`` leaves out packages the target already provides (shell-style patterns on the lock's
names: ``"torch torchvision triton nvidia-*"``); ``--only`` keeps only the named ones. Exit codes:
0 built; 2 bad arguments or lock; 3 a download or build failed (the package is named).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "fcit-hpc"
#: manylinux tags tried for x86-64 (pip matches each tag exactly, so list the common glibc levels)
DEFAULT_PLATFORMS = [
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_35_x86_64",
    "manylinux_2_39_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
#: lock entries never carried: the target venv has its own installer
NEVER = {"pip"}
#: files the installed code reads at run time; the project's wheel must hold them
PROJECT_DATA = [
    "fcit_hpc/_configs/hf/llava-1.5-7b/config.json",
    "fcit_hpc/_configs/bench_rounds.yaml",
    "fcit_hpc/model/embedded_model/model.safetensors",
    "fcit_kernels/__init__.py",
    "fcit_kernels/triton_ssa_lora.py",
]


class WheelhouseError(Exception):
    """A failed step; ``code`` is the exit code (2 input, 3 download/build)."""

    def __init__(self, msg: str, code: int = 3):
        super().__init__(msg)
        self.code = code


def norm(name: str) -> str:
    """PEP 503 normalized project name (``Typing_Extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    """``requirements.lock`` as {normalized name: (name, version)}; only ``name==version`` lines."""
    if not path.is_file():
        raise WheelhouseError(f"{path}: no such lock file", 2)
    pins: dict[str, tuple[str, str]] = {}
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not m:
            raise WheelhouseError(f"{path}:{i}: not a `name==version` pin: {raw!r}", 2)
        pins[norm(m[1])] = (m[1], m[2])
    return pins


def select(
    pins: dict[str, tuple[str, str]], exclude: list[str], only: list[str]
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """The lock entries to carry and the names left out (``exclude`` patterns, not in ``only``)."""
    ex = [norm(p) for p in exclude]
    on = [norm(p) for p in only]
    keep, left = {}, []
    for key, pin in pins.items():
        if key in NEVER or key == PROJECT:
            continue
        out = any(fnmatch.fnmatchcase(key, p) for p in ex) or (
            on and not any(fnmatch.fnmatchcase(key, p) for p in on)
        )
        (left.append(pin[0]) if out else keep.__setitem__(key, pin))
    return keep, sorted(left, key=str.lower)


def wheel_key(path: Path) -> tuple[str, str]:
    """(normalized name, version) of a wheel file name."""
    name, version = path.name.split("-")[:2]
    return norm(name), version


def _pip(*args: str, env: dict | None = None, cwd: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if p.returncode != 0:
        raise WheelhouseError(f"{' '.join(cmd)} failed:\n{(p.stdout + p.stderr)[-2500:]}")


def _target(pyver: str, platforms: list[str]) -> list[str]:
    args = ["--python-version", pyver, "--implementation", "cp"]
    for tag in platforms:
        args += ["--platform", tag]
    return args


def download(pins: list[tuple[str, str]], out: Path, pyver: str, platforms: list[str]) -> None:
    """The target's binary wheels of ``pins``: one pip call, then one per package if that fails,
    then (for a package with no wheel) its sdist built here, kept only when pure Python."""
    if not pins:
        return
    base = ["download", "-q", "--no-deps", "--only-binary=:all:", *_target(pyver, platforms)]
    try:
        _pip(*base, "-d", str(out), *(f"{n}=={v}" for n, v in pins))
        return
    except WheelhouseError:
        pass
    for n, v in pins:
        try:
            _pip(*base, "-d", str(out), f"{n}=={v}")
        except WheelhouseError as e:
            built = build_sdist(n, v, out, {})
            if not built.name.endswith("-none-any.whl"):
                built.unlink()
                raise WheelhouseError(
                    f"{n}=={v}: no wheel for Python {pyver} on {platforms} and its sdist builds "
                    f"a platform wheel here ({built.name}); leave it out (EXCLUDE) or build it on "
                    f"the target\n{e}"
                ) from None


def build_sdist(name: str, version: str, out: Path, env: dict) -> Path:
    """Download ``name==version``'s sdist and build it into a wheel in ``out`` (no deps, no build
    isolation: the build uses this Python's torch/setuptools); returns the wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _pip(
            "download",
            "-q",
            "--no-deps",
            "--no-binary=:all:",
            "-d",
            str(t / "src"),
            f"{name}=={version}",
        )
        (sdist,) = list((t / "src").iterdir())
        _pip(
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(t / "w"),
            str(sdist),
            env={**os.environ, **env},
        )
        (whl,) = list((t / "w").glob("*.whl"))
        dest = out / whl.name
        shutil.move(str(whl), dest)
        return dest


def build_deepspeed(version: str, out: Path, accelerator: str) -> Path:
    """DeepSpeed ``version`` as a pure wheel, no ops prebuilt (they JIT-compile at first use)."""
    env = {"DS_BUILD_OPS": "0", "DS_ACCELERATOR": accelerator}
    whl = build_sdist("deepspeed", version, out, env)
    if not whl.name.endswith("py3-none-any.whl"):
        raise WheelhouseError(f"{whl.name}: DeepSpeed built a platform wheel (ops prebuilt?)")
    return whl


def project_files(root: Path) -> list[str]:
    """The checkout's files as git sees them (tracked and untracked, ignored ones left out)."""
    p = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise WheelhouseError(f"{root}: not a git checkout ({p.stderr.strip()})", 2)
    return [f for f in p.stdout.split("\0") if f and (root / f).is_file()]


def build_project(out: Path, root: Path = ROOT) -> Path:
    """fcit_hpc's wheel from a clean copy of ``root`` (no stale build/ folder can leak into it);
    checks that it holds the package data the code reads at run time."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for f in project_files(root):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, src / f)
        _pip(
            "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(Path(tmp) / "w"), str(src)
        )
        (whl,) = list((Path(tmp) / "w").glob("*.whl"))
        names = set(zipfile.ZipFile(whl).namelist())
        missing = [f for f in PROJECT_DATA if f not in names]
        if missing:
            raise WheelhouseError(f"{whl.name}: lacks {missing} (setup.py package_data)")
        for old in out.glob("fcit_hpc-*.whl"):
            old.unlink()
        dest = out / whl.name
        shutil.move(str(whl), dest)
        return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python-version", default="{}.{}".format(*sys.version_info[:2]), help="3.N")
    ap.add_argument(
        "--platform", action="append", help="wheel platform tag (repeat); default: manylinux x86-64"
    )
    ap.add_argument("--out", default=str(ROOT / ".whl"), help="the wheelhouse folder")
    ap.add_argument("--lock", default=str(ROOT / "requirements.lock"))
    ap.add_argument(
        "--exclude", default="", help='names/patterns the target provides: "torch nvidia-*"'
    )
    ap.add_argument("--only", default="", help="carry only these names/patterns of the lock")
    ap.add_argument("--ds-accelerator", default="cuda", help="DS_ACCELERATOR for DeepSpeed's build")
    a = ap.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", a.python_version):
        print(f"wheelhouse: --python-version {a.python_version!r}: expected 3.N", file=sys.stderr)
        return 2
    platforms = a.platform or DEFAULT_PLATFORMS
    out = Path(a.out).resolve()
    try:
        lock = Path(a.lock)
        keep, left = select(read_lock(lock), a.exclude.split(), a.only.split())
        out.mkdir(parents=True, exist_ok=True)
        have = {}
        for whl in out.glob("*.whl"):  # one version of each package: stale wheels go
            key = wheel_key(whl)
            if key[0] == norm(PROJECT) or (key[0] in keep and keep[key[0]][1] == key[1]):
                have[key[0]] = whl
            else:
                whl.unlink()
        todo = [pin for k, pin in keep.items() if k not in have and k != "deepspeed"]
        print(
            f"wheelhouse: {len(keep)} packages for Python {a.python_version}, {len(todo)} to fetch"
        )
        download(todo, out, a.python_version, platforms)
        if "deepspeed" in keep and "deepspeed" not in have:
            print(
                "wheelhouse: built",
                build_deepspeed(keep["deepspeed"][1], out, a.ds_accelerator).name,
            )
        print(f"wheelhouse: building {build_project(out).name}")
    except WheelhouseError as e:
        print(f"wheelhouse: error: {e}", file=sys.stderr)
        return e.code
    shutil.copy2(lock, out / "requirements.lock")
    wheels = sorted(p.name for p in out.glob("*.whl"))
    meta = {
        "python_version": a.python_version,
        "platforms": platforms,
        "exclude": a.exclude.split(),
        "only": a.only.split(),
        "left_out": left,
        "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
        "wheels": wheels,
    }
    (out / "wheelhouse.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(
        f"wheelhouse: {out}: {len(wheels)} wheels, {size / 2**20:.1f} MiB;",
        f"left out: {' '.join(left) or '-'}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
