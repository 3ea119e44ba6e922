#!/usr/bin/env bash
# A GPU loan's second call, after `gpu_check.sh OUT env,lab` ran the full lab: what that call cannot fit, most
# informative first, inside BUDGET_S seconds of wall time (a part that would not fit is skipped with a line):
#
#     BUDGET_S=400 bash benchmarks/gpu_followup.sh OUT_DIR
#
# 1. gpu_check.sh env,tests,lab with TESTS_K=cuda and LAB_ONLY=c7: the CUDA-only tests (captured step = eager,
#    captured evaluation, synchronized compute vs CUDA events) and C7 (a no-BatchNorm run that diverges in bf16 is
#    rerun in fp32: the model's divergence or the precision's);
# 2. benchmarks/bare_step.py at batch 128: eager, captured, compile + captured, and the eager step's GPU kernel time
#    by category (what is left to speed up once launches are gone);
# 3. benchmarks/throughput.py at batch 128 with --compile default: the classic pipeline, a typical lab script and
#    the compiled fast path, ratios from one run;
# 4. gpu_check.sh export: every export format on CUDA, AOTInductor included, and infer-bench on CUDA, for a 1-epoch
#    captured run trained here.
set -u
OUT_DIR=${1:-gpu-followup-$(date -u +%Y%m%d-%H%M%S)}
BUDGET_S=${BUDGET_S:-400}
mkdir -p "$OUT_DIR"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

part() {  # part NAME NEEDS_S LIMIT_S COMMAND...: run when NEEDS_S seconds are left, for at most LIMIT_S of them
    local name=$1 needs=$2 limit=$3
    shift 3
    local now
    now=$(left)
    if [ "$now" -lt "$needs" ]; then
        echo "== $name: skipped, ${now}s of BUDGET_S=${BUDGET_S} left (needs ${needs}s)"
        return 0
    fi
    [ "$limit" -gt "$now" ] && limit=$now
    echo "== $name (limit ${limit}s, at $(($(date +%s) - T0))s)"
    timeout -k 10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    echo "   $name: exit $? after $(($(date +%s) - T0))s"
    tail -n "${TAIL:-40}" "$OUT_DIR/$name.log"
}

part check 120 260 env DEADLINE_S=250 TESTS_K=cuda LAB_ONLY=c7 TAIL=25 bash benchmarks/gpu_check.sh "$OUT_DIR/check" env,tests,lab
part bare 60 90 $PY benchmarks/bare_step.py --batches 128 --json-out "$OUT_DIR/bare_step.json"
part throughput 60 120 $PY benchmarks/throughput.py --device cuda --dataset synthetic --batch-sizes 128 --repeats 2 \
    --compile default --pipelines classic typical fast --json-out "$OUT_DIR/throughput-cuda-compiled.json"
part export 60 150 bash -c "$PY -m cifarlab train --dataset synthetic --epochs 1 --out '$OUT_DIR/export-check/runs' \
    --name captured && bash benchmarks/gpu_check.sh '$OUT_DIR/export-check' export"
echo "gpu follow-up done in $(($(date +%s) - T0))s of BUDGET_S=${BUDGET_S}; output in $OUT_DIR"
