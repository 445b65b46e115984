/*
 * What every public CPU op starts with: the dtype check that opens it, and its temporaries (malloc
 * with a clear error, row chunks of bounded size). CPU-internal; nothing here sees Python.
 * Functions returning int return CPEFT_OK or a cpeft_code with st->message set.
 */
#ifndef CPEFT_CPU_OP_SETUP_H
#define CPEFT_CPU_OP_SETUP_H

#include "cpeft/core.h"

/* Temporaries that scale with M (dropout rows, scaled activation rows) are cut into row chunks
 * of about this many bytes, so their size is bounded whatever the batch. */
#define CPEFT_CHUNK_BYTES ((int64_t)2 << 20)

/* Rows per chunk for a temporary of `cols` elements per row, at least 1. */
int64_t cpeft_chunk_rows(cpeft_dtype dtype, int64_t cols);

/* malloc of count elements of dtype; NULL and CPEFT_ERR_NOMEM naming `what` on failure. */
void *cpeft_alloc_temp(cpeft_dtype dtype, int64_t count, const char *what, cpeft_status *st);

/* Start of every public CPU op: clears st, then CPEFT_ERR_INTERNAL naming `op` unless dtype is
 * float32 or float64 (the only CPU dtypes). */
int cpeft_op_begin(cpeft_dtype dtype, const char *op, cpeft_status *st);

#endif /* CPEFT_CPU_OP_SETUP_H */
