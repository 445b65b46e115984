/*
 * Views of acquired tensors for the compute layer (cpeft_mat, cpeft_vec in cpeft/core.h). A CPU
 * input without a usable view is copied into a compact buffer the tensor owns; outputs, in-place
 * targets and CUDA inputs without one are refused with ValueError naming the argument.
 */
#ifndef CPEFT_PY_VIEWS_H
#define CPEFT_PY_VIEWS_H

#include "tensor.h"

/*
 * The 2-D view of t with every leading dim flattened into rows (a 1-D tensor is one row), rows and
 * columns swapped when `transpose`, BLAS-able with a 32-bit leading dimension.
 */
int cpeft_tensor_mat(cpeft_tensor *t, int transpose, cpeft_mat *mat);
/* All of t as one vector with a positive stride. */
int cpeft_tensor_vec(cpeft_tensor *t, cpeft_vec *vec);
/* All of t as one unit-stride run (merge records, whose compute side takes bare pointers). */
int cpeft_tensor_contiguous(cpeft_tensor *t, void **data);

#endif /* CPEFT_PY_VIEWS_H */
