#!/usr/bin/env bash
# One-call verification of cpeft's CUDA build on a GPU machine (see "Verifying on a GPU machine"
# in docs/design.md). Run from anywhere; it works in the repository root:
#
#   bash bench/gpu_check.sh
#
# Steps (each under its own `timeout`, all together under a 530 s budget, GPU_CHECK_BUDGET_S):
#   1. install the carried wheels from .whl/ (scipy-openblas32, loralib; the GPU machine has no
#      network) into /tmp/site, which goes on PYTHONPATH together with python/
#   2. build cpeft in place with CUDA required (CPEFT_CUDA=1); SASS for the GPU found here only,
#      unless CPEFT_CUDA_ARCHS is set, so the nvcc pass is about half of the default "80;90"
#   3. print cpeft.build_info() and cpeft.has_cuda()
#   4. pytest tests/test_cuda.py tests/test_cuda_dora.py tests/test_layers_torch.py
#      tests/test_lora_grouped.py tests/test_layers_strides.py tests/test_compile.py
#   5. bench/cuda_sanitize.sh: a subset of tests/test_cuda.py under compute-sanitizer memcheck,
#      then racecheck
#   6. python3 bench/bench_cuda.py --runs 3 (markdown table, also written to $OUT/bench_cuda.md),
#      then the DoRA rows (bench/bench_dora.py), the mixed-adapter row
#      (bench/bench_mixed_adapters.py) and the adapter-dtype row (bench/bench_adapter_dtype.py)
#   7. the rest of the tests/ suite with what is left of the budget
# GPU_CHECK_SKIP_TESTS=1 skips steps 4, 5 and 7 (a second call that only benchmarks).
# Expected on an H200: build ~40-60 s, CUDA tests ~40 s, sanitizers <= 100 + 80 s, benchmark
# ~150 s; each step's timeout below is its cap, all of them cut to the remaining budget.
# Everything is tee'd to "$OUT/gpu_check.log" (OUT defaults to /tmp/gpu_out) and the log ends with
# a summary table, one line per step. Exit status: 0 when every step passed, else 1.
#
# GPU_CHECK_STOP_AFTER=build stops after step 3 (for checking the script on a machine without a
# GPU: the build and the import still run; the build fails there only if nvcc/cuBLAS are missing).
# Build products (build/, python/cpeft/_C*.so) are git-ignored.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY="${PYTHON:-python3}"
SITE=/tmp/site
export PYTHONPATH="$SITE:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
# The whole run must end within 9 minutes (the device tool's 10-minute call limit, with room for
# its start and transfers): every step's timeout is cut to what is left of this budget.
BUDGET_S="${GPU_CHECK_BUDGET_S:-530}"
SUMMARY=()
FAILED=0

# step NAME TIMEOUT_S CMD...: runs CMD under timeout, records rc and seconds for the summary.
step() {
    local name="$1" limit="$2"
    shift 2
    echo
    echo "=== [$name] $*"
    local t0 rc left
    t0=$(date +%s)
    left=$(( BUDGET_S - (t0 - START) - 10 ))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 5 ]; then
        echo "=== [$name] SKIPPED: the ${BUDGET_S}s budget is spent"
        SUMMARY+=("$(printf '%-14s %-14s' "$name" 'SKIPPED (time)')")
        FAILED=1
        return 1
    fi
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    local verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMEOUT"; elif [ "$rc" -ne 0 ]; then verdict="FAILED rc=$rc"; fi
    [ "$rc" -ne 0 ] && FAILED=1
    SUMMARY+=("$(printf '%-14s %-14s %4ss' "$name" "$verdict" "$took")")
    echo "=== [$name] $verdict in ${took}s"
    return "$rc"
}

summary() {
    echo
    echo "=================== gpu_check summary ($(( $(date +%s) - START ))s total) ==================="
    local line
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    # pytest's closing tally line, so the summary says how many passed/skipped.
    local f
    for f in "$OUT"/pytest_*.tail; do
        [ -f "$f" ] && echo "$(basename "$f" .tail): $(cat "$f")"
    done
    echo "log: $LOG"
    [ "$FAILED" -eq 0 ] && echo "RESULT: all steps passed" || echo "RESULT: some steps FAILED"
    # Let tee write the last lines to the log before the script is gone.
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
}
trap summary EXIT

