/* Elementwise loops over strided views for the CPU compute layer (see strided.h). */
#include "strided.h"

#include "cpeft/typed.h"
#include "cpeft/views.h"

#define T float
#define SUFFIX f32
#include "strided_loops.inc"
#undef T
#undef SUFFIX

#define T double
#define SUFFIX f64
#include "strided_loops.inc"
#undef T
#undef SUFFIX

/* Loops run the contiguous dimension innermost; a column-major view is handled through its
 * transpose, which is row-major. */
static int is_column_major(cpeft_mat m)
{
    return m.rows > 1 && m.row_stride == 1 && m.col_stride != 1;
}

void cpeft_fill_zero_cpu(cpeft_dtype dtype, cpeft_mat m)
{
    if (is_column_major(m))
        m = cpeft_mat_transpose(m);
    if (dtype == CPEFT_FLOAT32)
        fill_zero_f32(m);
    else
        fill_zero_f64(m);
}

void cpeft_fill_rows_cpu(cpeft_dtype dtype, cpeft_mat m, cpeft_vec v)
{
    if (dtype == CPEFT_FLOAT32)
        fill_rows_f32(m, v);
    else
        fill_rows_f64(m, v);
}

void cpeft_scaled_copy_cpu(cpeft_dtype dtype, cpeft_mat src, cpeft_vec l, int along_cols,
                           cpeft_mat dst)
{
    if (is_column_major(src) && is_column_major(dst)) {
        src = cpeft_mat_transpose(src);
        dst = cpeft_mat_transpose(dst);
        along_cols = !along_cols;
    }
    if (dtype == CPEFT_FLOAT32)
        scaled_copy_f32(src, l, along_cols, dst);
    else
        scaled_copy_f64(src, l, along_cols, dst);
}

void cpeft_scale_mat_cpu(cpeft_dtype dtype, cpeft_mat m, cpeft_vec l, int along_cols)
{
    cpeft_scaled_copy_cpu(dtype, m, l, along_cols, m);
}

void cpeft_scale_vec_cpu(cpeft_dtype dtype, cpeft_vec v, cpeft_vec l)
{
    if (dtype == CPEFT_FLOAT32)
        scale_vec_f32(v, l);
    else
        scale_vec_f64(v, l);
}
