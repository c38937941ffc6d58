#!/usr/bin/env python3
"""The work of scripts/install_offline.sh: install a wheelhouse (scripts/wheelhouse.py) into a venv
with no network (``pip --no-index``), optionally layered over an existing Python (``--over``) whose
packages the venv sees after its own.

Layered, the venv's site-packages gets ``_fcit_over.pth``, which adds the other Python's
site-packages with ``site.addsitedir`` (after the venv's own; that Python's .pth files run too).
Each wheel of the wheelhouse is then:

- taken from the site when the site has it at the lock's version, or when it is protected
  (torch, torchvision, torchaudio, triton, nvidia-*, cuda-*, and ``--keep`` patterns) and the site
  has it at any version: a site's CUDA build is never shadowed;
- installed into the venv when the site lacks it, or pinned over the site's other version.

The project's own wheel is always installed. Every install is ``pip install --no-index --no-deps
--ignore-installed`` of the exact wheel files: pip never resolves against, uninstalls or writes
into the site (its files stay as they were); the requirements of what was installed are checked
afterwards against what the venv sees. Exit codes: 0 installed; 2 bad arguments or wheelhouse;
3 pip failed; 4 a requirement unmet that the wheelhouse did not leave out on purpose.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wheelhouse import PROJECT, norm, read_lock, wheel_key  # noqa: E402

#: never shadowed when the site has them: the site's CUDA/accelerator build
PROTECTED = ["torch", "torchvision", "torchaudio", "triton", "nvidia-*", "cuda-*"]
PTH = "_fcit_over.pth"


@dataclass
class Step:
    """One wheelhouse package's fate: ``action`` is "install" (missing at the site), "pin" (the
    site has ``site`` instead of the lock's version) or "site" (taken from the site)."""

    name: str
    version: str
    action: str
    site: str | None = None
    wheel: str | None = None


def plan(
    wheels: dict[str, tuple[str, str]],
    site: dict[str, str],
    keep: list[str],
) -> list[Step]:
    """What to do with each wheel. ``wheels``: {normalized name: (file name, version)};
    ``site``: {normalized name: version} of the Python layered under; ``keep``: extra protected
    patterns."""
    protected = [norm(p) for p in PROTECTED + keep]
    steps = []
    for key, (fname, ver) in sorted(wheels.items()):
        have = site.get(key)
        if key == norm(PROJECT):
            action = "install"
        elif have is None:
            action = "install"
        elif have == ver or any(fnmatch.fnmatchcase(key, p) for p in protected):
            action = "site"
        else:
            action = "pin"
        steps.append(Step(key, ver, action, have, fname))
    return steps


def site_packages_of(python: str) -> list[str]:
    """The site-packages folders of another Python (a site's venv or system Python)."""
    code = "import site, json; print(json.dumps(site.getsitepackages()))"
    p = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"install_offline: --over {python}: cannot run it: {p.stderr.strip()}")
    return [d for d in json.loads(p.stdout) if Path(d).is_dir()]


