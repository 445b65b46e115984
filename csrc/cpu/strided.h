/*
 * Elementwise loops over strided views (cpeft_mat / cpeft_vec in elements, core.h) for the CPU
 * ops: fills and scalings. The contiguous dimension runs innermost. CPU-internal.
 */
#ifndef CPEFT_CPU_STRIDED_H
#define CPEFT_CPU_STRIDED_H

#include "cpeft/core.h"

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

#endif /* CPEFT_CPU_STRIDED_H */
