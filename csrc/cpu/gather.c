/* Row gathers and scatters by embedding index for the CPU compute layer (see gather.h). */
#include "gather.h"

#include "cpeft/typed.h"

#define T float
#define SUFFIX f32
#include "gather_loops.inc"
#undef T
#undef SUFFIX

#define T double
#define SUFFIX f64
#include "gather_loops.inc"
#undef T
#undef SUFFIX

int cpeft_check_indices_cpu(cpeft_dtype index_dtype, cpeft_vec indices, int64_t rows,
                            const char *op, cpeft_status *st)
{
    if (index_dtype != CPEFT_INT32 && index_dtype != CPEFT_INT64)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "%s: indices must be int32 or int64, got dtype code %d", op,
                          (int)index_dtype);
    for (int64_t n = 0; n < indices.len; ++n) {
        int64_t v = cpeft_index_at(index_dtype, indices, n);
        if (v < 0 || v >= rows)
            return cpeft_fail(st, CPEFT_ERR_INDEX,
                              "indices must hold values in [0, %lld) (num_embeddings), got %lld at "
                              "flat position %lld",
                              (long long)rows, (long long)v, (long long)n);
    }
    return CPEFT_OK;
}

int cpeft_index_error(int64_t position, int64_t value, int64_t rows, cpeft_status *st)
{
    return cpeft_fail(st, CPEFT_ERR_INDEX,
                      "indices[%lld] = %lld is out of range for an embedding of %lld rows (if "
                      "the call's own check passed, the array was changed during the call)",
                      (long long)position, (long long)value, (long long)rows);
}

int cpeft_gather_rows_cpu(cpeft_dtype dtype, cpeft_dtype index_dtype, cpeft_vec indices,
                          cpeft_mat src, cpeft_vec l, cpeft_mat dst, cpeft_status *st)
{
    int64_t bad = 0;
    int64_t at = dtype == CPEFT_FLOAT32 ? gather_rows_f32(index_dtype, indices, src, l, dst, &bad)
                                        : gather_rows_f64(index_dtype, indices, src, l, dst, &bad);
    return at < 0 ? CPEFT_OK : cpeft_index_error(at, bad, src.rows, st);
}

int cpeft_scatter_add_rows_cpu(cpeft_dtype dtype, cpeft_dtype index_dtype, cpeft_vec indices,
                               int64_t padding_idx, cpeft_mat src, cpeft_vec l, cpeft_mat dst,
                               cpeft_status *st)
{
    int64_t bad = 0;
    int64_t at = dtype == CPEFT_FLOAT32
                     ? scatter_add_rows_f32(index_dtype, indices, padding_idx, src, l, dst, &bad)
                     : scatter_add_rows_f64(index_dtype, indices, padding_idx, src, l, dst, &bad);
    return at < 0 ? CPEFT_OK : cpeft_index_error(at, bad, dst.rows, st);
}
