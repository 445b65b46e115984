/*
 * Argument checks on acquired tensors. Each raises ValueError with the argument's name, what was
 * expected and what came, and returns -1; 0 when the tensor passes.
 */
#ifndef CPEFT_PY_CHECKS_H
#define CPEFT_PY_CHECKS_H

#include "tensor.h"

/* A float dtype t's device supports; when `like` is given, the same dtype as `like`. */
int cpeft_check_float_dtype(const cpeft_tensor *t, const cpeft_tensor *like);
int cpeft_check_index_dtype(const cpeft_tensor *t);
int cpeft_check_ndim(const cpeft_tensor *t, int ndim);
int cpeft_check_min_ndim(const cpeft_tensor *t, int ndim);
/* Exact shape; `meaning` says where the expectation comes from, e.g. "(r*k, in_features)". */
int cpeft_check_shape(const cpeft_tensor *t, int ndim, const int64_t *shape, const char *meaning);

/* "(2, 3)" / "(4,)" for messages. */
void cpeft_format_shape(char *buf, size_t size, int ndim, const int64_t *shape);

#endif /* CPEFT_PY_CHECKS_H */
