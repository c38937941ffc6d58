#!/usr/bin/env bash
# Install a wheelhouse (make wheelhouse) on a machine with no network, into a venv:
#   scripts/install_offline.sh WHEELHOUSE [--venv DIR] [--over PYTHON] [--python PY] [--keep "PATTERNS"]
# --over PYTHON layers the venv over an existing Python (a site's torch/triton/transformers): the
# venv sees its packages after its own, gets only what is missing or must be pinned, and never
# changes that Python's installation. Details and exit codes: scripts/install_offline.py,
# docs/install.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --over | --python) py=${args[$((i + 1))]:-} ;;
  esac
done
py=${py:-python3}
command -v "$py" >/dev/null || { echo "install_offline: $py: no such Python" >&2; exit 2; }
exec "$py" "$here/install_offline.py" "$@"
