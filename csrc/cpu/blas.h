/*
 * CPU-internal helpers shared by the op files in csrc/cpu/: matrix products through OpenBLAS
 * (scipy-openblas32, scipy_cblas_*) on strided views, sub-views, small strided loops, and the
 * row-chunked dropout application. Not part of the public compute contract (that is
 * the headers in csrc/include/cpeft/); nothing here sees Python.
 *
 * Every helper takes views as cpeft_mat in elements (core.h). Functions returning int return
 * CPEFT_OK or a cpeft_code with st->message set.
 */
#ifndef CPEFT_CPU_BLAS_H
#define CPEFT_CPU_BLAS_H

#include "cpeft/core.h"
#include "cpeft/lora_linear.h"

/* Temporaries that scale with M (dropout rows, scaled activation rows) are cut into row chunks
 * of about this many bytes, so their size is bounded whatever the batch. */
#define CPEFT_CHUNK_BYTES ((int64_t)2 << 20)

/* Rows per chunk for a temporary of `cols` elements per row, at least 1. */
int64_t cpeft_chunk_rows(cpeft_dtype dtype, int64_t cols);

/* Rows [row0, row0+nrows) and columns [col0, col0+ncols) of m; strides unchanged. */
cpeft_mat cpeft_mat_sub(cpeft_dtype dtype, cpeft_mat m, int64_t row0, int64_t nrows,
                        int64_t col0, int64_t ncols);

/* A compact row-major rows x cols view over caller-owned memory. */
cpeft_mat cpeft_mat_compact(void *data, int64_t rows, int64_t cols);

/* Element pointer of m at (i, j). */
void *cpeft_mat_at(cpeft_dtype dtype, cpeft_mat m, int64_t i, int64_t j);

/* malloc of count elements of dtype; NULL and CPEFT_ERR_NOMEM naming `what` on failure. */
void *cpeft_alloc_temp(cpeft_dtype dtype, int64_t count, const char *what, cpeft_status *st);

/* Start of every public CPU op: clears st, then CPEFT_ERR_INTERNAL naming `op` unless dtype is
 * float32 or float64 (the only CPU dtypes). */
int cpeft_op_begin(cpeft_dtype dtype, const char *op, cpeft_status *st);

/*
 * C = alpha * op(A) * op(B) + beta * C, op(X) = Xᵀ when trans_x. A, B, C are any BLAS-able
 * views (core.h). K == 0 gives C = beta*C, written explicitly (zeros when beta == 0, so an
 * uninitialised C is never read).
 */
int cpeft_gemm_cpu(cpeft_dtype dtype, int trans_a, int trans_b, double alpha, cpeft_mat a,
                   cpeft_mat b, double beta, cpeft_mat c, cpeft_status *st);

/* out[j] = alpha * Σ_i A[i][j] (overwrites out), as a GEMV against a ones vector. */
int cpeft_colsum_cpu(cpeft_dtype dtype, double alpha, cpeft_mat a, cpeft_vec out,
                     cpeft_status *st);

/* Every element of m set to zero. */
void cpeft_fill_zero_cpu(cpeft_dtype dtype, cpeft_mat m);

/* Every row of m set to v (v.len == m.cols). */
void cpeft_fill_rows_cpu(cpeft_dtype dtype, cpeft_mat m, cpeft_vec v);

/* m[i][j] *= l[j] (along_cols) or l[i] (!along_cols), in place. */
void cpeft_scale_mat_cpu(cpeft_dtype dtype, cpeft_mat m, cpeft_vec l, int along_cols);

/* dst[i][j] = src[i][j] * l[j] (along_cols) or l[i] (!along_cols); dst may be compact. */
void cpeft_scaled_copy_cpu(cpeft_dtype dtype, cpeft_mat src, cpeft_vec l, int along_cols,
                           cpeft_mat dst);

/* v[i] *= l[i], in place. */
void cpeft_scale_vec_cpu(cpeft_dtype dtype, cpeft_vec v, cpeft_vec l);

/*
 * Dropout applied to rows [row0, row0+src.rows) of a logical M x src.cols input (defined in
 * dropout.c): element (i, j) uses counter (row0+i)*src.cols + j and factor
 * keep ? 1/(1-p) : 0, multiplied (not selected) so a NaN in src stays NaN as in torch.
 *   accumulate == 0:  dst  = alpha * factor * src
 *   accumulate != 0:  dst += alpha * factor * src
 */
void cpeft_dropout_rows_cpu(cpeft_dtype dtype, const cpeft_dropout *d, int64_t row0,
                            double alpha, cpeft_mat src, int accumulate, cpeft_mat dst);

/* Embedding index n as int64, from an int32 or int64 vector. Read through a volatile pointer:
 * the caller's array may be rewritten by another thread while the GIL is released, so each use
 * loads the value once into a local that is checked and then used, and the compiler must not
 * load it again between the two. */
static inline int64_t cpeft_index_at(cpeft_dtype index_dtype, cpeft_vec indices, int64_t n)
{
    if (index_dtype == CPEFT_INT32)
        return ((const volatile int32_t *)indices.data)[n * indices.stride];
    return ((const volatile int64_t *)indices.data)[n * indices.stride];
}

/* CPEFT_ERR_INTERNAL naming `op` unless index_dtype is int32 or int64. */
int cpeft_check_index_dtype_cpu(cpeft_dtype index_dtype, const char *op, cpeft_status *st);

/* CPEFT_ERR_INDEX for indices[position] = value outside [0, rows). */
int cpeft_index_error(int64_t position, int64_t value, int64_t rows, cpeft_status *st);

/* The transpose of m as a view (rows and strides swapped); nothing moves. */
cpeft_mat cpeft_mat_transpose(cpeft_mat m);

/*
 * Gather and scatter check every index where they use it (an index outside the table gives
 * CPEFT_ERR_INDEX, and the rows before it are already written): the boundary scanned the indices
 * before the call, but with the GIL released another thread may rewrite them, and a value read
 * twice may differ. A check per row costs one compare against a row copy of `cols` elements.
 */

/* dst[n][:] = src[idx[n]][:] (⊙ l when l.data != NULL); src is num_embeddings x cols. A column
 * gather (dst[n][r] = src[r][idx[n]]) is this on cpeft_mat_transpose(src). */
int cpeft_gather_rows_cpu(cpeft_dtype dtype, cpeft_dtype index_dtype, cpeft_vec indices,
                          cpeft_mat src, cpeft_vec l, cpeft_mat dst, cpeft_status *st);

/* dst[idx[n]][:] += src[n][:] (⊙ l when l.data != NULL), skipping n with idx[n] == padding_idx
 * (-1: none). dst is not cleared first. */
int cpeft_scatter_add_rows_cpu(cpeft_dtype dtype, cpeft_dtype index_dtype, cpeft_vec indices,
                               int64_t padding_idx, cpeft_mat src, cpeft_vec l, cpeft_mat dst,
                               cpeft_status *st);

/*
 * Checks the grouping of a LoRA linear (defined in lora_linear.c, shared with merge.c):
 * 1 <= groups <= CPEFT_MAX_GROUPS dividing OUT, and lora_a / lora_b sized for the K enabled
 * blocks. Sets *seg = OUT / groups and *enabled_count = K.
 */
int cpeft_lora_groups_cpu(const cpeft_lora_linear_args *a, int64_t *seg, int64_t *enabled_count,
                          cpeft_status *st);

#endif /* CPEFT_CPU_BLAS_H */
