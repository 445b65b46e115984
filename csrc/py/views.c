/* Views of acquired tensors for the compute layer (views.h). */
#include "views.h"

#include "cpeft/views.h"

#include <string.h>

#include "checks.h"

/* Collapse dims [first, last) into one evenly spaced run: its size and stride, or 0 when the
 * elements are not evenly spaced. Size-1 dims carry no stride information (producers export
 * anything there), so they are skipped; *stride_free says the run has at most one element. */
static int collapse_dims(const cpeft_tensor *t, int first, int last, int64_t *size, int64_t *stride,
                         int *stride_free)
{
    int64_t n = 1;
    for (int i = first; i < last; ++i)
        n *= t->shape[i];
    *size = n;
    *stride = 1;
    *stride_free = n <= 1;
    if (n <= 1)
        return 1;
    int64_t expected = 0;
    int have_inner = 0;
    for (int i = last - 1; i >= first; --i) {
        if (t->shape[i] == 1)
            continue;
        if (have_inner && t->strides[i] != expected)
            return 0;
        if (!have_inner)
            *stride = t->strides[i];
        have_inner = 1;
        expected = t->strides[i] * t->shape[i];
    }
    return 1;
}

/* Copy t's elements into a compact row-major PyMem_Raw buffer that replaces its data. */
static int make_compact_copy(cpeft_tensor *t)
{
    int64_t total = cpeft_numel(t);
    size_t bytes = (size_t)(total > 0 ? total : 1) * t->itemsize;
    char *dst = (uint64_t)total <= PY_SSIZE_T_MAX / t->itemsize ? PyMem_RawMalloc(bytes) : NULL;
    if (dst == NULL) {
        char shape[256];
        cpeft_format_shape(shape, sizeof shape, t->ndim, t->shape);
        PyErr_Format(PyExc_MemoryError,
                     "%s has no layout the compute can use as it is (strides, alignment or a "
                     "leading dimension beyond 32 bits), and its compact copy of shape %s "
                     "(%lld elements of %zu bytes) could not be allocated",
                     t->name, shape, (long long)total, t->itemsize);
        return -1;
    }
    int64_t index[CPEFT_MAX_NDIM] = {0};
    const char *src = t->data;
    for (int64_t e = 0; e < total; ++e) {
        memcpy(dst + (size_t)e * t->itemsize, src, t->itemsize);
        for (int d = t->ndim - 1; d >= 0; --d) {
            src += t->strides[d] * (int64_t)t->itemsize;
            if (++index[d] < t->shape[d])
                break;
            src -= t->shape[d] * t->strides[d] * (int64_t)t->itemsize;
            index[d] = 0;
        }
    }
    int64_t stride = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
        t->strides[d] = stride;
        stride *= t->shape[d];
    }
    t->compact_copy = dst;
    t->data = dst;
    return 0;
}

static int copy_or_reject(cpeft_tensor *t, const char *layout)
{
    if (t->role == CPEFT_ROLE_INPUT && t->device_type != CPEFT_DEVICE_CUDA) {
        if (make_compact_copy(t) < 0)
            return -1;
        t->misaligned = 0;   /* PyMem_RawMalloc aligns for every dtype */
        return 0;
    }
    if (t->misaligned) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be aligned to its itemsize (%zu bytes); CUDA inputs are never "
                     "copied, pass an aligned tensor",
                     t->name, t->itemsize);
        return -1;
    }
    char strides[256];
    cpeft_format_shape(strides, sizeof strides, t->ndim, t->strides);
    PyErr_Format(PyExc_ValueError,
                 "%s must have a %s (unit stride along one axis, the other at least the extent "
                 "of the first), got strides %s (in elements)%s",
                 t->name, layout, strides,
                 t->role == CPEFT_ROLE_INPUT ? "; CUDA inputs are never copied, make it "
                                               "contiguous first"
                                             : "");
    return -1;
}

int cpeft_tensor_mat(cpeft_tensor *t, int transpose, cpeft_mat *mat)
{
    for (int attempt = 0; attempt < 2; ++attempt) {
        int64_t rows, cols, rs, cs;
        int rs_free, cs_free, ok;
        if (t->ndim == 0) {
            rows = cols = 1;
            rs = cs = 1;
            rs_free = cs_free = 1;
            ok = 1;
        } else {
            ok = collapse_dims(t, 0, t->ndim - 1, &rows, &rs, &rs_free);
            cols = t->shape[t->ndim - 1];
            cs = t->strides[t->ndim - 1];
            cs_free = cols <= 1;
        }
        cpeft_mat m;
        if (ok && !t->misaligned &&
            (transpose ? cpeft_mat_blas_layout(cols, rows, cs, cs_free, rs, rs_free, &m)
                       : cpeft_mat_blas_layout(rows, cols, rs, rs_free, cs, cs_free, &m))) {
            /* BLAS takes 32-bit leading dimensions; the GEMM wrapper blocks sizes beyond that,
             * but a leading dimension is the memory's own. */
            int64_t ld = cpeft_mat_leading_dim(m);
            if (ld <= INT32_MAX) {
                m.data = t->data;
                *mat = m;
                return 0;
            }
            if (attempt == 1) {
                PyErr_Format(PyExc_ValueError,
                             "%s has %lld elements per row, beyond the 32-bit BLAS range of "
                             "leading dimensions",
                             t->name, (long long)ld);
                return -1;
            }
        }
        if (attempt == 0 &&
            copy_or_reject(t, "BLAS-able 2-D view with a 32-bit leading dimension and an "
                              "address aligned to its itemsize") < 0) {
            return -1;
        }
    }
    PyErr_Format(PyExc_SystemError, "cpeft: %s has no BLAS-able view after a compact copy",
                 t->name);
    return -1;
}

int cpeft_tensor_vec(cpeft_tensor *t, cpeft_vec *vec)
{
    for (int attempt = 0; attempt < 2; ++attempt) {
        int64_t len, stride;
        int stride_free;
        /* A vector may meet BLAS as a 1 x len matrix (column sums), whose leading dimension is
         * its stride: 32 bits like every BLAS integer. */
        if (!t->misaligned && collapse_dims(t, 0, t->ndim, &len, &stride, &stride_free) &&
            (stride_free || (stride >= 1 && stride <= INT32_MAX))) {
            vec->data = t->data;
            vec->len = len;
            vec->stride = stride_free ? 1 : stride;
            return 0;
        }
        if (attempt == 0 && copy_or_reject(t, "positive, uniform stride below 2**31 and an aligned "
                                              "address") < 0) {
            return -1;
        }
    }
    PyErr_Format(PyExc_SystemError, "cpeft: %s has no vector view after a compact copy", t->name);
    return -1;
}

int cpeft_tensor_contiguous(cpeft_tensor *t, void **data)
{
    cpeft_vec v;
    if (cpeft_tensor_vec(t, &v) < 0)
        return -1;
    if (v.stride != 1) {
        if (copy_or_reject(t, "contiguous layout") < 0)
            return -1;
        if (cpeft_tensor_vec(t, &v) < 0)
            return -1;
    }
    *data = v.data;
    return 0;
}
