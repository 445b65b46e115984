/*
 * The dropout mask as data, for tests and for callers that want to see it: mask[i] = keep_scale
 * or 0 for element counter i of an M x IN input (see cpeft_dropout in core.h). The ops never
 * materialize it; they regenerate it where they need it.
 */
#ifndef CPEFT_DROPOUT_H
#define CPEFT_DROPOUT_H

#include "cpeft/core.h"

#ifdef __cplusplus
extern "C" {
#endif

int cpeft_dropout_mask_cpu(cpeft_dtype dtype, const cpeft_dropout *d, cpeft_mat mask,
                           cpeft_status *st);
int cpeft_dropout_mask_cuda(cpeft_dtype dtype, const cpeft_dropout *d, cpeft_mat mask, void *stream,
                            cpeft_status *st);

#ifdef __cplusplus
}
#endif
#endif /* CPEFT_DROPOUT_H */