def versions_in(paths: list[str]) -> dict[str, str]:
    """{normalized name: version} of the distributions installed under ``paths`` (first wins)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(norm(name), dist.version)
    return found


def _requirement_cls():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def unmet(installed: list[str], visible: dict[str, str]) -> list[tuple[str, str, str]]:
    """(package, required name, requirement) among the requirements of ``installed``
    (normalized names, found through this interpreter's sys.path) that ``visible`` versions do
    not satisfy; extras' requirements and other platforms' markers are skipped."""
    requirement = _requirement_cls()
    bad = []
    for key in installed:
        try:
            reqs = metadata.requires(key) or []
        except metadata.PackageNotFoundError:
            bad.append((key, key, "itself (no metadata after the install)"))
            continue
        for text in reqs:
            r = requirement(text)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            have = visible.get(norm(r.name))
            if have is None or (r.specifier and not r.specifier.contains(have, prereleases=True)):
                bad.append((key, norm(r.name), f"{text} (found {have or 'none'})"))
    return bad


def _pyver(python: str) -> str:
    code = "import sys; print('%d.%d' % sys.version_info[:2])"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


def make_venv(venv: Path, base: str, layered_over: list[str]) -> Path:
    """Create ``venv`` with ``base`` (kept when it exists); layered: no pip of its own when the
    site has one (the site's runs it), and the .pth that shows the site's packages."""
    py = venv / "bin" / "python"
    if not py.exists():
        no_pip = bool(layered_over) and any((Path(d) / "pip").is_dir() for d in layered_over)
        cmd = [base, "-m", "venv", *(["--without-pip"] if no_pip else []), str(venv)]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"install_offline: {' '.join(cmd)} failed")
    if layered_over:
        purelib = subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        lines = [f"import site; site.addsitedir({d!r})" for d in layered_over]
        Path(purelib, PTH).write_text("\n".join(lines) + "\n")
    return py


def link_site_data(purelib: Path, site_dirs: list[str], ours: set[str]) -> dict[str, int]:
    """Symlink into the venv the files the site's distributions installed outside their
    site-packages, in bin/ and lib/ (an MPI wheel's mpiexec and libmpi.so, which mpi4py looks for
    under the running venv's prefix), where the venv has none; console scripts (``#!`` files, bound
    to the site's Python) are left out, as are distributions the venv installed itself
    (``ours``). Returns {distribution: files linked}."""
    linked: dict[str, int] = {}
    for d in site_dirs:
        for record in sorted(Path(d).glob("*.dist-info/RECORD")):
            dist = norm(record.parent.name.split("-")[0])
            if dist in ours:
                continue
            for line in record.read_text().splitlines():
                rel = line.split(",")[0]
                if not rel.startswith("../"):
                    continue
                src = Path(os.path.normpath(Path(d) / rel))
                dest = Path(os.path.normpath(purelib / rel))
                top = (
                    dest.relative_to(purelib.parents[2]).parts[0]
                    if dest.is_relative_to(purelib.parents[2])
                    else None
                )
                if top not in ("bin", "lib") or dest.exists() or dest.is_symlink():
                    continue
                if not src.is_file() or src.open("rb").read(2) == b"#!":
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.symlink_to(src)
                linked[dist] = linked.get(dist, 0) + 1
    return linked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheelhouse")
    ap.add_argument("--venv", default=".venv-offline", help="the venv to create or fill")
    ap.add_argument("--over", help="a Python whose packages the venv sees (a site's torch)")
    ap.add_argument("--python", help="the Python to make the venv with (default: --over's)")
    ap.add_argument("--keep", default="", help="more patterns always taken from the site")
    a = ap.parse_args(argv)
    wh = Path(a.wheelhouse).resolve()
    files = sorted(wh.glob("*.whl")) if wh.is_dir() else []
    if not files:
        print(f"install_offline: {wh}: no wheels (make wheelhouse)", file=sys.stderr)
        return 2
    wheels: dict[str, tuple[str, str]] = {}
    for f in files:
        key, ver = wheel_key(f)
        if key in wheels:
            print(f"install_offline: {wh}: two wheels of {key}", file=sys.stderr)
            return 2
        wheels[key] = (f.name, ver)
    meta_path = wh / "wheelhouse.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    lock_path = wh / "requirements.lock"
    lock = read_lock(lock_path) if lock_path.is_file() else {}
    over = [] if a.over is None else site_packages_of(a.over)
    if a.over is not None and not over:
        print(f"install_offline: --over {a.over}: no site-packages found", file=sys.stderr)
        return 2
    base = a.python or a.over or sys.executable
    if a.over and a.python and _pyver(a.python) != _pyver(a.over):
        print(f"install_offline: --python {a.python} and --over {a.over}: other Python versions",
              file=sys.stderr)  # fmt: skip
        return 2
    venv = Path(a.venv).resolve()
    py = make_venv(venv, base, over)
    site = versions_in(over)
    steps = plan(wheels, site, a.keep.split())
    todo = [s for s in steps if s.action != "site"]
    if todo:
        cmd = [str(py), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wh)]
        cmd += ["--no-deps", "--ignore-installed", "--no-warn-script-location"]
        cmd += [str(wh / s.wheel) for s in todo]
        if subprocess.run(cmd, env={**os.environ, "PIP_CONSTRAINT": ""}).returncode != 0:
            print("install_offline: pip failed (above)", file=sys.stderr)
            return 3
    if over:
        purelib = Path(
            subprocess.run(
                [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        for dist, n in link_site_data(purelib, over, {s.name for s in todo}).items():
            print(f"linked     {dist}: {n} files of the site's bin/ and lib/ into the venv")
    for src in (lock_path, meta_path):  # what `fcit doctor` compares against
        if src.is_file():
            shutil.copy2(src, venv / src.name)
    for s in todo:
        if s.name == norm(PROJECT):
            why = "the project"
        else:
            why = (
                "missing at the site"
                if s.action == "install"
                else f"pinned over the site's {s.site}"
            )
        print(f"installed  {s.name}=={s.version}  ({why})")
    taken = [(s.name, s.site, s.version) for s in steps if s.action == "site"]
    taken += [(k, site[k], lock[k][1]) for k in lock if k in site and k not in wheels]
    same = sorted(k for k, have, want in taken if have == want)
    if same:
        print(f"from site  at the lock's versions: {' '.join(same)}")
    for k, have, want in sorted(taken):
        if have != want:
            print(f"from site  {k}=={have}  (lock: {want})")
    left = {norm(n) for n in meta.get("left_out", [])}
    check = [
        str(py),
        str(Path(__file__).resolve()),
        "--check",
        json.dumps([s.name for s in todo]),
    ]
    p = subprocess.run(check, capture_output=True, text=True)
    problems = json.loads(p.stdout) if p.returncode == 0 else [["?", "?", p.stderr.strip()]]
    fatal = 0
    for pkg, name, req in problems:
        on_purpose = name in left  # the wheelhouse left it out (EXCLUDE/ONLY)
        print(f"{'absent' if on_purpose else 'UNMET'}     {pkg} needs {req}")
        fatal += not on_purpose
    print(
        f"install_offline: {venv}: {len(todo)} installed, {len(taken)} from the "
        f"site{' ' + ', '.join(over) if over else ''}; run {venv}/bin/fcit doctor"
    )
    return 4 if fatal else 0


def _check(names_json: str) -> int:
    """Run inside the new venv: print the unmet requirements of ``names_json`` as JSON."""
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    print(json.dumps(unmet(json.loads(names_json), versions_in(paths))))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(_check(sys.argv[2]))
    sys.exit(main())
