#!/usr/bin/env bash
# `make gpu-check`: the project's checks on one GPU node, with no network, each step time-boxed
# (GNU timeout) and logged under OUT, then ONE summary table (step, pass/fail, wall time, key
# figure, log). Budget: 9 minutes on an H200 (the time-boxes below add up to 530 s).
#   doctor  fcit doctor (when the installed fcit has it)
#   suite   the gpu-marked tests (scripts/test_gpu.sh)
#   kernels fcit bench kernels --quick --skip-compile --json
#   train   fcit bench train configs/llava15_7b_shape.yaml --steps 5 --warmup 1 --variants plain,fcit --json
#   main    the main job on the GPU: mpiexec -n NP fcit run configs/default.yaml train.device=cuda
# Variables: PY (the installed project's python; default .venv/bin/python), OUT (runs/gpu-check),
# NP (ranks of the main job, 2: both share the GPU), MAIN_OVERRIDES (extra config overrides of
# the main job, e.g. eval.caption_meteor=skip on a node without Java), T_DOCTOR, T_SUITE,
# T_KERNELS, T_TRAIN, T_MAIN (seconds per step), STEPS (the steps to run, default all).
# Exit code: 0 when every step run passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "gpu-check: PY=$PY is not an executable python (set PY=...)" >&2; exit 2; }
BIN=$(cd "$(dirname "$PY")" && pwd)
OUT=${OUT:-runs/gpu-check}
NP=${NP:-2}
STEPS=${STEPS:-"doctor suite kernels train main"}
T_DOCTOR=${T_DOCTOR:-20} T_SUITE=${T_SUITE:-240} T_KERNELS=${T_KERNELS:-45}
T_TRAIN=${T_TRAIN:-75} T_MAIN=${T_MAIN:-150}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PATH="$BIN:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 DS_ACCELERATOR=cuda
unset TRITON_INTERPRET
FCIT="$BIN/fcit"
[ -x "$FCIT" ] || FCIT="$PY -m fcit_hpc"
ROWS=()
FAILED=0

# run NAME SECONDS CMD...: time-boxed, stdout+stderr to OUT/NAME.log; sets RC and SECS
run() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (≤ ${limit} s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  RC=$?
  SECS=$((SECONDS - t0))
  tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
}

# row NAME FIGURE: one summary row from RC/SECS
row() {
  local status=pass
  if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then status="TIMEOUT"; elif [ "$RC" != 0 ]; then status="FAIL($RC)"; fi
  [ "$status" = pass ] || FAILED=1
  ROWS+=("$(printf '%-8s %-10s %6s s  %-44s %s' "$1" "$status" "$SECS" "${2:0:44}" "$OUT/$1.log")")
}

# figure KIND FILE: the key figure of a step's JSON output, "-" when absent or unreadable
figure() {
  "$PY" - "$1" "$2" <<'PYEOF' 2>/dev/null || echo "-"
import json, sys
kind, d = sys.argv[1], json.load(open(sys.argv[2]))
if kind == "kernels":
    print("fused/base " + " ".join(f"{p['fused/base']:.2f}" for p in d["points"][:5]))
elif kind == "train":
    f = d["derived"]
    print(f"fcit {f['fcit']['tokens_per_s']:.0f} tok/s, x{f['ratio_tokens_per_s']:.3f} plain")
PYEOF
}

has() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }

# GPU_CHECK_CPU=1: no CUDA check (to try the script itself on a CPU machine)
[ "${GPU_CHECK_CPU:-0}" = 1 ] && echo cpu >"$OUT/device.txt" ||
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    >"$OUT/device.txt" 2>&1 || { echo "gpu-check: $(tail -1 "$OUT/device.txt")" >&2; exit 1; }
echo "gpu-check on $(cat "$OUT/device.txt"), logs in $OUT"

if has doctor; then
  if $FCIT --help 2>/dev/null | grep -q doctor; then
    run doctor "$T_DOCTOR" $FCIT doctor
    row doctor "$(tail -n 1 "$OUT/doctor.log")"
  else
    echo "== doctor: this fcit has no doctor command (skipped)"
  fi
fi

if has suite; then
  run suite "$T_SUITE" env PY="$PY" TEST_TIMEOUT="${TEST_TIMEOUT:-150}" scripts/test_gpu.sh
  row suite "$(grep -E '[0-9]+ (passed|failed)' "$OUT/suite.log" | tail -n 1 | tr -d '=' | sed 's/^ *//')"
fi

if has kernels; then
  run kernels "$T_KERNELS" $FCIT bench kernels --quick --skip-compile --json "$OUT/kernels.json"
  row kernels "$(figure kernels "$OUT/kernels.json")"
fi

if has train; then
  run train "$T_TRAIN" $FCIT bench train configs/llava15_7b_shape.yaml --steps 5 --warmup 1 \
    --variants plain,fcit --json "$OUT/train.json"
  row train "$(figure train "$OUT/train.json")"
fi

if has main; then
  rm -rf "$OUT/main"
  # shellcheck disable=SC2086
  run main "$T_MAIN" "$BIN/mpiexec" --oversubscribe -n "$NP" $FCIT run configs/default.yaml \
    --out "$OUT/main" train.device=cuda "train.ranks_per_gpu=$NP" ${MAIN_OVERRIDES:-}
  row main "$(find "$OUT/main" -name report.md 2>/dev/null | wc -l) report.md, job ${SECS} s"
fi

echo
printf '%-8s %-10s %8s  %-44s %s\n' step result wall "key figure" log
for r in "${ROWS[@]}"; do echo "$r"; done
exit $FAILED
