/*
 * The C boundary of cpeft (csrc/py/): the only C code that sees Python objects. It parses
 * arguments, imports tensors, validates everything once, releases the GIL around the compute
 * functions declared in csrc/include/cpeft/, and turns their cpeft_status into exceptions.
 *
 * Files: this header (module state, errors.c, the entry points' declarations for module.c);
 * the infrastructure of a call, each part with its own header: tensor.h (the tensor record),
 * ndarray.{c,h} (NumPy import and allocation), dlpack_import.{c,h} (DLPack export, import and
 * release), device.{c,h} (one device per call, the current CUDA device around the compute),
 * checks.{c,h} (argument checks), views.{c,h} (matrix and vector views for the compute) and
 * call.{c,h} (the call lifecycle: begin, acquisition, dispatch, end), dtypes.{c,h} (the float
 * dtypes each device takes, also reported to Python); params.{c,h} (the argument parsers and
 * validators the entry points share, and the outputs of the LoRA linear ops, plain and grouped);
 * py_*.c (the entry points, each depending only on params.h and the infrastructure; py_workspace.c
 * reserves a CUDA stream's workspace).
 *
 * NumPy: one translation unit (module.c) defines CPEFT_MODULE_TU and runs import_array(); the
 * others share its API table through PY_ARRAY_UNIQUE_SYMBOL (set by setup.py together with
 * NPY_TARGET_VERSION, so a build against NumPy 2.x headers loads on NumPy >= 1.23).
 */
#ifndef CPEFT_PY_BOUNDARY_H
#define CPEFT_PY_BOUNDARY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef CPEFT_MODULE_TU
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "cpeft/core.h"
#include "cpeft/dropout.h"
#include "cpeft/ia3.h"
#include "cpeft/lora_embedding.h"
#include "cpeft/lora_grouped.h"
#include "cpeft/lora_linear.h"
#include "cpeft/merge.h"
#include "dlpack.h"

#define CPEFT_EXCHANGE_API_CACHE 8

/* Per-module state (multi-phase init): traversed and cleared by the module's GC hooks. */
struct cpeft_call;

typedef struct {
    PyObject *CudaError;   /* cpeft.CudaError, a RuntimeError subclass */
    /* Calls in flight that hold an in-place target (merges), linked through the calls
     * themselves; only touched with the GIL held. See register_inplace in call.c. */
    struct cpeft_call *inplace_calls;
    /* Tensor types seen by the boundary and the DLPack C exchange API each offers (NULL: none
     * usable), so an export costs no attribute lookup; filled round robin, a strong reference
     * to each type, valid while the type's version tag is the one recorded (assigning an
     * attribute to a type or a base clears it). See cpeft_dlpack_exchange_api. */
    struct {
        PyTypeObject *type;
        unsigned int version_tag;
        const DLPackExchangeAPI *api;
    } exchange_apis[CPEFT_EXCHANGE_API_CACHE];
    int exchange_apis_next;
} cpeft_state;

cpeft_state *cpeft_get_state(PyObject *module);

/* ---- errors.c ------------------------------------------------------------------------------- */

/* Raise the exception matching st->code (see cpeft_code in core.h); always returns -1. */
int cpeft_raise_status(const cpeft_state *state, const cpeft_status *st);
/* Replace the pending exception with `type`(formatted message + ": " + str(original)), chaining
 * the original as __cause__. Used where a producer's own error needs the argument's name. */
void cpeft_reraise_with_context(PyObject *type, const char *fmt, ...);

/* ---- entry points (module.c's method table) ------------------------------------------------- */

PyObject *cpeft_py_lora_linear_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames);
PyObject *cpeft_py_lora_linear_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames);
PyObject *cpeft_py_lora_embedding_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames);
PyObject *cpeft_py_lora_embedding_backward(PyObject *module, PyObject *const *args,
                                           Py_ssize_t nargs, PyObject *kwnames);
PyObject *cpeft_py_ia3_linear_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                      PyObject *kwnames);
PyObject *cpeft_py_ia3_linear_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames);
PyObject *cpeft_py_ia3_embedding_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames);
PyObject *cpeft_py_ia3_embedding_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames);
PyObject *cpeft_py_lora_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames);
PyObject *cpeft_py_lora_unmerge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames);
PyObject *cpeft_py_lora_embedding_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames);
PyObject *cpeft_py_lora_embedding_unmerge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames);
PyObject *cpeft_py_ia3_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames);
PyObject *cpeft_py_ia3_unmerge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames);
PyObject *cpeft_py_ia3_embedding_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames);
PyObject *cpeft_py_ia3_embedding_unmerge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames);
PyObject *cpeft_py_dropout_mask(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames);
PyObject *cpeft_py_dora_weight_sq_norm(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames);
PyObject *cpeft_py_dora_weight_norm(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames);
PyObject *cpeft_py_dora_linear_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames);
PyObject *cpeft_py_dora_linear_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames);
PyObject *cpeft_py_dora_embedding_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames);
PyObject *cpeft_py_dora_embedding_backward(PyObject *module, PyObject *const *args,
                                           Py_ssize_t nargs, PyObject *kwnames);
PyObject *cpeft_py_lora_grouped_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames);
PyObject *cpeft_py_lora_grouped_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames);
PyObject *cpeft_py_cuda_reserve_workspace(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames);

extern const char cpeft_doc_lora_linear_forward[];
extern const char cpeft_doc_lora_linear_backward[];
extern const char cpeft_doc_lora_embedding_forward[];
extern const char cpeft_doc_lora_embedding_backward[];
extern const char cpeft_doc_ia3_linear_forward[];
extern const char cpeft_doc_ia3_linear_backward[];
extern const char cpeft_doc_ia3_embedding_forward[];
extern const char cpeft_doc_ia3_embedding_backward[];
extern const char cpeft_doc_lora_merge[];
extern const char cpeft_doc_lora_unmerge[];
extern const char cpeft_doc_lora_embedding_merge[];
extern const char cpeft_doc_lora_embedding_unmerge[];
extern const char cpeft_doc_ia3_merge[];
extern const char cpeft_doc_ia3_unmerge[];
extern const char cpeft_doc_ia3_embedding_merge[];
extern const char cpeft_doc_ia3_embedding_unmerge[];
extern const char cpeft_doc_dropout_mask[];
extern const char cpeft_doc_dora_weight_sq_norm[];
extern const char cpeft_doc_dora_weight_norm[];
extern const char cpeft_doc_dora_linear_forward[];
extern const char cpeft_doc_dora_linear_backward[];
extern const char cpeft_doc_dora_embedding_forward[];
extern const char cpeft_doc_dora_embedding_backward[];
extern const char cpeft_doc_lora_grouped_forward[];
extern const char cpeft_doc_lora_grouped_backward[];
extern const char cpeft_doc_cuda_reserve_workspace[];

#endif /* CPEFT_PY_BOUNDARY_H */
