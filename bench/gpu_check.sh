#!/usr/bin/env bash
# One-call check of cpeft's CUDA build on a GPU machine (docs/design.md, "Verifying on a GPU
# machine"): build, every GPU test, both compute-sanitizer tools, the benchmarks. Run from anywhere:
#
#   bash bench/gpu_check.sh                      # with the device tool: carry [".whl"], timeout_s 600
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh  # prints each step, its cap and the budget; runs nothing
#
# Steps:
#   versions     nvidia-smi, nvcc and the Python packages' versions
#   wheels       install the carried wheels from .whl/ (scipy-openblas32, loralib; the GPU machine
#                has no network) into /tmp/site, which goes on PYTHONPATH together with python/
#   build        build cpeft in place with CUDA required (CPEFT_CUDA=1), the .cu files compiled
#                in parallel (-j nproc), SASS for this machine's GPU only unless CPEFT_CUDA_ARCHS is
#                set
#   import       cpeft.build_info() and cpeft.has_cuda()
#   pytest_cuda  every GPU test: `pytest tests -k cuda` selects the tests that a machine without a
#                GPU skips (test_cuda*.py whole, the [cuda] cases of the device-parametrized
#                tests, the test_cuda_* functions elsewhere) and two CPU tests
#   memcheck     bench/cuda_sanitize.sh memcheck (its subset of the GPU tests)
#   racecheck    bench/cuda_sanitize.sh racecheck
#   bench        bench/bench_cuda.py --runs 3 --reps 50: the CUDA issue's table, also written row by
#                row to $OUT/bench_cuda.md (ready for docs/benchmarks.md)
#   bench_dora   bench/bench_dora.py: DoRA rows (bf16, M=4096 and 16384, 4096^2, r=16)
#   bench_mixed  bench/bench_mixed_adapters.py: 16 adapters of rank 16, M=4096, 4096^2, bf16
#   bench_dtype  bench/bench_adapter_dtype.py: fp32 adapters on a bf16 base, M=4096 4096^2 r=16
#
# Budget: the whole run must end within 540 s (9 minutes: the device tool allows 600 s a call,
# less its start and the transfer of $OUT). Each step runs under `timeout` with the cap in CAPS
# below; the caps add up to 525 s, so every step can use its whole cap and 15 s remain for the
# shell, tee and the summary (the script checks the sum before it starts). The caps are the
# times measured on an H200 at 18e3f0a (../shared/gpu-runs/README.md), scaled to today's tree,
# with room:
#   versions     15  (about 3 s: one Python process reading package versions, importing torch)
#   wheels       10  (pip install --no-index of two wheels: about 3 s)
#   build        75  (33 s at 18e3f0a for 2,127 lines of CUDA compiled one file at a time; 4,604
#                     lines now, in parallel: the longest file, rank_r.cu, about a third of the
#                     total, bounds it, so about 35-45 s)
#   import       15
#   pytest_cuda 130  (123 GPU tests took 19 s at 18e3f0a, about 0.15 s each; 543 now: about 80 s,
#                     plus collecting tests/ and two inductor compiles for the CUDA-graph tests)
#   memcheck     70  (29 small-shape tests, about 1 s each sanitized, plus 20-30 s to start Python,
#                     torch, CUDA and cuBLAS under the sanitizer)
#   racecheck    50  (7 tests, racecheck being the slower tool, plus the same start)
#   bench        90  (16 rows x 3 runs x 3-4 timings of about 0.1 s each: do_bench times 25 ms of
#                     warm-up and --reps 50 ms of repetitions; plus set-up and peft models: ~60 s)
#   bench_dora   30  (a process start of about 10 s; 20 repeats of 4 variants at two sizes)
#   bench_mixed  20  (a process start; 20 repeats of 3 variants)
#   bench_dtype  20  (a process start; 50 repeats of 4 cases)
#   sum         525
# A step that runs past its cap is killed and reported TIMEOUT (and the run fails): the cap is the
# budget, not a hope. Should the steps before it overrun anyway, a step's cap is also cut to what
# is left of the 540 s.
#
# Everything is tee'd to "$OUT/gpu_check.log" (OUT defaults to /tmp/gpu_out); the log ends with a
# summary, one line per step (status, seconds, cap). Exit status: 0 when every step passed, 1 when
# one failed or timed out, 2 when there is no GPU (the build and import still run where nvcc is;
# the GPU steps are reported SKIPPED).
# GPU_CHECK_SKIP_TESTS=1 skips pytest_cuda, memcheck and racecheck (a second call that only
# benchmarks). Build products (build/, python/cpeft/_C*.so) are git-ignored.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

