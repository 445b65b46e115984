/*
 * Tensor import at the boundary: one call's tensors, acquired from NumPy arrays (NumPy C API) or
 * DLPack producers (torch, CuPy, JAX, raw capsules), checked, viewed as cpeft_mat / cpeft_vec for
 * the compute layer, and released on one exit path.
 *
 * Ownership: a cpeft_call owns every tensor it acquired. An ndarray tensor holds a strong reference
 * to the array; a DLPack tensor holds the consumed capsule (renamed used_*) and calls the producer's
 * deleter exactly once in cpeft_call_release. Input copies made to get a BLAS-able view are
 * PyMem_Raw buffers owned by the tensor. Every entry point ends with cpeft_call_release, on success
 * and on every error path.
 */
#ifndef CPEFT_PY_TENSOR_H
#define CPEFT_PY_TENSOR_H

#include "boundary.h"

#define CPEFT_MAX_NDIM 32
#define CPEFT_MAX_CALL_TENSORS 16

typedef enum {
    CPEFT_DEVICE_CPU = 1,
    CPEFT_DEVICE_CUDA = 2,
} cpeft_device_type;

typedef enum {
    CPEFT_ROLE_INPUT,    /* read only; copied into a compact temporary if no BLAS-able view */
    CPEFT_ROLE_OUTPUT,   /* written in full; must be writeable, BLAS-able, alias nothing */
    CPEFT_ROLE_INPLACE,  /* read and written (merge target): writeable, BLAS-able, never copied */
} cpeft_role;

/* dtype is CPEFT_DTYPE_UNSUPPORTED for element types cpeft has no kernels for; dtype_name still
 * names them, so the dtype check can say what came. */
#define CPEFT_DTYPE_UNSUPPORTED (-1)

typedef struct {
    const char *name;            /* the argument name used in every message about this tensor */
    cpeft_role role;
    PyObject *source;            /* the object the caller passed (or the NumPy array we allocated) */
    PyObject *array;             /* ndarray holding the memory, or NULL */
    PyObject *capsule;           /* consumed DLPack capsule, or NULL */
    DLManagedTensor *managed;    /* exactly one of managed / managed_versioned is set for DLPack */
    DLManagedTensorVersioned *managed_versioned;
    int from_numpy;
    int readonly;
    int device_type;             /* cpeft_device_type */
    int device_id;
    int dtype;                   /* cpeft_dtype or CPEFT_DTYPE_UNSUPPORTED */
    char dtype_name[32];
    int ndim;
    int64_t shape[CPEFT_MAX_NDIM];
    int64_t strides[CPEFT_MAX_NDIM];   /* elements */
    char *data;                  /* first element (byte_offset applied) */
    size_t itemsize;
    char *extent_lo, *extent_hi; /* bytes the caller's memory spans; equal when empty */
    int misaligned;              /* data is not a multiple of the itemsize (e.g. buf[1:].view) */
    void *compact_copy;          /* PyMem_Raw buffer replacing data, or NULL */
} cpeft_tensor;

/* One tensor argument's DLPack export, made by cpeft_call_prepare before any data pointer is
 * taken; capsule is NULL for an object without __dlpack__ (acquire then raises TypeError). */
typedef struct {
    const char *name;
    PyObject *obj;
    PyObject *capsule;
} cpeft_prepared;

typedef struct cpeft_call {
    cpeft_state *state;
    void *stream;                /* cudaStream_t handle; (void *)1 is the legacy default stream */
    uintptr_t stream_value;      /* the same handle, as passed to __dlpack__(stream=...) */
    int count;
    int all_numpy;               /* every input and in-place target is a CPU ndarray */
    int device_type;             /* of the first tensor; all others must match */
    int device_id;
    const char *device_owner;    /* name of the first tensor, for messages */
    cpeft_tensor tensors[CPEFT_MAX_CALL_TENSORS];
    cpeft_status status;
    int prepared;                /* cpeft_call_prepare ran: acquisition runs no Python code */
    int gc_paused;               /* this call disabled the cyclic GC (see cpeft_call_prepare) */
    int prepared_count;
    cpeft_prepared exports[CPEFT_MAX_CALL_TENSORS];
    struct cpeft_call *next_inplace;   /* link in state->inplace_calls while registered */
    int inplace_registered;
} cpeft_call;

