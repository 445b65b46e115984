/* Dropout launchers of dropout.cu that the LoRA ops use on row chunks. */
#ifndef CPEFT_CUDA_DROPOUT_ROWS_CUH
#define CPEFT_CUDA_DROPOUT_ROWS_CUH

#include <cuda_runtime.h>

#include <cstdint>

#include "cpeft/core.h"

namespace cpeft_cuda {

/* ---------------------------------------------------------------------------------------------
 * Dropout launchers shared with lora_linear.cu (defined in dropout.cu). Element (m, i) of the
 * logical M x IN input has counter m * IN + i (see core.h); `in` is IN.
 * ------------------------------------------------------------------------------------------- */

/* out (rows x in, dense) = drop(x) for rows [row0, row0 + rows) of x. */
int dropout_rows(cpeft_dtype dt, const cpeft_dropout *d, const cpeft_mat &x, int64_t row0,
                 int64_t rows, void *out, cudaStream_t stream, cpeft_status *st);

/* dst rows [row0, row0 + rows) = alpha * mask ⊙ t, with t (rows x in, dense) of
 * cpeft_acc_dtype(dt): the LoRA part of grad_x, written before the base GEMM accumulates onto it
 * with beta = 1. */
int dropout_scale_rows(cpeft_dtype dt, const cpeft_dropout *d, const void *t, double alpha,
                       int64_t row0, int64_t rows, const cpeft_mat &dst, cudaStream_t stream,
                       cpeft_status *st);

} /* namespace cpeft_cuda */

#endif /* CPEFT_CUDA_DROPOUT_ROWS_CUH */