BUDGET_S=540
declare -A CAPS=(
    [versions]=15 [wheels]=10 [build]=75 [import]=15 [pytest_cuda]=130 [memcheck]=70
    [racecheck]=50 [bench]=90 [bench_dora]=30 [bench_mixed]=20 [bench_dtype]=20
)
CAP_SUM=0
for cap in "${CAPS[@]}"; do CAP_SUM=$(( CAP_SUM + cap )); done
if [ "$CAP_SUM" -gt $(( BUDGET_S - 15 )) ]; then
    echo "gpu_check: the step caps add up to ${CAP_SUM}s, more than the ${BUDGET_S}s budget less 15s"
    exit 1
fi

DRY_RUN="${GPU_CHECK_DRY_RUN:-}"
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

export PY="${PYTHON:-python3}" OUT
SITE=/tmp/site
export PYTHONPATH="$SITE:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
SUMMARY=()
FAILED=0
NO_GPU=0

record() {  # record NAME VERDICT [SECONDS]
    SUMMARY+=("$(printf '%-12s %-16s %5s %5s' "$1" "$2" "${3:+${3}s}" "${CAPS[$1]}s")")
}

# step NAME CMD...: runs CMD under its cap (cut to what is left of the budget), records the
# verdict and the seconds taken for the summary; returns CMD's status.
step() {
    local name="$1" limit="${CAPS[$1]}"
    shift
    echo
    echo "=== [$name] (cap ${limit}s) $*"
    if [ -n "$DRY_RUN" ]; then
        record "$name" "DRY RUN"
        return 0
    fi
    local t0 rc left took verdict=ok
    t0=$(date +%s)
    left=$(( BUDGET_S - (t0 - START) - 10 ))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 5 ]; then
        echo "=== [$name] SKIPPED: the ${BUDGET_S}s budget is spent"
        record "$name" "SKIPPED (time)"
        FAILED=1
        return 1
    fi
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
    took=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict=TIMEOUT
    elif [ "$rc" -ne 0 ]; then verdict="FAILED rc=$rc"; fi
    [ "$rc" -ne 0 ] && FAILED=1
    record "$name" "$verdict" "$took"
    echo "=== [$name] $verdict in ${took}s"
    return "$rc"
}

# gpu_step NAME CMD...: a step that needs the GPU; reported SKIPPED where there is none.
gpu_step() {
    if [ "$NO_GPU" -eq 1 ] && [ -z "$DRY_RUN" ]; then
        echo
        echo "=== [$1] SKIPPED: no GPU"
        record "$1" "SKIPPED (no GPU)"
        return 0
    fi
    step "$@"
}

summary() {
    local status=$?
    echo
    echo "============ gpu_check summary: $(( $(date +%s) - START ))s of ${BUDGET_S}s" \
         "(caps add up to ${CAP_SUM}s) ============"
    printf '%-12s %-16s %5s %5s\n' step status took cap
    local line f
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    # pytest's closing tally line, so the summary says how many passed and skipped.
    for f in "$OUT"/pytest_*.tail; do
        [ -f "$f" ] && echo "$(basename "$f" .tail): $(cat "$f")"
    done
    echo "log: $LOG"
    if [ -n "$DRY_RUN" ]; then echo "RESULT: dry run, nothing was run"
    elif [ "$FAILED" -ne 0 ] || [ "$status" -eq 1 ]; then echo "RESULT: some steps FAILED"
    elif [ "$NO_GPU" -eq 1 ]; then echo "RESULT: no GPU, the GPU steps were skipped"
    else echo "RESULT: all steps passed"; fi
    # Let tee write the last lines to the log before the script is gone.
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
}
trap summary EXIT

# Runs a pytest command line, keeping its output in $OUT/pytest_NAME.full and its closing tally
# line in $OUT/pytest_NAME.tail for the summary. (Functions run under `timeout` through
# `bash -c`, hence the exports.)
run_pytest() {
    local name="$1"
    shift
    "$PY" -m pytest "$@" 2>&1 | tee "$OUT/pytest_$name.full"
    local rc=${PIPESTATUS[0]}
    tail -1 "$OUT/pytest_$name.full" > "$OUT/pytest_$name.tail"
    return "$rc"
}
export -f run_pytest

