/*
 * Elementwise passes of the CUDA compute code over cpeft_mat views: zero fill, the bias row
 * broadcast, row or column scaling and the rounding of fp32 (fp64) sums. Each is queued on `stream`
 * and never synchronizes.
 */
#ifndef CPEFT_CUDA_ELEMENTWISE_CUH
#define CPEFT_CUDA_ELEMENTWISE_CUH

#include <cuda_runtime.h>

#include <cstddef>

#include "cpeft/core.h"

namespace cpeft_cuda {

/* Writes zero bits (0.0 in every float type) to every element of m. */
int zero_fill(const cpeft_mat &m, size_t elt, cudaStream_t stream, cpeft_status *st);

/* y[i, j] = (row_vec[j] * row_scale[j]) for every row (row_scale optional): the bias pre-fill
 * that lets the following GEMM accumulate with beta = 1 instead of a separate pass over y. */
int broadcast_rows(cpeft_dtype dt, const cpeft_mat &y, const cpeft_vec &row_vec,
                   const cpeft_vec *row_scale, cudaStream_t stream, cpeft_status *st);

/* dst[i, j] = src[i, j] * (l[j] if along_cols else l[i]); dst may be src (in place). */
int scale_matrix(cpeft_dtype dt, const cpeft_mat &src, const cpeft_vec &l, int along_cols,
                 const cpeft_mat &dst, cudaStream_t stream, cpeft_status *st);

/* dst (any layout) = src (compact row-major, of cpeft_acc_dtype(dt)), rounded once to dt. */
int store_acc(cpeft_dtype dt, const void *src, const cpeft_mat &dst, cudaStream_t stream,
              cpeft_status *st);

} /* namespace cpeft_cuda */

#endif /* CPEFT_CUDA_ELEMENTWISE_CUH */
