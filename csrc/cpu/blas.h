/*
 * Matrix products of the CPU compute layer through OpenBLAS (scipy-openblas32, scipy_cblas_*) on
 * strided views. Not part of the public compute contract (that is the headers in
 * csrc/include/cpeft/); nothing here sees Python.
 *
 * Views are cpeft_mat in elements (core.h). Functions return CPEFT_OK or a cpeft_code with
 * st->message set.
 */
#ifndef CPEFT_CPU_BLAS_H
#define CPEFT_CPU_BLAS_H

#include "cpeft/core.h"

/*
 * C = alpha * op(A) * op(B) + beta * C, op(X) = Xᵀ when trans_x. A, B, C are any BLAS-able
 * views (core.h). K == 0 gives C = beta*C, written explicitly (zeros when beta == 0, so an
 * uninitialised C is never read).
 */
int cpeft_gemm_cpu(cpeft_dtype dtype, int trans_a, int trans_b, double alpha, cpeft_mat a,
                   cpeft_mat b, double beta, cpeft_mat c, cpeft_status *st);

/* out[j] = alpha * Σ_i A[i][j] (overwrites out), as a GEMV against a ones vector. */
int cpeft_colsum_cpu(cpeft_dtype dtype, double alpha, cpeft_mat a, cpeft_vec out, cpeft_status *st);

#endif /* CPEFT_CPU_BLAS_H */
