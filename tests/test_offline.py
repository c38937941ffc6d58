"""The air-gapped install (scripts/wheelhouse.py, scripts/install_offline.sh) and ``fcit doctor``.

Nothing here downloads: the one install test builds its small wheelhouse locally (the project's
own wheel and one tiny wheel, ``pip wheel --no-deps --no-build-isolation``) and installs it with
``pip --no-index`` into a venv layered over the venv running the tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fcit_hpc.doctor import launcher_lines, lock_differences, parse_env_text
from fcit_hpc.state.schema import comparable_content, read_state, same_content

from .conftest import ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)  # install_offline imports wheelhouse by this name
    spec.loader.exec_module(mod)
    return mod


wheelhouse = _script("wheelhouse")
install_offline = _script("install_offline")


# --- fcit doctor: the launcher's variables, from text as `env` prints it -----------------------


def test_doctor_reads_open_mpi_variables_from_text():
    env = parse_env_text(
        """
        # one rank of mpiexec -n 4 over two nodes
        OMPI_COMM_WORLD_RANK=3
        OMPI_COMM_WORLD_SIZE=4
        OMPI_COMM_WORLD_LOCAL_RANK=1
        OMPI_COMM_WORLD_LOCAL_SIZE=2
        CUDA_VISIBLE_DEVICES=2,3
        PATH=/usr/bin
        """
    )
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and len(env) == 6
    lines = launcher_lines(env)
    assert lines[0] == "openmpi: rank 3 of 4, local rank 1 of 2"
    assert "CUDA_VISIBLE_DEVICES=2,3" in lines
    assert "PATH" not in lines[-1] and "OMPI_COMM_WORLD_RANK=3" in lines[-1]


def test_doctor_reads_slurm_variables_with_a_compressed_task_list():
    env = parse_env_text(
        "SLURM_JOB_ID=77\nSLURM_JOB_NODELIST=gpu[01-03]\nSLURM_JOB_NUM_NODES=3\n"
        "SLURM_PROCID=5\nSLURM_NTASKS=7\nSLURM_LOCALID=1\nSLURM_NODEID=2\n"
        "SLURM_STEP_TASKS_PER_NODE=3(x2),1\n"
    )
    lines = launcher_lines(env)
    # node 2 of "3(x2),1" runs 1 task
    assert lines[0] == "slurm: rank 5 of 7, local rank 1 of 1"
    assert lines[1] == "SLURM job 77 on gpu[01-03] (3 nodes)"


def test_doctor_reads_mpich_variables_and_a_plain_process():
    env = parse_env_text("PMI_RANK=2\nPMI_SIZE=3\nMPI_LOCALRANKID=0\nMPI_LOCALNRANKS=1")
    assert launcher_lines(env)[0] == "mpich: rank 2 of 3, local rank 0 of 1"
    assert launcher_lines(parse_env_text("HOME=/root")) == ["none: rank 0 of 1, local rank 0 of 1"]


def test_doctor_names_the_bad_line_or_variable():
    with pytest.raises(ValueError, match=r"line 2: 'not an assignment'"):
        parse_env_text("A=1\nnot an assignment\n")
    env = parse_env_text("OMPI_COMM_WORLD_RANK=x\nOMPI_COMM_WORLD_SIZE=2")
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK='x' is not an integer"):
        launcher_lines(env)


def test_doctor_lists_lock_differences():
    lock = "# comment\nNumPy==2.4.6\ntyping_extensions==4.16.0\npeft==0.21.2\n"
    differ, absent = lock_differences(lock, {"numpy": "2.5.2", "typing-extensions": "4.16.0"})
    assert differ == ["NumPy 2.4.6 -> 2.5.2"] and absent == ["peft"]


def test_doctor_exits_1_with_the_fix_when_an_essential_is_missing(monkeypatch, capsys):
    """peft hidden: `fcit doctor` says MISSING, prints the pip command with the lock's pin, and
    exits 1; DeepSpeed hidden instead is optional: exit 0, its fix still printed."""
    from fcit_hpc import doctor

    real = doctor._version
    lock = ROOT / "requirements.lock"
    pin = next(x for x in lock.read_text().splitlines() if x.startswith("peft=="))
    monkeypatch.setattr(doctor, "_version", lambda d: None if d == "peft" else real(d))
    assert doctor.main(["--lock", str(lock)]) == 1
    out = capsys.readouterr().out
    assert "peft          MISSING (not installed)" in out
    assert f"peft: pip install -c requirements.lock {pin}" in out
    assert "essentials MISSING" in out
    monkeypatch.setattr(doctor, "_version", real)
    find_spec = doctor.importlib.util.find_spec
    monkeypatch.setattr(
        doctor.importlib.util, "find_spec", lambda n: None if n == "deepspeed" else find_spec(n)
    )
    assert doctor.main(["--lock", str(lock)]) == 0
    assert "deepspeed: pip install -c requirements.lock deepspeed==" in capsys.readouterr().out
    monkeypatch.setattr(doctor, "_version", lambda d: None if d == "liger-kernel" else real(d))
    assert doctor.main(["--lock", str(lock)]) == 0  # optional too
    assert "liger-kernel: pip install -c requirements.lock liger-kernel==0.8.5" in (
        capsys.readouterr().out
    )


# --- make wheelhouse: what is carried --------------------------------------------------------


def test_wheelhouse_selects_with_exclude_and_only_patterns(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# x\npip==26.3\ntorch==2.14.1\nnvidia-nccl-cu13==2.30.7\nPyYAML==6.0.4\n")
    pins = wheelhouse.read_lock(lock)
    keep, left = wheelhouse.select(pins, ["torch", "nvidia-*"], [])
    assert list(keep) == ["pyyaml"] and left == ["nvidia-nccl-cu13", "torch"]  # pip: never
    keep, left = wheelhouse.select(pins, [], ["pyyaml", "torch"])
    assert sorted(keep) == ["pyyaml", "torch"] and left == ["nvidia-nccl-cu13"]
    lock.write_text("torch>=2\n")
    with pytest.raises(wheelhouse.WheelhouseError, match=r"requirements.lock:1: not a"):
        wheelhouse.read_lock(lock)


def test_install_plan_never_shadows_the_sites_cuda_build():
    wheels = {
        "torch": ("torch-2.14.1-cp312-cp312-linux_x86_64.whl", "2.14.1"),
        "nvidia-nccl-cu13": ("nvidia_nccl_cu13-2.30.7-py3-none-any.whl", "2.30.7"),
        "numpy": ("numpy-2.4.6-cp312-cp312-linux_x86_64.whl", "2.4.6"),
        "hjson": ("hjson-3.1.0-py3-none-any.whl", "3.1.0"),
        "pydantic": ("pydantic-2.14.4-py3-none-any.whl", "2.14.4"),
        "fcit-hpc": ("fcit_hpc-0.1.0-py3-none-any.whl", "0.1.0"),
        "peft": ("peft-0.21.2-py3-none-any.whl", "0.21.2"),
    }
    site = {
        "torch": "2.11.0",
        "nvidia-nccl-cu13": "2.28.9",
        "numpy": "2.5.2",
        "hjson": "3.1.0",
        "fcit-hpc": "0.1.0",
        "peft": "0.17.0",
    }
    got = {s.name: s.action for s in install_offline.plan(wheels, site, keep=["peft"])}
    assert got == {
        "torch": "site",  # protected: the site's CUDA build
        "nvidia-nccl-cu13": "site",
        "numpy": "pin",  # another version at the site: ours, --no-deps, over it
        "hjson": "site",  # the same version
        "pydantic": "install",  # missing at the site
        "fcit-hpc": "install",  # the project: always ours
        "peft": "site",  # --keep
    }


# --- the layered offline install ---------------------------------------------------------------


def _tree(prefix: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under a venv's lib/ and bin/."""
    out = {}
    for top in ("lib", "bin"):
        for dirpath, _, files in os.walk(prefix / top):
            for f in files:
                p = Path(dirpath, f)
                st = p.lstat()
                out[str(p.relative_to(prefix))] = (st.st_size, st.st_mtime_ns)
    return out


