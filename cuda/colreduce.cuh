/* The deterministic column reduction of the CUDA compute code. */
#ifndef CPEFT_CUDA_COLREDUCE_CUH
#define CPEFT_CUDA_COLREDUCE_CUH

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cpeft/core.h"

namespace cpeft_cuda {

/* ---------------------------------------------------------------------------------------------
 * Column reduction (shared by LoRA's grad_bias and IA3's grad_l / grad_bias)
 *
 *   out[j] = post[j] * Σ_i a[i, j] * b[row(i), j]      (b and post optional; row(i) = idx[i] when
 *                                                       an index vector is given, rows whose index
 *                                                       is out of range are skipped)
 *
 * Deterministic: each thread owns one (row-slice, column) partial sum in a workspace of
 * colreduce_partial_bytes(); the finalize pass adds the slices in a fixed order. No atomics, so
 * the same input gives the same bits on every run. Rows may be fed in several chunks (accumulate
 * = 1 after the first) without rounding in between.
 * ------------------------------------------------------------------------------------------- */

struct ColReduceOperand {
    const void *data;       /* NULL: absent (treated as 1) */
    int64_t row_stride, col_stride;
    const void *index;      /* optional row index vector for b (gathered rows) */
    cpeft_dtype index_dtype;
    int64_t index_stride;
    int64_t index_limit;    /* valid indices are [0, index_limit) */
};

size_t colreduce_partial_bytes(cpeft_dtype dt, int64_t cols);

/* Adds rows [0, rows) of a (and b) into the partial sums; when scaled_out is given, also writes
 * scaled_out[i, j] = a[i, j] * col_scale[j] (used to turn g·W into grad_x in the same pass). */
int colreduce_accumulate(cpeft_dtype dt, int64_t rows, int64_t cols, const cpeft_mat &a,
                         const ColReduceOperand &b, const cpeft_vec *col_scale,
                         const cpeft_mat *scaled_out, void *partial, int accumulate,
                         cudaStream_t stream, cpeft_status *st);

/* out[j] = post[j] (if given) * Σ partial slices. */
int colreduce_finalize(cpeft_dtype dt, int64_t cols, const void *partial, const cpeft_vec *post,
                       const cpeft_vec &out, cudaStream_t stream, cpeft_status *st);

} /* namespace cpeft_cuda */

#endif /* CPEFT_CUDA_COLREDUCE_CUH */
