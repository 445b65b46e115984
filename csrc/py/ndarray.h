/*
 * NumPy arrays at the boundary, through the NumPy C API: importing an ndarray argument into a
 * cpeft_tensor (no copy, a strong reference kept), and allocating the NumPy outputs an entry point
 * returns when its caller passed only ndarrays.
 */
#ifndef CPEFT_PY_NDARRAY_H
#define CPEFT_PY_NDARRAY_H

#include "tensor.h"

/* Fill t (whose name is set) from arr: dtype, shape, strides in elements, data, writeability;
 * t->array holds a reference to arr. Returns -1 with an exception naming t on failure. */
int cpeft_ndarray_import(PyArrayObject *arr, cpeft_tensor *t);

/* A new C-contiguous, uninitialized ndarray of a cpeft dtype; `name` is the output's argument
 * name for the message when NumPy has no such dtype. */
PyObject *cpeft_ndarray_new(const char *name, int dtype, int ndim, const int64_t *shape);

#endif /* CPEFT_PY_NDARRAY_H */
