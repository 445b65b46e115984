/* The rank-r product kernels of rank_r.cu, used by the LoRA and DoRA ops. */
#ifndef CPEFT_CUDA_RANK_R_CUH
#define CPEFT_CUDA_RANK_R_CUH

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cpeft/core.h"

namespace cpeft_cuda {

/* ---------------------------------------------------------------------------------------------
 * Rank-r products (rank_r.cu): the skinny products of the LoRA branch, each reading its large
 * operand once, with the dropout mask of core.h regenerated inside (d below; drop NULL or p == 0:
 * no dropout). The counters of element (m, i) of the large operand are m * L + i (L its columns),
 * so d applies to x only. fp32 (fp64) accumulation; every operand of one call has dtype dt.
 * ------------------------------------------------------------------------------------------- */

/* false when the environment says CPEFT_CUDA_RANK_R=cublas: the dropout-free products then go
 * through cuBLAS and dropout through the materialized row chunks, the path these kernels
 * replace (kept so that a GPU session can compare the two and fall back). */
bool rank_r_kernels_enabled();

/* out (M x R) = d(big) (M x L) · smallᵀ, small R x L (x·Aᵀ; g·B with small = Bᵀ). out is of
 * dtype dt, or of cpeft_acc_dtype(dt) when out_acc (sums kept unrounded for a later reduction). */
int rank_project(cpeft_dtype dt, const cpeft_mat &big, const cpeft_dropout *drop,
                 const cpeft_mat &small, const cpeft_mat &out, cudaStream_t stream,
                 cpeft_status *st, bool out_acc = false);

/* Workspace rank_reduce needs for partial sums (0: none). */
size_t rank_reduce_partial_bytes(cpeft_dtype dt, int64_t m, int64_t len, int64_t r);

/* out (R x L) = alpha · smallᵀ · d(big), small M x R, big M x L (grad_a = s·gbᵀ·drop(x);
 * grad_bᵀ = s·xaᵀ·g). Rows are summed in slices fixed by the shape, then the slices in order:
 * deterministic. partial: rank_reduce_partial_bytes() of workspace. */
int rank_reduce(cpeft_dtype dt, const cpeft_mat &small, const cpeft_mat &big,
                const cpeft_dropout *drop, double alpha, const cpeft_mat &out, void *partial,
                cudaStream_t stream, cpeft_status *st);

/* out (M x L) = alpha · d(small · a), small M x R, a R x L: the LoRA part of grad_x with the
 * mask applied as it is written (out is overwritten). */
int rank_expand_dropout(cpeft_dtype dt, const cpeft_mat &small, const cpeft_mat &a,
                        const cpeft_dropout *drop, double alpha, const cpeft_mat &out,
                        cudaStream_t stream, cpeft_status *st);

/* LoRA embedding forward in one pass: y[n] = W[idx[n]] + alpha · A[:, idx[n]]ᵀ·Bᵀ, with
 * weight V x D, lora_a R x V, lora_b D x R, y N x D; an index outside [0, V) gives a NaN row. */
int rank_embedding_forward(cpeft_dtype dt, cpeft_dtype index_dt, const cpeft_vec &indices,
                           int64_t vocab, const cpeft_mat &weight, const cpeft_mat &lora_a,
                           const cpeft_mat &lora_b, double alpha, const cpeft_mat &y,
                           cudaStream_t stream, cpeft_status *st);

} /* namespace cpeft_cuda */

#endif /* CPEFT_CUDA_RANK_R_CUH */
