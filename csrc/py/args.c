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

/* An integer argument through __index__ (int, bool, NumPy integers, anything that is an integer
 * to Python), never a float: 2.7 as a count or seed is a mistake, not a request to truncate. */
static PyObject *as_index(PyObject *obj, const char *name, const char *expected)
{
    if (PyFloat_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be %s, got %.200s", name, expected,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return PyNumber_Index(obj);
}

int cpeft_parse_u64(PyObject *obj, const char *name, uint64_t *value)
{
    if (obj == NULL) {
        *value = 0;
        return 0;
    }
    PyObject *index = as_index(obj, name, "an int >= 0");
    if (index == NULL) {
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(index);
    Py_DECREF(index);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be an int in [0, 2**64), got %R", name, obj);
        return -1;
    }
    *value = (uint64_t)v;
    return 0;
}

int cpeft_parse_i64(PyObject *obj, const char *name, const char *expected, int64_t *value)
{
    PyObject *index = as_index(obj, name, expected);
    if (index == NULL) {
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "%s must be %s in the int64 range, got %R", name, expected,
                     obj);
        return -1;
    }
    *value = (int64_t)v;
    return 0;
}

int cpeft_parse_groups(PyObject *obj, cpeft_groups *g)
{
    memset(g->enabled, 0, CPEFT_MAX_GROUPS);
    if (obj == NULL || obj == Py_None) {
        g->groups = 1;
        g->enabled[0] = 1;
        g->enabled_count = 1;
        return 0;
    }
    /* A string is a sequence too, but of characters, each of them truthy: never flags. */
    if (PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "enable_lora must be None or a sequence of bools, got %.200s",
                     Py_TYPE(obj)->tp_name);
        return -1;
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
    int64_t count = 0;
    /* An item's __bool__ may run any code, including code that shrinks the sequence: read each
     * item through its own reference while the list is still n long. */
    for (Py_ssize_t i = 0; i < n && i < PySequence_Fast_GET_SIZE(seq); ++i) {
        PyObject *item = Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
        int truth = PyObject_IsTrue(item);
        Py_DECREF(item);
        if (truth < 0) goto finish;
        g->enabled[i] = (uint8_t)truth;
        count += truth;
    }
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_SetString(PyExc_RuntimeError, "enable_lora changed size while it was read");
        goto finish;
    }
    if (count == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "enable_lora must enable at least one group, got all False");
        goto finish;
    }
    g->groups = n;
    g->enabled_count = count;
    rc = 0;
finish:
    Py_DECREF(seq);
    return rc;
}

int cpeft_check_groups(const cpeft_groups *g, int64_t out_features)
{
    if (out_features % g->groups != 0) {
        PyErr_Format(PyExc_ValueError,
                     "enable_lora has %lld groups, which must divide out_features %lld",
                     (long long)g->groups, (long long)out_features);
        return -1;
    }
    return 0;
}

int cpeft_parse_padding_idx(PyObject *obj, int64_t *padding_idx, int *given)
{
    *given = obj != NULL && obj != Py_None;
    *padding_idx = -1;
    if (!*given) {
        return 0;
    }
    return cpeft_parse_i64(obj, "padding_idx", "None or an int", padding_idx);
}

int cpeft_check_padding_idx(int64_t *padding_idx, int given, int64_t num_embeddings)
{
    if (!given) {
        *padding_idx = -1;
        return 0;
    }
    int64_t v = *padding_idx;
    if (v < -num_embeddings || v >= num_embeddings) {
        PyErr_Format(PyExc_ValueError,
                     "padding_idx must be in [-num_embeddings, num_embeddings) = [%lld, %lld), "
                     "got %lld",
                     -(long long)num_embeddings, (long long)num_embeddings, (long long)v);
        return -1;
    }
    *padding_idx = v < 0 ? v + num_embeddings : v;
    return 0;
}

int cpeft_parse_dropout(PyObject *p_obj, PyObject *seed, PyObject *offset, cpeft_dropout *d)
{
    double p = 0.0;
    if (cpeft_parse_real(p_obj, "dropout", &p) < 0 || cpeft_check_probability(p, "dropout") < 0 ||
        cpeft_parse_u64(seed, "seed", &d->seed) < 0 ||
        cpeft_parse_u64(offset, "offset", &d->offset) < 0) {
        return -1;
    }
    d->p = p;
    return 0;
}
