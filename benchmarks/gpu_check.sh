#!/usr/bin/env bash
# One-command GPU check (issue 10 item 9). Run from the repository root on a CUDA machine:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR] [STEPS]
#
# STEPS is a comma-separated subset of: env,tests,loader,bare,train,compile,autotune,throughput,doctor,export,c8,lab
# (default: all).
# Every step has its own time limit and writes <OUT_DIR>/<step>.log; a step that fails or runs out of time
# does not stop the others. Needs torch, torchvision, numpy, matplotlib; runs cifarlab from src/ (no install).
#
# DEADLINE_S (optional): the whole check's seconds. Each step's limit shrinks to what is left (minus 70 s for
# a step's KILL grace and the summary), and a step with less than 30 s left is skipped with a line saying so:
# a lent machine's call limit then ends no step mid-write and the summary always prints.
set -u
OUT_DIR=${1:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}
STEPS=${2:-env,tests,loader,bare,train,compile,autotune,throughput,doctor,export,c8,lab}
mkdir -p "$OUT_DIR"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
    local start rc
    start=$(date +%s)
    if [ -n "${DEADLINE_S:-}" ]; then
        local left=$((DEADLINE_S - (start - T0) - 70))
        if [ "$left" -lt 30 ]; then
            echo "== $name: skipped, ${left}s left before DEADLINE_S=${DEADLINE_S}"
            return 0
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "== $name (limit ${limit}s, check at $((start - T0))s)"
    # -k: KILL if it has not stopped 60 s after the TERM. The lab (one python process) gets the TERM alone
    # (--foreground): sent to its whole group it would kill Inductor's compile workers mid-compile, and torch
    # 2.11 then hangs; the compound steps (bash -c) need the group signal to reach their python processes.
    local fg=()
    case $name in lab | c8) fg=(--foreground) ;; esac
    timeout "${fg[@]}" -k 60 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    echo "   $name: exit $rc after $(($(date +%s) - start))s"
    tail -n "${TAIL:-30}" "$OUT_DIR/$name.log"
}

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
    $PY -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda, torch.cuda.get_device_name())'"

# CUDA-only tests skip on CPU machines; here they run (captured step = eager within bf16 noise, setup apart, ...).
# TESTS_K narrows them (pytest -k), e.g. TESTS_K=cuda for the CUDA-only ones.
step tests 240 $PY -m pytest -q -rsP -p no:cacheprovider tests/test_capture.py tests/test_precision.py tests/test_devicedata.py \
    tests/test_cuda_timing.py ${TESTS_K:+-k "$TESTS_K"}

# The bare step, eager vs one captured CUDA graph vs torch.compile(default) inside the graph, fixed batch
# (no data loading), batch 128 and 512; each compile row's setup_s is its (cold or disk-cached) compile.
# The device loader batch by batch against in chunks of 8,192 images: ops per epoch, host and device seconds.
step loader 60 $PY benchmarks/loader_ops.py --device cuda

step bare 240 $PY benchmarks/bare_step.py --batches 128,512 --steps 200 --json-out "$OUT_DIR/bare_step.json"

# The lab's C1 run, full-size synthetic split, 5 epochs: captured step (default) and eager, same seed;
# synchronized only at epoch ends (the fast path's timing mode, as the lab's fast runs use).
step train 240 bash -c "$PY -m cifarlab train --dataset synthetic --epochs 5 --no-sync-timing --out '$OUT_DIR/runs' --name captured \
    --tensorboard '$OUT_DIR/tb' && $PY benchmarks/tensorboard_check.py '$OUT_DIR/runs' '$OUT_DIR/tb' \
    && $PY -m cifarlab train --dataset synthetic --epochs 5 --no-sync-timing --cuda-graph off --out '$OUT_DIR/runs' --name eager \
    && $PY benchmarks/compare_runs.py '$OUT_DIR/runs'"

# `--compile default` composed with the captured step, end to end: compile + capture in setup_s, 5 epochs; then
# the throughput rows with the fast path compiled, so its ratios to the classic and typical rows come from one run.
step compile 420 bash -c "$PY -m cifarlab train --dataset synthetic --epochs 5 --no-sync-timing --compile default \
    --out '$OUT_DIR/runs' --name compiled && $PY benchmarks/compare_runs.py '$OUT_DIR/runs' \
    && $PY benchmarks/throughput.py --device cuda --dataset synthetic --batch-sizes 128 512 --repeats 2 \
    --compile default --pipelines classic typical fast --json-out '$OUT_DIR/throughput-cuda-compiled.json'"