echo "cpeft gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT"
git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || true
git -C "$ROOT" status --short 2>/dev/null | head -20
if ! nvidia-smi -L >/dev/null 2>&1; then
    NO_GPU=1
    echo "no GPU: nvidia-smi finds none; the GPU steps will be skipped"
fi

versions() {
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1 | head -5
    nvcc --version 2>&1 | tail -2
    "$PY" - <<'PYEOF'
import sys
from importlib import metadata

print("python", sys.version.split()[0])
# Read from the installed metadata, not imported: importing them all takes longer than the step.
for name in ("numpy", "torch", "triton", "cupy-cuda12x", "cupy-cuda13x", "jax", "peft",
             "transformers", "safetensors"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:  # report, do not stop: the tests skip what is missing
        print(f"{name}: not installed")
try:
    import torch
    print("torch.cuda.is_available()", torch.cuda.is_available(), "torch CUDA", torch.version.cuda)
except Exception:
    pass
PYEOF
}
export -f versions
step versions bash -c versions

shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if [ -z "$DRY_RUN" ] && "$PY" -c 'import scipy_openblas32, loralib' 2>/dev/null; then
    echo
    echo "=== [wheels] not needed: scipy-openblas32 and loralib import"
    record wheels "not needed"
elif [ "${#WHEELS[@]}" -eq 0 ] && [ -z "$DRY_RUN" ]; then
    echo "no wheels in $ROOT/.whl: download them on a machine with network (docs/design.md," \
         "'Verifying on a GPU machine') and pass .whl in the device tool's carry"
    record wheels "FAILED (none)"
    FAILED=1
    exit 1
else
    step wheels "$PY" -m pip install -q --root-user-action=ignore --no-index --no-deps \
        --no-compile --target "$SITE" --upgrade "${WHEELS[@]}" || exit 1
fi

if [ -z "${CPEFT_CUDA_ARCHS:-}" ]; then
    CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    if [[ "$CAP" =~ ^[0-9]+$ ]]; then export CPEFT_CUDA_ARCHS="$CAP"; fi
fi
echo "CPEFT_CUDA_ARCHS=${CPEFT_CUDA_ARCHS:-(setup.py default)}"
# CPEFT_TORCH=0: the torch node (cpeft._torch_node) serves CPU tensors only and is built and tested
# by CI; its single C++ file against torch's headers would take about 40 s of the build's cap.
step build env CPEFT_CUDA=1 CPEFT_TORCH=0 "$PY" setup.py build_ext --inplace -j "$(nproc)" || exit 1
step import "$PY" -c "import cpeft; print(cpeft.build_info()); print('has_cuda', cpeft.has_cuda())" \
    || exit 1

# The tests first (they are the point). -rs lists skip reasons, so a GPU test skipped on the GPU
# machine shows up.
rm -f "$OUT"/pytest_*.tail
if [ -z "${GPU_CHECK_SKIP_TESTS:-}" ]; then
    gpu_step pytest_cuda bash -c 'run_pytest cuda -q -rs -p no:cacheprovider tests -k cuda'
    gpu_step memcheck env SANITIZE_TIMEOUT_S=$(( CAPS[memcheck] - 5 )) PYTHON="$PY" \
        bash bench/cuda_sanitize.sh memcheck
    gpu_step racecheck env SANITIZE_TIMEOUT_S=$(( CAPS[racecheck] - 5 )) PYTHON="$PY" \
        bash bench/cuda_sanitize.sh racecheck
fi

gpu_step bench "$PY" bench/bench_cuda.py --runs 3 --reps 50 --markdown "$OUT/bench_cuda.md"
gpu_step bench_dora "$PY" bench/bench_dora.py --device cuda --dtype bfloat16 --m 4096,16384 \
    --features 4096 --rank 16 --repeat 20
gpu_step bench_mixed "$PY" bench/bench_mixed_adapters.py --device cuda --m 4096 --dim 4096 \
    --dtype bfloat16 --repeat 20
gpu_step bench_dtype "$PY" bench/bench_adapter_dtype.py --device cuda --reps 50

if [ "$FAILED" -ne 0 ]; then exit 1; fi
if [ "$NO_GPU" -eq 1 ] && [ -z "$DRY_RUN" ]; then exit 2; fi
exit 0
