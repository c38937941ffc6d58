#!/usr/bin/env bash
# The gpu-marked suite on a CUDA device (`make test-gpu`): verbose, each failure printed as it
# happens with its assertion (tests/conftest.py, FCIT_SHOW_FAILURES=1), the 15 slowest tests,
# a per-test time limit when pytest-timeout is installed, JOBS parallel workers when
# pytest-xdist is (every test keeps its own tmp dirs and rendezvous ports).
# Variables: PY (the project's python; default .venv/bin/python, else python3), JOBS (4),
# TEST_TIMEOUT (seconds per test, 200). Extra arguments go to pytest. Exit code: pytest's.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
JOBS=${JOBS:-4}
TEST_TIMEOUT=${TEST_TIMEOUT:-200}
args=(-m gpu -v -rfE --tb=short --durations=15 -p no:cacheprovider)
if [ "$JOBS" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  args+=(-n "$JOBS")
else
  echo "test-gpu: pytest-xdist absent or JOBS=1: tests run one at a time"
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  args+=(--timeout="$TEST_TIMEOUT")
else
  echo "test-gpu: pytest-timeout absent: no per-test time limit"
fi
# the console scripts (fcit, mpiexec) beside the python come first on PATH
PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"
export PATH DS_ACCELERATOR=cuda TRITON_INTERPRET=0 FCIT_SHOW_FAILURES=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec "$PY" -m pytest "${args[@]}" "$@" tests
