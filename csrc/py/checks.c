/* Argument checks on acquired tensors (checks.h). */
#include "checks.h"

#include "dtypes.h"

void cpeft_format_shape(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int i = 0; i < ndim && used < size; ++i) {
        used += (size_t)snprintf(buf + used, size - used, "%s%lld", i ? ", " : "",
                                 (long long)shape[i]);
    }
    if (used < size) {
        snprintf(buf + used, size - used, ndim == 1 ? ",)" : ")");
    }
}

int cpeft_check_float_dtype(const cpeft_tensor *t, const cpeft_tensor *like)
{
    int dt = t->dtype;
    int on_cuda = t->device_type == CPEFT_DEVICE_CUDA;
    if (!cpeft_float_dtype_supported(dt, on_cuda)) {
        char expected[64];
        cpeft_format_float_dtypes(expected, sizeof expected, on_cuda);
        PyErr_Format(PyExc_ValueError, "%s must have dtype %s on the %s, got %s", t->name, expected,
                     on_cuda ? "GPU" : "CPU", t->dtype_name);
        return -1;
    }
    if (like != NULL && like->dtype != dt) {
        PyErr_Format(PyExc_ValueError, "%s must have the same dtype as %s (%s), got %s", t->name,
                     like->name, like->dtype_name, t->dtype_name);
        return -1;
    }
    return 0;
}

int cpeft_check_index_dtype(const cpeft_tensor *t)
{
    if (t->dtype != CPEFT_INT32 && t->dtype != CPEFT_INT64) {
        PyErr_Format(PyExc_ValueError, "%s must have dtype int32 or int64, got %s", t->name,
                     t->dtype_name);
        return -1;
    }
    return 0;
}

int cpeft_check_ndim(const cpeft_tensor *t, int ndim)
{
    if (t->ndim != ndim) {
        char got[256];
        cpeft_format_shape(got, sizeof got, t->ndim, t->shape);
        PyErr_Format(PyExc_ValueError, "%s must be %d-dimensional, got shape %s", t->name, ndim,
                     got);
        return -1;
    }
    return 0;
}

int cpeft_check_min_ndim(const cpeft_tensor *t, int ndim)
{
    if (t->ndim < ndim) {
        char got[256];
        cpeft_format_shape(got, sizeof got, t->ndim, t->shape);
        PyErr_Format(PyExc_ValueError, "%s must have at least %d dimension%s, got shape %s",
                     t->name, ndim, ndim == 1 ? "" : "s", got);
        return -1;
    }
    return 0;
}

int cpeft_check_shape(const cpeft_tensor *t, int ndim, const int64_t *shape, const char *meaning)
{
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; ++i)
        same = t->shape[i] == shape[i];
    if (!same) {
        char want[256], got[256];
        cpeft_format_shape(want, sizeof want, ndim, shape);
        cpeft_format_shape(got, sizeof got, t->ndim, t->shape);
        if (meaning != NULL) {
            PyErr_Format(PyExc_ValueError, "%s must have shape %s = %s, got %s", t->name, want,
                         meaning, got);
        } else {
            PyErr_Format(PyExc_ValueError, "%s must have shape %s, got %s", t->name, want, got);
        }
        return -1;
    }
    return 0;
}
