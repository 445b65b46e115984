/*
 * Matrix products of the CUDA compute code on cpeft_mat views, through cuBLAS (and cuBLASLt for a
 * product whose output columns are scaled), queued on a Session's stream.
 */
#ifndef CPEFT_CUDA_GEMM_CUH
#define CPEFT_CUDA_GEMM_CUH

#include "cpeft/core.h"
#include "stream_context.cuh"

namespace cpeft_cuda {

/* C (m x n) = alpha * A (m x k) * B (k x n) + beta * C, on the Session's stream.
 * A and B are of dtype ab; C is of dtype c, which is ab or cpeft_acc_dtype(ab) (fp16/bf16 inputs
 * with an fp32 C accumulate partial sums across calls without rounding to 16 bits in between).
 * Every view may be row- or column-major (core.h's BLAS-able rule); the transposes are chosen
 * here. Always CUBLAS_COMPUTE_32F (64F for fp64): exact fp32 products, no TF32, and the handle
 * disallows reduced-precision split-K reductions. k == 0 gives C = beta * C. */
int gemm(Session &s, cpeft_dtype ab, cpeft_dtype c, double alpha, const cpeft_mat &a,
         const cpeft_mat &b, double beta, const cpeft_mat &cm, cpeft_status *st);

/* C (m x n) = (A·B)·diag(col_scale) + beta · C through cuBLASLt's per-row alpha vector
 * (CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST) on C's column-major transpose, so the
 * scale costs nothing beyond the GEMM. Needs scale_ws of col_scale.len floats (the vector widened
 * to fp32, the type cuBLASLt reads it in). Descriptors, layouts and the algorithm are found once
 * per problem and kept in the stream's context; no workspace, no split-K in 16 bits. *done is
 * false, with nothing queued, where this does not apply (fp64, C not row-major, no algorithm):
 * the caller then scales another way. */
int gemm_scale_cols(Session &s, cpeft_dtype dt, const cpeft_vec &col_scale, void *scale_ws,
                    const cpeft_mat &a, const cpeft_mat &b, double beta, const cpeft_mat &c,
                    bool *done, cpeft_status *st);

} /* namespace cpeft_cuda */

#endif /* CPEFT_CUDA_GEMM_CUH */