echo "cpeft gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT"
git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || true
git -C "$ROOT" status --short 2>/dev/null | head -20
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1 | head -5
nvcc --version 2>&1 | tail -2
"$PY" - <<'EOF'
import sys
print("python", sys.version.split()[0])
for name in ("numpy", "torch", "cupy", "jax", "peft", "transformers", "safetensors", "setuptools"):
    try:
        mod = __import__(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # report, do not stop: the tests skip what is missing
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
try:
    import torch
    print("torch.cuda.is_available()", torch.cuda.is_available(), "torch CUDA", torch.version.cuda)
except Exception:
    pass
EOF

# 1. carried wheels
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if [ "${#WHEELS[@]}" -eq 0 ]; then
    echo "no wheels in $ROOT/.whl: download them on a machine with network (docs/design.md," \
         "'Verifying on a GPU machine') and pass .whl in the device tool's carry"
    SUMMARY+=("$(printf '%-14s %-14s' wheels 'FAILED (none)')")
    FAILED=1
    exit 1
fi
step wheels 120 "$PY" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --target "$SITE" \
    --upgrade "${WHEELS[@]}" || exit 1

# 2. build with CUDA required; SASS for this machine's GPU unless CPEFT_CUDA_ARCHS is set.
if [ -z "${CPEFT_CUDA_ARCHS:-}" ]; then
    CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    if [[ "$CAP" =~ ^[0-9]+$ ]]; then export CPEFT_CUDA_ARCHS="$CAP"; fi
fi
echo "CPEFT_CUDA_ARCHS=${CPEFT_CUDA_ARCHS:-(setup.py default)}"
step build 150 env CPEFT_CUDA=1 "$PY" setup.py build_ext --inplace || exit 1

# 3. what was built
step import 60 "$PY" -c "import cpeft; print(cpeft.build_info()); print('has_cuda', cpeft.has_cuda())" \
    || exit 1
if [ "${GPU_CHECK_STOP_AFTER:-}" = "build" ]; then
    echo "GPU_CHECK_STOP_AFTER=build: stopping before the GPU tests"
    exit 0
fi

# 4. tests: the CUDA ones first (they are the point). -rs lists skip reasons, so a silently
#    skipped GPU test shows up.
rm -f "$OUT"/pytest_*.tail
CUDA_TEST_FILES="tests/test_cuda.py tests/test_cuda_dora.py tests/test_layers_torch.py"
CUDA_TEST_FILES+=" tests/test_lora_grouped.py tests/test_layers_strides.py tests/test_compile.py"
if [ -z "${GPU_CHECK_SKIP_TESTS:-}" ]; then
step pytest_cuda 180 bash -c "set -o pipefail; '$PY' -m pytest -q -rs -p no:cacheprovider \
    $CUDA_TEST_FILES 2>&1 | tee '$OUT/pytest_cuda.full' ; \
    rc=\${PIPESTATUS[0]}; tail -1 '$OUT/pytest_cuda.full' > '$OUT/pytest_cuda.tail'; exit \$rc"

# 5. sanitizers on a subset (bench/cuda_sanitize.sh says which); each bounded inside too.
step memcheck 100 env SANITIZE_TIMEOUT_S=95 PYTHON="$PY" bash bench/cuda_sanitize.sh memcheck
step racecheck 80 env SANITIZE_TIMEOUT_S=75 PYTHON="$PY" bash bench/cuda_sanitize.sh racecheck
fi

# 6. benchmarks (each prints a markdown table): the CUDA issue's table (also written for
#    docs/benchmarks.md), DoRA's rows (bf16, M=4096 and 16384, 4096², r=16), the mixed-adapter row
#    (16 adapters of rank 16 over M=4096 shuffled tokens of a 4096² bf16 layer) and the
#    adapter-dtype row (fp32 adapters on a bf16 base, M=4096 4096² r=16).
step bench 150 "$PY" bench/bench_cuda.py --runs 3 --markdown "$OUT/bench_cuda.md"
step bench_dora 90 "$PY" bench/bench_dora.py --device cuda --dtype bfloat16 --m 4096,16384 \
    --features 4096 --rank 16 --repeat 20
step bench_mixed 90 "$PY" bench/bench_mixed_adapters.py --device cuda --m 4096 --dim 4096 \
    --dtype bfloat16 --repeat 20
step bench_dtype 60 "$PY" bench/bench_adapter_dtype.py --device cuda --reps 50

# 7. the rest of the suite (the files of step 4 left out)
[ -n "${GPU_CHECK_SKIP_TESTS:-}" ] && exit "$FAILED"
step pytest_rest 200 bash -c "set -o pipefail; '$PY' -m pytest -q -rs -p no:cacheprovider \
    tests --ignore=tests/test_cuda.py --ignore=tests/test_cuda_dora.py \
    --ignore=tests/test_layers_torch.py --ignore=tests/test_lora_grouped.py \
    --ignore=tests/test_layers_strides.py --ignore=tests/test_compile.py 2>&1 \
    | tee '$OUT/pytest_rest.full' ; \
    rc=\${PIPESTATUS[0]}; tail -1 '$OUT/pytest_rest.full' > '$OUT/pytest_rest.tail'; exit \$rc"
exit "$FAILED"