# max-autotune's kernels inside the captured step (torch's mode without its own CUDA graphs): the bare step, then
# 5 epochs end to end; its autotuning (minutes when the cache is cold) is part of setup_s.
# (pipefail: a failing bare_step fails the step, not grep; the filter drops autotuning tables, whose lines start
# with two spaces and a kernel name, and keeps bare_step's '  (capture fell back: ...)' lines.)
step autotune 480 bash -c "set -o pipefail; $PY benchmarks/bare_step.py --batches 128,512 --kinds eager,compile+cuda-graph \
    --compile-mode max-autotune-no-cudagraphs --json-out '$OUT_DIR/bare_step_autotune.json' 2>&1 | grep -v '^  [a-z]\|^AUTOTUNE\|^strides\|^dtypes' \
    && $PY -m cifarlab train --dataset synthetic --epochs 5 --no-sync-timing --compile max-autotune-no-cudagraphs \
    --out '$OUT_DIR/runs' --name autotuned"

# classic vs typical lab solution vs fast eager vs fast captured, batch 128 and 512, ratios in one run.
step throughput 300 $PY benchmarks/throughput.py --device cuda --dataset synthetic --batch-sizes 128 512 --repeats 2 \
    --json-out "$OUT_DIR/throughput-cuda.json"

step doctor 150 $PY -m cifarlab doctor --dataset synthetic --budget 60 --out "$OUT_DIR/doctor"

# Every export format on CUDA (AOTInductor compiles for the GPU), each reloaded and checked there, then the
# inference latency of each variant on CUDA.
step export 200 bash -c "run=\$(ls -d '$OUT_DIR'/runs/*-captured | head -1) && \
    $PY -m cifarlab export \"\$run\" --out '$OUT_DIR/export' --device cuda \
    --format torchscript-trace,torchscript-script,export,onnx,aoti && \
    $PY -m cifarlab infer-bench '$OUT_DIR/export' --device cuda --allow-code-execution --out '$OUT_DIR/inferbench'"

# C8 alone (full preset: eager and the three compile modes, 10 epochs each), in its own lab folder: what each
# mode's compile costs on this machine's caches as found (cold on a fresh machine), and a traceback for a mode that
# fails. Run before `lab`, it leaves the caches warm: `lab` then measures the goal of a machine where it ran before.
step c8 "${C8_LIMIT_S:-480}" $PY -m cifarlab lab --preset full --dataset synthetic --only c8 --out "$OUT_DIR/lab-c8"

# The lab's full preset, per-experiment times (results.json time table); LAB_ONLY narrows it.
# LAB_BUDGET_MIN sets the lab's --budget (C3 and C8 cut to fit, the cuts said in the report).
step lab "${LAB_LIMIT_S:-420}" $PY -m cifarlab lab --preset full --dataset synthetic ${LAB_ONLY:+--only $LAB_ONLY} \
    ${LAB_BUDGET_MIN:+--budget $LAB_BUDGET_MIN} --out "$OUT_DIR/lab" --tensorboard

# Failures keep their whole traceback in the output folder (runs, lab items, C8 modes): show their ends here,
# so the console alone says what broke.
find "$OUT_DIR" -name '*traceback*.txt' 2>/dev/null | while read -r f; do echo "== traceback: $f"; tail -n 25 "$f"; done

# How every run's training step and evaluation ran (cuda-graph / eager) and why: a fallback is visible here.
find "$OUT_DIR" -name run.json 2>/dev/null | sort | $PY -c '
import json, sys
for path in sys.stdin.read().split():
    try:
        doc = json.load(open(path))
    except (OSError, ValueError):
        continue
    def said(d):
        d = d or {}
        return d.get("step", "-") + "".join(f" ({k}: {d[k]})" for k in ("note", "fallback_reason") if d.get(k))
    step, evaluation = said(doc.get("step")), said(doc.get("eval_step"))
    print(f"== {path}: step {step}; eval {evaluation}")
'

echo "gpu check done in $(($(date +%s) - T0))s; output in $OUT_DIR"
