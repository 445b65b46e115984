/*
 * The C boundary of cpeft (csrc/py/): the only C code that sees Python objects. It parses
 * arguments, imports tensors (tensor.h), validates everything once, releases the GIL around the
 * compute functions declared in csrc/include/cpeft/, and turns their cpeft_status into exceptions.
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


/* Per-module state (multi-phase init): traversed and cleared by the module's GC hooks. */
struct cpeft_call;

typedef struct {
    PyObject *CudaError;   /* cpeft.CudaError, a RuntimeError subclass */
    /* Calls in flight that hold an in-place target (merges), linked through the calls
     * themselves; only touched with the GIL held. See cpeft_call_input in tensor.c. */
    struct cpeft_call *inplace_calls;
} cpeft_state;

cpeft_state *cpeft_get_state(PyObject *module);

/* ---- errors.c ------------------------------------------------------------------------------- */

/* Raise the exception matching st->code (see cpeft_code in core.h); always returns -1. */
int cpeft_raise_status(const cpeft_state *state, const cpeft_status *st);
/* Replace the pending exception with `type`(formatted message + ": " + str(original)), chaining
 * the original as __cause__. Used where a producer's own error needs the argument's name. */
void cpeft_reraise_with_context(PyObject *type, const char *fmt, ...);

/* ---- args.c: scalar arguments, each message naming the argument ----------------------------- */

int cpeft_parse_stream(PyObject *obj, uintptr_t *stream);
/* A real number (float, int, NumPy scalar); obj NULL leaves *value as it is. */
int cpeft_parse_real(PyObject *obj, const char *name, double *value);
int cpeft_check_finite(double value, const char *name);
int cpeft_check_probability(double p, const char *name);
int cpeft_parse_u64(PyObject *obj, const char *name, uint64_t *value);
/* dropout p in [0, 1], seed and offset ints >= 0 (NULL: 0). */
int cpeft_parse_dropout(PyObject *p_obj, PyObject *seed, PyObject *offset, cpeft_dropout *d);
/* Any integer through __index__ (never a float) in the int64 range; `expected` completes
 * "name must be ..." in messages. */
int cpeft_parse_i64(PyObject *obj, const char *name, const char *expected, int64_t *value);

/* enable_lora: None (one group, enabled) or a sequence of at most CPEFT_MAX_GROUPS truthy/falsy
 * items, at least one enabled. Parsed before any tensor is acquired (an item's __bool__ is Python
 * code); that the groups divide out_features is checked once the weight is known. */
typedef struct {
    int64_t groups;
    int64_t enabled_count;
    uint8_t enabled[CPEFT_MAX_GROUPS];
} cpeft_groups;
int cpeft_parse_groups(PyObject *obj, cpeft_groups *groups);
int cpeft_check_groups(const cpeft_groups *groups, int64_t out_features);
/* padding_idx: None (given = 0, -1) or an integer; its range [-V, V) is checked, and a negative
 * value normalized to [0, V), by cpeft_check_padding_idx once V is known. */
int cpeft_parse_padding_idx(PyObject *obj, int64_t *padding_idx, int *given);
int cpeft_check_padding_idx(int64_t *padding_idx, int given, int64_t num_embeddings);

/* ---- device.c: the CUDA device of a call is made current for its compute, then restored ------ */

int cpeft_device_enter(int device_id, int *previous, cpeft_status *st);
void cpeft_device_leave(int previous);
int cpeft_cuda_device_count(void);

/*
 * Run the CPU or CUDA twin of a compute function without the GIL and store its status code in rc.
 * The CUDA branch makes the tensors' device current and restores the caller's afterwards.
 */
#define CPEFT_DISPATCH(call, rc, cpu_expr, cuda_expr)                                   \
    do {                                                                               \
        cpeft_call_gc_resume(call);                                                    \
        Py_BEGIN_ALLOW_THREADS                                                         \
        if (cpeft_call_on_cuda(call)) {                                                \
            int previous_device_;                                                      \
            (rc) = cpeft_device_enter((call)->device_id, &previous_device_,            \
                                      &(call)->status);                                \
            if ((rc) == CPEFT_OK) {                                                    \
                (rc) = (cuda_expr);                                                    \
                cpeft_device_leave(previous_device_);                                  \
            }                                                                          \
        }                                                                              \
        else {                                                                         \
            (rc) = (cpu_expr);                                                         \
        }                                                                              \
        Py_END_ALLOW_THREADS                                                           \
        cpeft_call_gc_pause(call);                                                     \
    } while (0)

/* ---- entry points (module.c's method table) ------------------------------------------------- */

PyObject *cpeft_py_lora_linear_forward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_lora_linear_backward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_lora_embedding_forward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_lora_embedding_backward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_ia3_linear_forward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_ia3_linear_backward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_ia3_embedding_forward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_ia3_embedding_backward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_lora_merge(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_lora_unmerge(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_lora_embedding_merge(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_lora_embedding_unmerge(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_ia3_merge(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_ia3_unmerge(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_ia3_embedding_merge(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_ia3_embedding_unmerge(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_dropout_mask(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_dora_weight_sq_norm(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_dora_weight_norm(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_dora_linear_forward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_dora_linear_backward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_dora_embedding_forward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_dora_embedding_backward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_lora_grouped_forward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_lora_grouped_backward(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *cpeft_py_cuda_reserve_workspace(PyObject *module, PyObject *args, PyObject *kwargs);

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
