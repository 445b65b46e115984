/* NumPy import and allocation (ndarray.h). Strides are kept in elements, as the compute expects. */
#include "ndarray.h"

#include <string.h>

static int numpy_dtype(PyArray_Descr *descr, size_t itemsize)
{
    switch (descr->kind) {
    case 'f':
        if (itemsize == 4)
            return CPEFT_FLOAT32;
        if (itemsize == 8)
            return CPEFT_FLOAT64;
        if (itemsize == 2)
            return CPEFT_FLOAT16;
        return CPEFT_DTYPE_UNSUPPORTED;
    case 'i':
        if (itemsize == 4)
            return CPEFT_INT32;
        if (itemsize == 8)
            return CPEFT_INT64;
        return CPEFT_DTYPE_UNSUPPORTED;
    default: return CPEFT_DTYPE_UNSUPPORTED;
    }
}

int cpeft_ndarray_import(PyArrayObject *arr, cpeft_tensor *t)
{
    PyArray_Descr *descr = PyArray_DESCR(arr);
    t->itemsize = (size_t)PyArray_ITEMSIZE(arr);
    t->dtype = numpy_dtype(descr, t->itemsize);
    t->dtype_name = cpeft_dtype_name(t->dtype);
    if (t->dtype == CPEFT_DTYPE_UNSUPPORTED) {
        /* The scalar type's name without its module ("numpy.int16" -> "int16"), as NumPy prints
         * dtypes and as the supported ones are named. */
        const char *type_name = descr->typeobj->tp_name;
        const char *dot = strrchr(type_name, '.');
        snprintf(t->foreign_dtype, sizeof t->foreign_dtype, "%s", dot ? dot + 1 : type_name);
        t->dtype_name = t->foreign_dtype;
    }
    if (!PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be in native byte order, got a byte-swapped %s array", t->name,
                     t->dtype_name);
        return -1;
    }
    if (PyArray_NDIM(arr) > CPEFT_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "%s must have at most %d dimensions, got %d", t->name,
                     CPEFT_MAX_NDIM, PyArray_NDIM(arr));
        return -1;
    }
    t->ndim = PyArray_NDIM(arr);
    for (int i = 0; i < t->ndim; ++i) {
        npy_intp stride = PyArray_STRIDES(arr)[i];
        t->shape[i] = (int64_t)PyArray_DIMS(arr)[i];
        if (stride % (npy_intp)t->itemsize != 0) {
            PyErr_Format(PyExc_ValueError,
                         "%s must have strides that are whole multiples of its itemsize %zu, "
                         "got %zd bytes in dimension %d",
                         t->name, t->itemsize, (Py_ssize_t)stride, i);
            return -1;
        }
        t->strides[i] = (int64_t)(stride / (npy_intp)t->itemsize);
    }
    t->data = PyArray_BYTES(arr);
    t->readonly = !PyArray_ISWRITEABLE(arr);
    t->device_type = CPEFT_DEVICE_CPU;
    t->device_id = 0;
    t->from_numpy = 1;
    t->array = Py_NewRef((PyObject *)arr);
    return 0;
}

static int numpy_typenum(int dtype)
{
    switch (dtype) {
    case CPEFT_FLOAT32: return NPY_FLOAT32;
    case CPEFT_FLOAT64: return NPY_FLOAT64;
    case CPEFT_FLOAT16: return NPY_FLOAT16;
    case CPEFT_INT32: return NPY_INT32;
    case CPEFT_INT64: return NPY_INT64;
    default: return -1;
    }
}

PyObject *cpeft_ndarray_new(const char *name, int dtype, int ndim, const int64_t *shape)
{
    int typenum = numpy_typenum(dtype);
    if (typenum < 0) {
        PyErr_Format(PyExc_ValueError, "%s: NumPy has no %s dtype", name, cpeft_dtype_name(dtype));
        return NULL;
    }
    npy_intp dims[CPEFT_MAX_NDIM];
    for (int i = 0; i < ndim; ++i)
        dims[i] = (npy_intp)shape[i];
    return PyArray_SimpleNew(ndim, dims, typenum);
}
