/*
 * Row gathers and scatters by embedding index for the CPU ops, and the index checks they share.
 * CPU-internal; functions returning int return CPEFT_OK or a cpeft_code with st->message set.
 *
 * Gather and scatter check every index where they use it (an index outside the table gives
 * CPEFT_ERR_INDEX, and the rows before it are already written): the op scanned the indices before
 * its first write (cpeft_check_indices_cpu), but with the GIL released another thread may
 * rewrite them, and a value read twice may differ. A check per row costs one compare against a row
 * copy of `cols` elements.
 */
#ifndef CPEFT_CPU_GATHER_H
#define CPEFT_CPU_GATHER_H

#include "cpeft/core.h"

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

/* Before an op's first write: CPEFT_ERR_INTERNAL naming `op` unless index_dtype is int32 or
 * int64, CPEFT_ERR_INDEX unless every index is in [0, rows). The one scan of the indices; a
 * refused call has written nothing. */
int cpeft_check_indices_cpu(cpeft_dtype index_dtype, cpeft_vec indices, int64_t rows,
                            const char *op, cpeft_status *st);

/* CPEFT_ERR_INDEX for indices[position] = value outside [0, rows). */
int cpeft_index_error(int64_t position, int64_t value, int64_t rows, cpeft_status *st);

/* dst[n][:] = src[idx[n]][:] (⊙ l when l.data != NULL); src is num_embeddings x cols. A column
 * gather (dst[n][r] = src[r][idx[n]]) is this on cpeft_mat_transpose(src). */
int cpeft_gather_rows_cpu(cpeft_dtype dtype, cpeft_dtype index_dtype, cpeft_vec indices,
                          cpeft_mat src, cpeft_vec l, cpeft_mat dst, cpeft_status *st);

/* dst[idx[n]][:] += src[n][:] (⊙ l when l.data != NULL), skipping n with idx[n] == padding_idx
 * (-1: none). dst is not cleared first. */
int cpeft_scatter_add_rows_cpu(cpeft_dtype dtype, cpeft_dtype index_dtype, cpeft_vec indices,
                               int64_t padding_idx, cpeft_mat src, cpeft_vec l, cpeft_mat dst,
                               cpeft_status *st);

#endif /* CPEFT_CPU_GATHER_H */
