/*
 * Scalar arguments of the entry points. Each parser names the argument in its message, says what
 * it expected and shows what came, so a mistake reads the same from cpeft.functional and _C.
 */
#include "boundary.h"

#include <math.h>
#include <string.h>

int cpeft_parse_stream(PyObject *obj, uintptr_t *stream)
{
    /* The DLPack stream integer: 1 is the legacy default stream (cudaStreamLegacy); 0 is
     * ambiguous in the protocol, so 0 and None both map to 1. */
    if (obj == NULL || obj == Py_None) {
        *stream = 1;
        return 0;
    }
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "stream must be None or an int CUDA stream handle, got %.200s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "stream must be None or an int CUDA stream handle >= 0, "
                     "got %R", obj);
        return -1;
    }
    *stream = value == 0 ? 1 : (uintptr_t)value;
    return 0;
}

int cpeft_parse_real(PyObject *obj, const char *name, double *value)
{
    if (obj == NULL) {
        return 0;
    }
    /* Floats, ints and anything with __float__ / __index__ (NumPy scalars); never strings. */
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a real number, got %.200s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *value = v;
    return 0;
}

int cpeft_check_finite(double value, const char *name)
{
    if (!isfinite(value)) {
        PyObject *shown = PyFloat_FromDouble(value);
        PyErr_Format(PyExc_ValueError, "%s must be a finite number, got %R", name, shown);
        Py_XDECREF(shown);
        return -1;
    }
    return 0;
}

int cpeft_check_probability(double p, const char *name)
{
    if (!(p >= 0.0 && p <= 1.0)) {
        PyObject *shown = PyFloat_FromDouble(p);
        PyErr_Format(PyExc_ValueError, "%s must be a probability in [0, 1], got %R", name, shown);
        Py_XDECREF(shown);
        return -1;
    }
    return 0;
}

int cpeft_parse_u64(PyObject *obj, const char *name, uint64_t *value)
{
    if (obj == NULL) {
        *value = 0;
        return 0;
    }
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int >= 0, got %.200s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be an int in [0, 2**64), got %R", name, obj);
        return -1;
    }
    *value = (uint64_t)v;
    return 0;
}

int cpeft_parse_groups(PyObject *obj, int64_t out_features, int64_t *groups, uint8_t *enabled,
                       int64_t *enabled_count)
{
    memset(enabled, 0, CPEFT_MAX_GROUPS);
    if (obj == NULL || obj == Py_None) {
        *groups = 1;
        enabled[0] = 1;
        *enabled_count = 1;
        return 0;
    }
    PyObject *seq = PySequence_Fast(obj, "enable_lora must be None or a sequence of bools");
    if (seq == NULL) {
        return -1;
    }
    int rc = -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > CPEFT_MAX_GROUPS) {
        PyErr_Format(PyExc_ValueError, "enable_lora must have between 1 and %d entries, got %zd",
                     CPEFT_MAX_GROUPS, n);
        goto finish;
    }
    if (out_features % n != 0) {
        PyErr_Format(PyExc_ValueError,
                     "enable_lora has %zd groups, which must divide out_features %lld", n,
                     (long long)out_features);
        goto finish;
    }
    int64_t count = 0;
    for (Py_ssize_t g = 0; g < n; ++g) {
        int truth = PyObject_IsTrue(PySequence_Fast_GET_ITEM(seq, g));
        if (truth < 0) goto finish;
        enabled[g] = (uint8_t)truth;
        count += truth;
    }
    if (count == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "enable_lora must enable at least one group, got all False");
        goto finish;
    }
    *groups = n;
    *enabled_count = count;
    rc = 0;
finish:
    Py_DECREF(seq);
    return rc;
}

int cpeft_parse_padding_idx(PyObject *obj, int64_t num_embeddings, int64_t *padding_idx)
{
    if (obj == NULL || obj == Py_None) {
        *padding_idx = -1;
        return 0;
    }
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "padding_idx must be None or an int, got %.200s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || v < -num_embeddings || v >= num_embeddings) {
        PyErr_Format(PyExc_ValueError,
                     "padding_idx must be in [-num_embeddings, num_embeddings) = [%lld, %lld), "
                     "got %R",
                     -(long long)num_embeddings, (long long)num_embeddings, obj);
        return -1;
    }
    *padding_idx = v < 0 ? v + num_embeddings : v;
    return 0;
}
