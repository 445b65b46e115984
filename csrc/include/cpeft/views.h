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

/* The BLAS-able description (strides, rows, cols; data left to the caller) of a rows x cols
 * run with strides rs and cs, or 0 where there is none. A stride marked free belongs to a
 * dimension of size 1 (or one merged away) and may take whatever value the layout needs. */
static inline int cpeft_mat_blas_layout(int64_t rows, int64_t cols, int64_t rs, int rs_free,
                                        int64_t cs, int cs_free, cpeft_mat *m)
{
    m->rows = rows;
    m->cols = cols;
    int64_t min_rs = cols > 1 ? cols : 1;
    int64_t min_cs = rows > 1 ? rows : 1;
    if (rows == 0 || cols == 0) {
        m->row_stride = min_rs;
        m->col_stride = 1;
        return 1;
    }
    if ((cs_free || cs == 1) && (rs_free || rs >= min_rs)) {
        m->col_stride = 1;
        m->row_stride = rs_free ? min_rs : rs;
        return 1;
    }
    if ((rs_free || rs == 1) && (cs_free || cs >= min_cs)) {
        m->row_stride = 1;
        m->col_stride = cs_free ? min_cs : cs;
        return 1;
    }
    return 0;
}

/* The leading dimension BLAS is given for a BLAS-able m (32 bits in the BLAS cpeft links). */
static inline int64_t cpeft_mat_leading_dim(cpeft_mat m)
{
    return m.col_stride == 1 ? m.row_stride : m.col_stride;
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
