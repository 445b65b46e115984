/*
 * Entry point exposing the dropout mask as data (cpeft/dropout.h): the ops regenerate it from
 * (seed, offset) and never store it; tests and curious callers get it here. Its shape and dtype
 * are checked here and nowhere else (cpeft.functional passes them through).
 */
#include "params.h"

/* shape: an int or a sequence of ints (anything with __index__, never floats), each >= 0. */
static int parse_shape(PyObject *obj, int *ndim, int64_t *shape)
{
    if (PyIndex_Check(obj) && !PyFloat_Check(obj)) {
        *ndim = 1;
        if (cpeft_parse_i64(obj, "shape", "an int or a sequence of ints", &shape[0]) < 0) {
            return -1;
        }
    } else {
        if (PyUnicode_Check(obj) || PyBytes_Check(obj) || !PySequence_Check(obj)) {
            PyErr_Format(PyExc_TypeError, "shape must be an int or a sequence of ints, got %.200s",
                         Py_TYPE(obj)->tp_name);
            return -1;
        }
        PyObject *seq = PySequence_Tuple(obj);
        if (seq == NULL) {
            return -1;
        }
        Py_ssize_t n = PyTuple_GET_SIZE(seq);
        if (n > CPEFT_MAX_NDIM) {
            PyErr_Format(PyExc_ValueError, "shape must have at most %d dimensions, got %zd",
                         CPEFT_MAX_NDIM, n);
            Py_DECREF(seq);
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; ++i) {
            if (cpeft_parse_i64(PyTuple_GET_ITEM(seq, i), "shape", "a sequence of ints",
                                &shape[i]) < 0) {
                Py_DECREF(seq);
                return -1;
            }
        }
        Py_DECREF(seq);
        *ndim = (int)n;
    }
    int64_t numel = 1;
    for (int i = 0; i < *ndim; ++i) {
        if (shape[i] < 0) {
            char got[256];
            cpeft_format_shape(got, sizeof got, *ndim, shape);
            PyErr_Format(PyExc_ValueError, "shape must have non-negative dimensions, got %s", got);
            return -1;
        }
        if (shape[i] > 0 && numel > INT64_MAX / shape[i]) {
            PyErr_SetString(PyExc_ValueError, "shape has more than 2**63 elements");
            return -1;
        }
        numel *= shape[i];
    }
    return 0;
}

/* dtype: "float32" / "float64", or a NumPy dtype or scalar type naming one of them. */
static int parse_mask_dtype(PyObject *obj, int *dtype)
{
    PyArray_Descr *descr = NULL;
    if (obj == Py_None || !PyArray_DescrConverter(obj, &descr)) {
        if (obj != Py_None && !PyErr_ExceptionMatches(PyExc_TypeError)) {
            return -1;
        }
        PyErr_Clear();
        PyErr_Format(PyUnicode_Check(obj) ? PyExc_ValueError : PyExc_TypeError,
                     "dtype must be float32 or float64 (a name, numpy.dtype or NumPy type), "
                     "got %R",
                     obj);
        return -1;
    }
    int typenum = descr->type_num;
    Py_DECREF(descr);
    if (typenum == NPY_FLOAT32) {
        *dtype = CPEFT_FLOAT32;
    } else if (typenum == NPY_FLOAT64) {
        *dtype = CPEFT_FLOAT64;
    } else {
        PyErr_Format(PyExc_ValueError, "dtype must be float32 or float64, got %R", obj);
        return -1;
    }
    return 0;
}

const char cpeft_doc_dropout_mask[] =
    "dropout_mask(shape, p, seed, offset=0, *, dtype='float32', out=None, stream=None)\n--\n\n"
    "The dropout mask of an input of `shape` ((M, IN) or (..., IN) flattened to rows): element\n"
    "(m, i) is 1/(1-p) where counter offset + m*IN + i is kept, else 0. Written into out when\n"
    "given (an array of exactly that shape and dtype), else into a new NumPy array; returned.";

PyObject *cpeft_py_dropout_mask(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static char *kwlist[] = {"shape", "p", "seed", "offset", "dtype", "out", "stream", NULL};
    PyObject *shape_obj, *p_obj, *seed_obj, *offset_obj = NULL, *dtype_obj = NULL,
                                            *out_obj = Py_None, *stream = Py_None;
    double p = 0.0;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOO|O$OOO:dropout_mask", kwlist, &shape_obj,
                          &p_obj, &seed_obj, &offset_obj, &dtype_obj, &out_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_dropout d = {0};
    cpeft_mat mask;
    int ndim, dtype = CPEFT_FLOAT32;
    int64_t shape[CPEFT_MAX_NDIM];
    cpeft_tensor *out;
    PyObject *const tensor_objs[] = {out_obj};
    static const char *const tensor_names[] = {"out"};
    if (parse_shape(shape_obj, &ndim, shape) < 0 || cpeft_parse_real(p_obj, "p", &p) < 0 ||
        cpeft_check_probability(p, "p") < 0 || cpeft_parse_u64(seed_obj, "seed", &d.seed) < 0 ||
        cpeft_parse_u64(offset_obj, "offset", &d.offset) < 0 ||
        (dtype_obj != NULL && parse_mask_dtype(dtype_obj, &dtype) < 0) ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 1) < 0 ||
        cpeft_call_output(&call, out_obj, "out", 1, dtype, ndim, shape, &out) < 0 ||
        cpeft_tensor_mat(out, 0, &mask) < 0) {
        goto finish;
    }
    d.p = p;

    int rc;
    CPEFT_DISPATCH(
        &call, rc, cpeft_dropout_mask_cpu((cpeft_dtype)out->dtype, &d, mask, &call.status),
        cpeft_dropout_mask_cuda((cpeft_dtype)out->dtype, &d, mask, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = Py_NewRef(out->source);
    }

finish:
    return cpeft_call_end(&call, ret);
}
