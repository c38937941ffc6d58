#!/usr/bin/env bash
# The SSA-LoRA kernel checks for a GPU node (H200/H100), each step time-boxed, about 3 minutes:
#   1. the gpu-marked kernel tests (tests/test_kernels_gpu.py), stopping at the first failure;
#   2. tuning of the benchmarked and 7B-FFN kernel keys, the GPU's config table written to $OUT,
#      then issue 25's table without torch.compile (op/base at M 1/16/512/4096, bf16 4096²,
#      S 8 r 8; S·r 1024; two-GEMM and rebuild competitors);
#   3. the same table with the torch.compile (max-autotune) competitor, as time allows.
# Usage: OUT=/some/dir scripts/gpu_kernels.sh   (PYTHON defaults to python; BUDGET, default 180,
# caps the seconds of all steps together: each step's limit is cut to what is left). Logs: $OUT/*.log;
# the table: $OUT/<device>.json (commit it as kernels/fcit_kernels/configs/<device>.json).
# Exit status: 0 if every step passed, else the number of failed steps.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 FCIT_CACHE="$OUT/cache" HF_HUB_OFFLINE=1
fails=0
DEADLINE=$((SECONDS + ${BUDGET:-180}))
step() {  # step NAME SECONDS CMD...
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$secs" ] && secs=$left
    if [ "$secs" -lt 10 ]; then
        echo "=== $name: skipped (the ${BUDGET:-180} s budget is spent)"
        echo "$name skipped 0s" >>"$OUT/summary.txt"
        fails=$((fails + 1))
        return
    fi
    echo "=== $name (limit ${secs}s): $*"
    timeout -k 5 "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s (124: over its time limit)"
    [ "$rc" -eq 0 ] || fails=$((fails + 1))
    echo "$name $rc $((SECONDS - t0))s" >>"$OUT/summary.txt"
}
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" | tee "$OUT/env.log"
dev=$($PY -c "import torch; from fcit_kernels import tuning; print(tuning.slug(torch.cuda.get_device_name()))")
step tests 110 $PY -m pytest -m gpu tests/test_kernels_gpu.py -v -rfE --tb=short -x -p no:cacheprovider --durations=8
step tune_and_table 100 $PY -m fcit_hpc bench kernels --points issue --tune \
    --write-table "$OUT/$dev.json" --skip-compile --skip-e2e --json "$OUT/bench_nocompile.json"
[ -f "$OUT/$dev.json" ] && cp "$OUT/$dev.json" "kernels/fcit_kernels/configs/$dev.json"
step bench_compile 120 $PY -m fcit_hpc bench kernels --points issue --skip-e2e \
    --json "$OUT/bench.json"
echo "=== summary (step exit seconds):"
cat "$OUT/summary.txt"
exit "$fails"
