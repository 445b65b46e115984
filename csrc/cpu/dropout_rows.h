/* Dropout applied a row chunk at a time inside the CPU LoRA ops (defined in dropout.c).
 * CPU-internal. */
#ifndef CPEFT_CPU_DROPOUT_ROWS_H
#define CPEFT_CPU_DROPOUT_ROWS_H

#include "cpeft/core.h"

/*
 * Dropout applied to rows [row0, row0+src.rows) of a logical M x src.cols input: element (i, j)
 * uses counter (row0+i)*src.cols + j and factor keep ? 1/(1-p) : 0, multiplied (not selected) so
 * a NaN in src stays NaN as in torch.
 *   accumulate == 0:  dst  = alpha * factor * src
 *   accumulate != 0:  dst += alpha * factor * src
 */
void cpeft_dropout_rows_cpu(cpeft_dtype dtype, const cpeft_dropout *d, int64_t row0, double alpha,
                            cpeft_mat src, int accumulate, cpeft_mat dst);

#endif /* CPEFT_CPU_DROPOUT_ROWS_H */
