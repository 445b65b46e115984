/*
 * The life of one entry-point call: its tensors, acquired from NumPy arrays (ndarray.h) or DLPack
 * (dlpack_import.h), its device, stream and compute status, and one exit path that gives every
 * tensor back.
 *
 * Ownership: a cpeft_call owns every tensor it acquired. An ndarray tensor holds a strong reference
 * to the array; a DLPack tensor holds the consumed capsule (renamed used_*) and calls the
 * producer's deleter exactly once when the call ends. Input copies made to get a BLAS-able view are
 * PyMem_Raw buffers owned by the tensor.
 *
 * Every entry point has the same shape:
 *
 *     if (cpeft_call_begin(&call, module, stream) < 0) return NULL;
 *     convert the Python-level scalars (may run Python code), then cpeft_call_prepare;
 *     acquire and check tensors, take views; on any error goto finish;
 *     CPEFT_DISPATCH(&call, rc, cpu_expr, cuda_expr);   (raises on failure)
 *     if (rc == CPEFT_OK) ret = the result;
 * finish:
 *     return cpeft_call_end(&call, ret);
 */
#ifndef CPEFT_PY_CALL_H
#define CPEFT_PY_CALL_H

#include "tensor.h"

#define CPEFT_MAX_CALL_TENSORS 16

/* One tensor argument's DLPack export, made by cpeft_call_prepare before any data pointer is
 * taken: through its type's DLPack C exchange API (managed) or its __dlpack__ (capsule); both
 * NULL for an object with neither (acquire then raises TypeError). */
typedef struct {
    const char *name;
    PyObject *obj;
    DLManagedTensorVersioned *managed;
    PyObject *capsule;
} cpeft_prepared;

typedef struct cpeft_call {
    cpeft_state *state;
    void *stream;                /* cudaStream_t handle; (void *)1 is the legacy default stream */
    uintptr_t stream_value;      /* the same handle, as passed to __dlpack__(stream=...) */
    int count;
    int all_numpy;               /* every input and in-place target is a CPU ndarray */
    cpeft_device device;         /* of the first tensor; all others must match */
    cpeft_tensor tensors[CPEFT_MAX_CALL_TENSORS];
    cpeft_status status;
    int gc_paused;               /* this call disabled the cyclic GC (see cpeft_call_prepare) */
    int prepared_count;
    cpeft_prepared exports[CPEFT_MAX_CALL_TENSORS];
    struct cpeft_call *next_inplace;   /* link in state->inplace_calls while registered */
    int inplace_registered;
} cpeft_call;

/* The opening of every entry point. stream_obj: None or an int >= 0 (0 and None both mean the
 * legacy default stream). On failure nothing needs ending: return NULL. */
int cpeft_call_begin(cpeft_call *call, PyObject *module, PyObject *stream_obj);

/* stream: None (the legacy default stream) or an int cudaStream_t handle >= 0, as the DLPack
 * stream integer (0 becomes 1, cudaStreamLegacy). */
int cpeft_parse_stream(PyObject *obj, uintptr_t *stream);

/*
 * The last step at which Python code may run in a call. Every entry point converts its scalar
 * arguments first, then calls this with every tensor argument (names as later passed to
 * cpeft_call_input / cpeft_call_output; NULL, None, True and False entries are skipped). It
 * exports every object that is neither an ndarray nor a capsule, through its type's DLPack C
 * exchange API where it has one (torch; no Python call, no capsule) and through
 * __dlpack_device__ / __dlpack__ otherwise, then
 * pauses the cyclic GC (whose finalizers are Python code) while this thread holds the GIL inside
 * the call. From here on data pointers are taken, and nothing but the compute runs before the
 * call ends: no callback can free or resize a buffer between the check and the use.
 */
int cpeft_call_prepare(cpeft_call *call, PyObject *const *objs, const char *const *names, int n);

/* The closing of every entry point: gives every tensor back (producers' deleters run here) and
 * returns `result` (NULL when the call failed, its exception kept). */
PyObject *cpeft_call_end(cpeft_call *call, PyObject *result);

/* Around a GIL release: the GC runs normally while the compute runs, and is paused again when the
 * GIL comes back (the call may still allocate, e.g. merge records). */
void cpeft_call_gc_resume(cpeft_call *call);
void cpeft_call_gc_pause(cpeft_call *call);

/* Acquire obj as an input (or in-place target). Returns NULL with an exception set on failure. */
cpeft_tensor *cpeft_call_input(cpeft_call *call, PyObject *obj, const char *name, cpeft_role role);
/* Like cpeft_call_input, but None gives *out = NULL without an error (an optional input). */
int cpeft_call_optional_input(cpeft_call *call, PyObject *obj, const char *name,
                              cpeft_tensor **out);

/*
 * Resolve an output argument: an array is acquired and checked to have exactly `shape`, `dtype`
 * and the call's device; True allocates a C-contiguous NumPy array (only when every input is a
 * NumPy array); None and False mean "not requested" (*out = NULL) unless `required`, in which case
 * None also allocates. Returns 0 or -1 with an exception set.
 */
int cpeft_call_output(cpeft_call *call, PyObject *obj, const char *name, int required, int dtype,
                      int ndim, const int64_t *shape, cpeft_tensor **out);

/* Outputs and in-place targets must not share memory with any other tensor of the call. */
int cpeft_call_check_aliasing(cpeft_call *call);

/* True when the call runs on a CUDA device. */
static inline int cpeft_call_on_cuda(const cpeft_call *call)
{
    return call->device.type == CPEFT_DEVICE_CUDA;
}

/*
 * Run the CPU or CUDA twin of a compute function without the GIL and store its status code in rc;
 * a failure is raised as the matching exception (cpeft_raise_status). The CUDA branch makes the
 * tensors' device current and restores the caller's afterwards.
 */
#define CPEFT_DISPATCH(call, rc, cpu_expr, cuda_expr)                                         \
    do {                                                                                      \
        cpeft_call_gc_resume(call);                                                           \
        Py_BEGIN_ALLOW_THREADS if (cpeft_call_on_cuda(call))                                  \
        {                                                                                     \
            int previous_device_;                                                             \
            (rc) = cpeft_device_enter((call)->device.id, &previous_device_, &(call)->status); \
            if ((rc) == CPEFT_OK) {                                                           \
                (rc) = (cuda_expr);                                                           \
                cpeft_device_leave(previous_device_);                                         \
            }                                                                                 \
        }                                                                                     \
        else                                                                                  \
        {                                                                                     \
            (rc) = (cpu_expr);                                                                \
        }                                                                                     \
        Py_END_ALLOW_THREADS cpeft_call_gc_pause(call);                                       \
        if ((rc) != CPEFT_OK) {                                                               \
            cpeft_raise_status((call)->state, &(call)->status);                               \
        }                                                                                     \
    } while (0)

#endif /* CPEFT_PY_CALL_H */
