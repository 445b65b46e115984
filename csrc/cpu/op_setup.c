/* Op start and temporaries for the CPU compute layer (see op_setup.h). */
#include "op_setup.h"

#include <stdlib.h>

int64_t cpeft_chunk_rows(cpeft_dtype dtype, int64_t cols)
{
    int64_t row_bytes = (cols > 0 ? cols : 1) * (int64_t)cpeft_dtype_size(dtype);
    int64_t rows = CPEFT_CHUNK_BYTES / row_bytes;
    return rows > 0 ? rows : 1;
}

void *cpeft_alloc_temp(cpeft_dtype dtype, int64_t count, const char *what, cpeft_status *st)
{
    size_t bytes = (size_t)(count > 0 ? count : 1) * cpeft_dtype_size(dtype);
    void *p = malloc(bytes);
    if (p == NULL)
        cpeft_fail(st, CPEFT_ERR_NOMEM, "could not allocate the %s temporary (%zu bytes)", what,
                   bytes);
    return p;
}

int cpeft_op_begin(cpeft_dtype dtype, const char *op, cpeft_status *st)
{
    st->code = CPEFT_OK;
    st->message[0] = '\0';
    if (dtype == CPEFT_FLOAT32 || dtype == CPEFT_FLOAT64)
        return CPEFT_OK;
    return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                      "%s: CPU ops take float32 or float64 data, got dtype code %d", op,
                      (int)dtype);
}
