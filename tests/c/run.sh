#!/bin/sh
# Builds and runs the standalone CPU compute-layer checks (not part of the extension build).
# Usage: tests/c/run.sh [extra CFLAGS, e.g. -fsanitize=address,undefined]
set -e
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
blas_inc=$(python3 -c "import scipy_openblas32 as s; print(s.get_include_dir())")
blas_lib=$(python3 -c "import scipy_openblas32 as s; print(s.get_lib_dir())")
out=${TMPDIR:-/tmp}/cpeft_test_cpu
gcc -std=c11 -O2 -g -Wall -Wextra -Werror "$@" -I"$root/csrc/include" -I"$root/csrc/cpu" -I"$blas_inc" \
    "$here/test_cpu_compute.c" "$root"/csrc/common/*.c "$root"/csrc/cpu/*.c \
    -L"$blas_lib" -Wl,-rpath,"$blas_lib" -lscipy_openblas -lm -o "$out"
OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} "$out"
# Again with BLAS calls limited to M, N, K <= 3, so the blocking that products beyond the 32-bit
# BLAS range go through is checked against the same references at small sizes.
gcc -std=c11 -O2 -g -Wall -Wextra -Werror -DCPEFT_BLAS_DIM_LIMIT=3 "$@" -I"$root/csrc/include" \
    -I"$root/csrc/cpu" -I"$blas_inc" "$here/test_cpu_compute.c" "$root"/csrc/common/*.c \
    "$root"/csrc/cpu/*.c \
    -L"$blas_lib" -Wl,-rpath,"$blas_lib" -lscipy_openblas -lm -o "$out.blocked"
OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} "$out.blocked"
