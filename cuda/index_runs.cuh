/* Sorted index runs and their scatter: embedding gradients in the CUDA compute code. */
#ifndef CPEFT_CUDA_INDEX_RUNS_CUH
#define CPEFT_CUDA_INDEX_RUNS_CUH

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cpeft/core.h"

namespace cpeft_cuda {

/* ---------------------------------------------------------------------------------------------
 * Embedding gradients without anything of vocabulary size: sort the N indices (radix sort over
 * only the bits V needs), then one pass writes each distinct index's row once with its rows summed
 * in fp32 (fp64). No atomics: deterministic, exact to one rounding for fp16/bf16, and no
 * V-sized fp32 accumulator. Indices equal to padding_idx or outside [0, V) map to a sentinel key
 * and are skipped, so a bad index never causes an out-of-bounds access.
 * ------------------------------------------------------------------------------------------- */

struct IndexRuns {
    uint32_t *keys;     /* N sorted keys: index value, or `sentinel` (skipped) */
    int32_t *order;     /* N source positions in key order */
    int64_t n;
    uint32_t sentinel;
};

/* Workspace bytes index_runs_build needs for n indices and vocabulary size v. */
int index_runs_bytes(int64_t n, int64_t v, size_t *bytes, cpeft_status *st);
int index_runs_build(const cpeft_vec &indices, cpeft_dtype index_dtype, int64_t v,
                     int64_t padding_idx, void *ws, size_t ws_bytes, IndexRuns *runs,
                     cudaStream_t stream, cpeft_status *st);

/* For every distinct key k: dst[k * key_stride + c * col_stride] =
 *   scale * col_scale[c] * Σ_{positions p with key k} src[order[p], c]    for c in [0, cols).
 * src is of dtype dt (src_is_acc = 0) or of cpeft_acc_dtype(dt) (src_is_acc = 1); dst is of dtype
 * dt. Keys that never occur are left untouched (the caller zero-fills dst first). */
int scatter_runs(cpeft_dtype dt, const IndexRuns &runs, const void *src, int src_is_acc,
                 int64_t src_row_stride, int64_t src_col_stride, int64_t cols, double scale,
                 const cpeft_vec *col_scale, void *dst, int64_t dst_key_stride,
                 int64_t dst_col_stride, cudaStream_t stream, cpeft_status *st);

} /* namespace cpeft_cuda */

#endif /* CPEFT_CUDA_INDEX_RUNS_CUH */
