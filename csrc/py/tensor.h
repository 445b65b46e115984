/*
 * One tensor argument of a call as the boundary sees it, whatever it came from (an ndarray,
 * ndarray.h; a DLPack capsule or producer, dlpack_import.h): its name for messages, its role,
 * the memory it keeps alive, and its dtype, shape and strides in elements. Acquired and released
 * by the call (call.h), checked by checks.h, viewed for the compute layer by views.h.
 */
#ifndef CPEFT_PY_TENSOR_H
#define CPEFT_PY_TENSOR_H

#include "boundary.h"
#include "device.h"

#define CPEFT_MAX_NDIM 32

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
    PyObject *source; /* the object the caller passed (or the NumPy array we allocated) */
    PyObject *array; /* ndarray holding the memory, or NULL */
    PyObject *capsule; /* consumed DLPack capsule, or NULL */
    DLManagedTensor *managed; /* exactly one of managed / managed_versioned is set for DLPack */
    DLManagedTensorVersioned *managed_versioned;
    int from_numpy;
    int readonly;
    int device_type; /* cpeft_device_type */
    int device_id;
    int dtype; /* cpeft_dtype or CPEFT_DTYPE_UNSUPPORTED */
    const char *dtype_name; /* the dtype's name, supported or not (for messages) */
    char foreign_dtype[32]; /* the name of an unsupported dtype, which dtype_name points to */
    int ndim;
    char *data; /* first element (byte_offset applied) */
    size_t itemsize;
    char *extent_lo, *extent_hi; /* bytes the caller's memory spans; equal when empty */
    int misaligned; /* data is not a multiple of the itemsize (e.g. buf[1:].view) */
    void *compact_copy; /* PyMem_Raw buffer replacing data, or NULL */
    /* Last, so that acquisition clears only the fields above them (the importer fills these). */
    int64_t shape[CPEFT_MAX_NDIM];
    int64_t strides[CPEFT_MAX_NDIM]; /* elements */
} cpeft_tensor;

/* "float32", ... for a cpeft_dtype; "unsupported" for anything else. */
static inline const char *cpeft_dtype_name(int dtype)
{
    static const char *const names[] = {"float32",  "float64", "float16",
                                        "bfloat16", "int32",   "int64"};
    return dtype >= 0 && dtype < (int)(sizeof names / sizeof names[0]) ? names[dtype]
                                                                       : "unsupported";
}

/* Number of elements, of all dims and of the leading dims (all but the last). */
static inline int64_t cpeft_numel(const cpeft_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; ++i)
        n *= t->shape[i];
    return n;
}

static inline int64_t cpeft_leading_numel(const cpeft_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i + 1 < t->ndim; ++i)
        n *= t->shape[i];
    return n;
}

#endif /* CPEFT_PY_TENSOR_H */
