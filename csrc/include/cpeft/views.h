/*
 * Views of a cpeft_mat (core.h) shared by the CPU and CUDA compute code: blocks, transposes and
 * compact matrices over caller-owned memory, and the two BLAS-able storage orders. Nothing moves
 * and nothing is allocated; every helper only computes a new view.
 */
#ifndef CPEFT_VIEWS_H
#define CPEFT_VIEWS_H

#include "cpeft/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Element pointer of m at (i, j). */
static inline void *cpeft_mat_at(cpeft_dtype dtype, cpeft_mat m, int64_t i, int64_t j)
{
    return (char *)m.data +
           (i * m.row_stride + j * m.col_stride) * (int64_t)cpeft_dtype_size(dtype);
}

/* Rows [row0, row0+nrows) and columns [col0, col0+ncols) of m; strides unchanged. */
static inline cpeft_mat cpeft_mat_sub(cpeft_dtype dtype, cpeft_mat m, int64_t row0, int64_t nrows,
                                      int64_t col0, int64_t ncols)
{
    cpeft_mat sub = m;
    sub.data = cpeft_mat_at(dtype, m, row0, col0);
    sub.rows = nrows;
    sub.cols = ncols;
    return sub;
}

/* The transpose of m as a view (rows and strides swapped); nothing moves. */
static inline cpeft_mat cpeft_mat_transpose(cpeft_mat m)
{
    cpeft_mat t = {m.data, m.cols, m.rows, m.col_stride, m.row_stride};
    return t;
}

/* A compact row-major rows x cols view over caller-owned memory. */
static inline cpeft_mat cpeft_mat_compact(void *data, int64_t rows, int64_t cols)
{
    cpeft_mat m = {data, rows, cols, cols > 0 ? cols : 1, 1};
    return m;
}

/* Row-major with a legal leading dimension: col_stride == 1, row_stride >= max(1, cols). */
static inline int cpeft_mat_is_row_major(cpeft_mat m)
{
    return m.col_stride == 1 && m.row_stride >= (m.cols > 1 ? m.cols : 1);
}

/* Column-major with a legal leading dimension: row_stride == 1, col_stride >= max(1, rows). */
static inline int cpeft_mat_is_col_major(cpeft_mat m)
{
    return m.row_stride == 1 && m.col_stride >= (m.rows > 1 ? m.rows : 1);
}

/* A compact view of like's shape over data, column-major when like is, so that an elementwise
 * pass from like into it streams through both. */
static inline cpeft_mat cpeft_mat_compact_like(cpeft_mat like, void *data)
{
    if (like.row_stride == 1 && like.col_stride != 1)
        return cpeft_mat_transpose(cpeft_mat_compact(data, like.cols, like.rows));
    return cpeft_mat_compact(data, like.rows, like.cols);
}

#ifdef __cplusplus
}
#endif
#endif /* CPEFT_VIEWS_H */
