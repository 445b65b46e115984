/*
 * The float dtypes each device's kernels take: the one table that the boundary checks tensors
 * against and that cpeft._C.supported_dtypes() reports to Python.
 */
#ifndef CPEFT_PY_DTYPES_H
#define CPEFT_PY_DTYPES_H

#include "boundary.h"

/* Whether the kernels of the CPU (on_cuda 0) or of CUDA (on_cuda 1) take float dtype `dtype`. */
int cpeft_float_dtype_supported(int dtype, int on_cuda);

/* Whether float32 lora_a / lora_b may stand beside compute dtype `dtype` (float16, bfloat16) in the
 * ops that allow float32 adapters. */
int cpeft_takes_fp32_adapters(int dtype);

/* "float32 or float64", the device's dtypes as a message lists them. */
void cpeft_format_float_dtypes(char *buf, size_t size, int on_cuda);

extern const char cpeft_doc_supported_dtypes[];
PyObject *cpeft_py_supported_dtypes(PyObject *module, PyObject *unused);
/* cpeft._C.accumulation_dtypes(): cpeft_acc_dtype (cpeft/core.h) for every float dtype, by name. */
extern const char cpeft_doc_accumulation_dtypes[];
PyObject *cpeft_py_accumulation_dtypes(PyObject *module, PyObject *unused);
/* cpeft._C.fp32_adapter_compute_dtypes(): the dtypes cpeft_takes_fp32_adapters takes, by name. */
extern const char cpeft_doc_fp32_adapter_compute_dtypes[];
PyObject *cpeft_py_fp32_adapter_compute_dtypes(PyObject *module, PyObject *unused);

#endif /* CPEFT_PY_DTYPES_H */
