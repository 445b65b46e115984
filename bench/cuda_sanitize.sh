#!/usr/bin/env bash
# The CUDA tests under compute-sanitizer: memcheck (out-of-bounds and misaligned device accesses,
# bad frees) and racecheck (shared-memory hazards between a block's threads, the barriers of the
# tiled kernels in cuda/rank_r.cu and cuda/colreduce.cu). Run from anywhere after an in-place CUDA
# build, with PYTHONPATH reaching python/ (bench/gpu_check.sh sets both up):
#
#   bash bench/cuda_sanitize.sh [memcheck|racecheck|all]     (default: all)
#
# Sanitized kernels run 10-100x slower, and racecheck is slower than memcheck, so each tool runs
# a chosen subset of the GPU tests, sized for bench/gpu_check.sh's budget (70 s for memcheck, 50 s
# for racecheck, each including the sanitized start of Python, torch, CUDA and cuBLAS): one or
# two small, awkward shapes per kernel family rather than every size.
#   memcheck (29 tests): the rank-r kernels (bf16 at three shapes, with and without dropout; the
#     fp64 accumulator once), the one-pass embedding, the dropout masks across 2^64, empty inputs,
#     a column-major input, IA3 (both scalings, and the cuBLASLt GEMM with l as its alpha vector
#     on offset and column-major views), the bit-exact merges, DoRA linear and embedding, the
#     grouped mixed-adapter op.
#   racecheck (7 tests): the kernels with shared-memory tiles or block reductions only (rank-r
#     projections and reductions, the embedding's, IA3's column reduction, DoRA's).
# SANITIZE_TESTS overrides the -k expression of both, SANITIZE_TIMEOUT_S (default 150) bounds
# each tool. torch's caching allocator is switched off
# (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that memcheck sees each tensor's own bounds instead of a
# larger cached block. Exit status: 0 when every tool ran clean; else the last failure's: 1 (a
# hazard or a failed test), 124 (timeout), 2 (no compute-sanitizer), 3 (the sanitizer refuses
# this machine's GPU, as under gVisor).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
TOOLS="${1:-all}"
LIMIT="${SANITIZE_TIMEOUT_S:-150}"
TEST_FILES=(tests/test_cuda.py tests/test_cuda_dora.py tests/test_lora_grouped.py)
MEMCHECK_TESTS="(rank_r_kernels and own and bfloat16 and (shape0 or shape1 or shape4)) \
or (rank_r_kernels and own and float64 and shape3 and 0.2) \
or (embedding_rank_r and own and bfloat16 and (9-5-513-1 or 17-1000-1029-3 or 8-33-64-64)) \
or (dropout_masks_identical and own and 18446744073709551049) or (empty_rows and own and bfloat16) \
or (near_2_64 and own and float32-18446744073709551615) or (column_major and own) \
or (test_ia3_linear and bfloat16 and shape1) \
or (output_scaling_in_the_gemm and bfloat16 and (37-113-29 or 1-1-1-dense)) \
or (merge_unmerge_bit_exact and bfloat16) \
or (dora_linear_dropout_fan_in_fan_out and bfloat16) or (dora_embedding and bfloat16 and int64) \
or (dora_linear_without_base and bfloat16 and 1100) or (cuda_matches_float64_reference and bfloat16) \
or workspace_cannot_grow_under_graph_capture"
RACECHECK_TESTS="(rank_r_kernels and own and bfloat16 and 0.2 and (shape1 or shape3 or shape4)) \
or (embedding_rank_r and own and bfloat16 and (17-1000-1029-3 or 31-64-127-17)) \
or (dora_linear_dropout_fan_in_fan_out and bfloat16) or (test_ia3_linear and bfloat16-shape1-False)"

SANITIZER="$(command -v compute-sanitizer || true)"
NVCC_DIR="$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")"
for candidate in "${CUDA_HOME:-}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
                 "$NVCC_DIR/compute-sanitizer"; do
    if [ -z "$SANITIZER" ] && [ -x "$candidate" ]; then SANITIZER="$candidate"; fi
done
if [ -z "$SANITIZER" ]; then
    echo "cuda_sanitize: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    exit 2
fi
"$SANITIZER" --version | tail -1

case "$TOOLS" in
    all) TOOLS="memcheck racecheck" ;;
    memcheck|racecheck) ;;
    *) echo "usage: $0 [memcheck|racecheck|all]"; exit 2 ;;
esac

FAILED=0
for tool in $TOOLS; do
    if [ "$tool" = memcheck ]; then TESTS="${SANITIZE_TESTS:-$MEMCHECK_TESTS}"
    else TESTS="${SANITIZE_TESTS:-$RACECHECK_TESTS}"; fi
    echo "=== compute-sanitizer --tool $tool: pytest ${TEST_FILES[*]} -k \"$TESTS\""
    t0=$(date +%s)
    # --report-api-errors no: torch probes the runtime with calls that fail by design; those are
    # not kernel errors. --error-exitcode makes any reported hazard fail the step.
    LOG="$(mktemp)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=5 "$LIMIT" \
        "$SANITIZER" --tool "$tool" --error-exitcode 1 --report-api-errors no \
        --target-processes all --print-limit 20 \
        "$PY" -m pytest -q -x -p no:cacheprovider "${TEST_FILES[@]}" -k "$TESTS" 2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
    # Under gVisor the sanitizer refuses the device (device/KINDS.md): say so, not "a bug".
    if grep -q "Device not supported" "$LOG"; then
        echo "=== $tool: compute-sanitizer does not support this machine's GPU runtime" \
             "(gVisor?); nothing was checked"
        rc=3
    fi
    rm -f "$LOG"
    echo "=== $tool: rc=$rc in $(( $(date +%s) - t0 ))s"
    [ "$rc" -ne 0 ] && FAILED=$rc
done
exit "$FAILED"