/* stream_obj: None or an int >= 0 (0 and None both mean the legacy default stream). */
int cpeft_call_init(cpeft_call *call, PyObject *module, PyObject *stream_obj);
void cpeft_call_release(cpeft_call *call);

/*
 * The last step at which Python code may run in a call. Every entry point converts its scalar
 * arguments first, then calls this with every tensor argument (names as later passed to
 * cpeft_call_input / cpeft_call_output; NULL, None, True and False entries are skipped). It calls
 * __dlpack_device__ / __dlpack__ of every object that is neither an ndarray nor a capsule, then
 * pauses the cyclic GC (whose finalizers are Python code) while this thread holds the GIL inside
 * the call. From here on data pointers are taken, and nothing but the compute runs before the
 * call ends: no callback can free or resize a buffer between the check and the use.
 */
int cpeft_call_prepare(cpeft_call *call, PyObject *const *objs, const char *const *names, int n);

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
int cpeft_call_output(cpeft_call *call, PyObject *obj, const char *name, int required,
                      int dtype, int ndim, const int64_t *shape, cpeft_tensor **out);

/* Outputs and in-place targets must not share memory with any other tensor of the call. */
int cpeft_call_check_aliasing(cpeft_call *call);

/* True when the call runs on a CUDA device. */
static inline int cpeft_call_on_cuda(const cpeft_call *call)
{
    return call->device_type == CPEFT_DEVICE_CUDA;
}

/* ---- checks: each raises with the argument's name, the expectation and what came ---------- */

/* A float dtype the call's device supports; when `like` is given, the same dtype as `like`. */
int cpeft_check_float_dtype(const cpeft_call *call, const cpeft_tensor *t, const cpeft_tensor *like);
int cpeft_check_index_dtype(const cpeft_tensor *t);
int cpeft_check_ndim(const cpeft_tensor *t, int ndim);
int cpeft_check_min_ndim(const cpeft_tensor *t, int ndim);
/* Exact shape; `meaning` says where the expectation comes from, e.g. "(r*k, in_features)". */
int cpeft_check_shape(const cpeft_tensor *t, int ndim, const int64_t *shape, const char *meaning);

/* Number of elements of the leading dims (all but the last). */
int64_t cpeft_leading_numel(const cpeft_tensor *t);
int64_t cpeft_numel(const cpeft_tensor *t);

/* ---- views for the compute layer ------------------------------------------------------------ */

/*
 * The 2-D view of t with every leading dim flattened into rows (a 1-D tensor is one row), rows and
 * columns swapped when `transpose`. Inputs without a BLAS-able view are copied (CPU only);
 * outputs, in-place targets and CUDA inputs without one are rejected with ValueError.
 */
int cpeft_tensor_mat(cpeft_call *call, cpeft_tensor *t, int transpose, cpeft_mat *mat);
/* All of t as one vector with a positive stride (copied or rejected like cpeft_tensor_mat). */
int cpeft_tensor_vec(cpeft_call *call, cpeft_tensor *t, cpeft_vec *vec);
/* All of t as one unit-stride run (merge records, whose compute side takes bare pointers). */
int cpeft_tensor_contiguous(cpeft_call *call, cpeft_tensor *t, void **data);

/* CPU: every index in [0, num_embeddings), scanned before any compute (IndexError otherwise). */
int cpeft_check_indices_in_range(const cpeft_call *call, const cpeft_tensor *t, cpeft_vec indices,
                                 int64_t num_embeddings);

/* "float32", ... for a cpeft_dtype. */
const char *cpeft_dtype_name(int dtype);

/* "(2, 3)" / "(4,)" for messages. */
void cpeft_format_shape(char *buf, size_t size, int ndim, const int64_t *shape);

#endif /* CPEFT_PY_TENSOR_H */