def _tiny_wheel(src: Path, out: Path) -> None:
    """A one-module distribution the base venv lacks, built here with no index."""
    (src / "fcit_offline_probe.py").parent.mkdir(parents=True)
    (src / "fcit_offline_probe.py").write_text("ANSWER = 42\n")
    (src / "setup.py").write_text(
        textwrap.dedent(
            """
            from setuptools import setup
            setup(name="fcit-offline-probe", version="1.0", py_modules=["fcit_offline_probe"],
                  install_requires=["numpy"])
            """
        )
    )
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "--no-index", "-w", str(out), str(src)], check=True)


@pytest.mark.slow
def test_layered_offline_install_runs_doctor_and_the_smoke_config(tmp_path, serial_run):
    """A wheelhouse of the project's wheel and a tiny one, installed with --no-index into a venv
    layered over this venv: the venv's own fcit_hpc runs `fcit doctor` and configs/smoke.yaml
    (equal to the serial run of the same config), and the base venv is left as it was."""
    base = Path(sys.prefix)
    wh, venv = tmp_path / "wh", tmp_path / "venv"
    wh.mkdir()
    wheelhouse.build_project(wh)
    _tiny_wheel(tmp_path / "probe", wh)
    (wh / "requirements.lock").write_text((ROOT / "requirements.lock").read_text())
    before = _tree(base)  # every file of the base venv's lib/ and bin/, with size and mtime

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PIP_NO_INDEX"] = "1"
    # the venv's bin first, as its activation does (a launcher elsewhere on PATH is not the venv's)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])
    cmd = [str(ROOT / "scripts/install_offline.sh"), str(wh), "--venv", str(venv)]
    p = subprocess.run(
        [*cmd, "--over", sys.executable], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "installed  fcit-hpc==0.1.0  (the project)" in p.stdout
    assert "installed  fcit-offline-probe==1.0  (missing at the site)" in p.stdout
    assert "from site  at the lock's versions: " in p.stdout and "torch" in p.stdout
    assert _tree(base) == before  # the install wrote nothing into the base venv

    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the runs below leave no bytecode in the base either
    fcit = str(venv / "bin/fcit")
    purelib = next((venv / "lib").glob("python3*/site-packages"))
    assert (purelib / "fcit_offline_probe.py").is_file()  # the tiny wheel, missing at the base
    # configs/ ships in the wheel (fcit_hpc.resources.config_file finds it there)
    assert (purelib / "fcit_hpc/_configs/hf/llava-1.5-7b/config.json").is_file()
    d = subprocess.run([fcit, "doctor"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert d.returncode == 0, d.stdout + d.stderr
    assert f"prefix {venv}" in d.stdout and "essentials present" in d.stdout
    # the venv's own fcit_hpc, the base's torch
    assert f"fcit_hpc      0.1.0 {purelib}/fcit_hpc" in d.stdout
    assert f"{base}/lib/" in next(x for x in d.stdout.splitlines() if x.startswith("torch "))
    assert f"{venv}/requirements.lock: " in d.stdout  # the lock the installer left there
    # the base's Open MPI (wheel): its launcher and library linked into the venv, where mpi4py
    # (also the base's) looks for them
    assert f"mpiexec={venv}/bin/mpiexec" in d.stdout and "MPI library: Open MPI" in d.stdout

    out = tmp_path / "run"
    r = subprocess.run(
        [fcit, "run", str(ROOT / "configs/smoke.yaml"), "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_state(out).done
    assert same_content(comparable_content(serial_run), comparable_content(out)) == []
    assert _tree(base) == before
