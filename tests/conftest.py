"""Test set-up. TRITON_INTERPRET must be set before any kernel module is imported."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def mpiexec(n: int, *args: str, timeout: float = 300, env: dict | None = None, **kw):
    """Run ``args`` on n MPI ranks with the venv's mpiexec; returns CompletedProcess."""
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    e.update(env or {})
    cmd = [str(BIN / "mpiexec"), "--oversubscribe", "-n", str(n), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT, **kw
    )


def fcit(*args: str, timeout: float = 300):
    """Run the ``fcit`` console script as a plain process (world size 1)."""
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [str(BIN / "fcit"), *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT
    )


def run_ok(config: str, out: Path, *overrides: str) -> Path:
    """``fcit run configs/<config>`` (with overrides) as a plain process into ``out``; asserts
    success."""
    p = fcit("run", str(ROOT / "configs" / config), "--out", str(out), *overrides)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def smoke_serial(out: Path, *overrides: str) -> Path:
    """configs/smoke.yaml (with overrides) as a plain process into ``out``; asserts success."""
    return run_ok("smoke.yaml", out, *overrides)


KILL_RANK1_STAGE1_ROUND1 = ["debug.kill_rank=1", "debug.kill_stage=1", "debug.kill_round=1"]


def assert_two_ranks_and_resume_equal_serial(serial: Path, tmp_path: Path, overrides, stored):
    """configs/smoke.yaml with ``overrides`` on 2 ranks, and killed on rank 1 in stage 1 round 1
    then resumed on 2 ranks: each ends equal to ``serial`` (the same run on one rank, its
    comparable content). ``stored(state)``: what the killed run's state must hold."""
    from fcit_hpc.state.schema import comparable_content, read_state, same_content

    smoke, bin_fcit = str(ROOT / "configs/smoke.yaml"), str(BIN / "fcit")
    out = tmp_path / "p2"
    p = mpiexec(2, bin_fcit, "run", smoke, "--out", str(out), *overrides)
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_content(comparable_content(serial), comparable_content(out)) == []
    killed = tmp_path / "killed"
    kill = KILL_RANK1_STAGE1_ROUND1
    p = mpiexec(2, bin_fcit, "run", smoke, "--out", str(killed), *overrides, *kill, timeout=120)
    assert p.returncode != 0
    assert stored(read_state(killed))
    p = mpiexec(2, bin_fcit, "run", "--resume", str(killed))
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_content(comparable_content(serial), comparable_content(killed)) == []


@pytest.fixture(scope="session")
def serial_run(tmp_path_factory):
    """configs/smoke.yaml run once as a plain process: the reference of the MPI and SLURM runs
    (read only)."""
    return smoke_serial(tmp_path_factory.mktemp("serial") / "run")


@pytest.fixture(autouse=True)
def _gpu_tests_need_cuda(request):
    """A test marked ``gpu`` fails (it does not skip) without a CUDA device or under the Triton
    interpreter: deselected in CPU runs (pytest.ini), run by `make test-gpu`."""
    if request.node.get_closest_marker("gpu") is None:
        return
    import torch

    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with `make test-gpu` on a GPU)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("unset TRITON_INTERPRET for the gpu tests (it is set by conftest by default)")


@pytest.fixture
def smoke_config() -> Path:
    return ROOT / "configs" / "smoke.yaml"


_CONFIG: list = []  # pytest's config (pytest_configure), for failures as they happen


def pytest_configure(config):
    _CONFIG[:] = [config]


def pytest_runtest_logreport(report):
    """With FCIT_SHOW_FAILURES=1 (``make test-gpu``): each failure printed as it happens (the
    test's name and its short traceback with the assertion), not only in the summary at the end
    of a run that a time limit may cut. Runs on the controller under pytest-xdist too (it
    receives the workers' reports)."""
    if not report.failed or os.environ.get("FCIT_SHOW_FAILURES") != "1":
        return
    tr = _CONFIG[0].pluginmanager.get_plugin("terminalreporter") if _CONFIG else None
    if tr is None or hasattr(_CONFIG[0], "workerinput"):  # an xdist worker: the controller prints
        return
    text = getattr(report, "longreprtext", "") or str(report.longrepr)
    tr.write_line("")
    tr.write_sep("!", f"FAILED {report.nodeid} ({report.when})", red=True)
    for line in text.splitlines():
        tr.write_line(line)
    tr.write_sep("!", red=True)


def method_of(cls, cfg):
    """A method class's instance for a whole config (as fcit_hpc.methods.make_method makes it
    from the config's method and lora sections)."""
    return cls.from_sections(cfg.method, cfg.lora)
