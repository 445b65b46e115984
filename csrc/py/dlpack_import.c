/* DLPack export, import and release (dlpack_import.h). */
#include "dlpack_import.h"

#include <string.h>

static int dlpack_dtype(DLDataType dt, char *name, size_t name_size)
{
    if (dt.code == kDLFloat && dt.bits == 32)
        return CPEFT_FLOAT32;
    if (dt.code == kDLFloat && dt.bits == 64)
        return CPEFT_FLOAT64;
    if (dt.code == kDLFloat && dt.bits == 16)
        return CPEFT_FLOAT16;
    if (dt.code == kDLBfloat && dt.bits == 16)
        return CPEFT_BFLOAT16;
    if (dt.code == kDLInt && dt.bits == 32)
        return CPEFT_INT32;
    if (dt.code == kDLInt && dt.bits == 64)
        return CPEFT_INT64;
    static const char *const codes[] = {"int",    "uint",    "float", "opaque",
                                        "bfloat", "complex", "bool"};
    snprintf(name, name_size, "%s%u", dt.code < 7 ? codes[dt.code] : "dlpack-code-",
             dt.code < 7 ? (unsigned)dt.bits : (unsigned)dt.code);
    return CPEFT_DTYPE_UNSUPPORTED;
}

/* Call obj.__dlpack__, passing the consumer stream for CUDA producers and asking for a versioned
 * capsule; producers that predate max_version (torch 1.x, NumPy 1.x) raise TypeError, so retry
 * once without it. */
PyObject *cpeft_dlpack_export(PyObject *obj, const char *name, uintptr_t stream_value)
{
    PyObject *device = NULL, *method = NULL, *kwargs = NULL, *no_args = NULL, *capsule = NULL;
    long device_type = 0;

    device = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (device == NULL) {
        cpeft_reraise_with_context(PyExc_BufferError, "%s.__dlpack_device__() failed", name);
        goto finish;
    }
    if (!PyTuple_Check(device) || PyTuple_GET_SIZE(device) != 2) {
        PyErr_Format(PyExc_BufferError,
                     "%s.__dlpack_device__() must return a (device_type, device_id) tuple, got %R",
                     name, device);
        goto finish;
    }
    device_type = PyLong_AsLong(PyTuple_GET_ITEM(device, 0));
    if (device_type == -1 && PyErr_Occurred()) {
        goto finish;
    }
#ifndef CPEFT_WITH_CUDA
    if (device_type == kDLCUDA) {
        PyErr_Format(PyExc_RuntimeError, "%s is a CUDA tensor, but " CPEFT_NO_CUDA_MESSAGE, name);
        goto finish;
    }
#endif

    method = PyObject_GetAttrString(obj, "__dlpack__");
    if (method == NULL) {
        goto finish;
    }
    kwargs = Py_BuildValue("{s:(ii)}", "max_version", CPEFT_DLPACK_MAJOR, CPEFT_DLPACK_MINOR);
    if (kwargs == NULL) {
        goto finish;
    }
    if (device_type == kDLCUDA) {
        PyObject *stream = PyLong_FromUnsignedLongLong((unsigned long long)stream_value);
        if (stream == NULL || PyDict_SetItemString(kwargs, "stream", stream) < 0) {
            Py_XDECREF(stream);
            goto finish;
        }
        Py_DECREF(stream);
    }
    no_args = PyTuple_New(0);
    if (no_args == NULL) {
        goto finish;
    }
    capsule = PyObject_Call(method, no_args, kwargs);
    if (capsule == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        if (PyDict_DelItemString(kwargs, "max_version") == 0) {
            capsule = PyObject_Call(method, no_args, kwargs);
        }
    }
    if (capsule == NULL) {
        cpeft_reraise_with_context(PyExc_BufferError, "%s could not be exported through DLPack",
                                   name);
    }

finish:
    Py_XDECREF(device);
    Py_XDECREF(method);
    Py_XDECREF(kwargs);
    Py_XDECREF(no_args);
    return capsule;
}

static int dlpack_device(int32_t device_type, int32_t device_id, cpeft_tensor *t)
{
    switch (device_type) {
    case kDLCPU:
    case kDLCUDAHost:
        t->device_type = CPEFT_DEVICE_CPU;
        t->device_id = 0;
        return 0;
    case kDLCUDA:
#ifdef CPEFT_WITH_CUDA
        t->device_type = CPEFT_DEVICE_CUDA;
        t->device_id = device_id;
        return 0;
#else
        PyErr_Format(PyExc_RuntimeError, "%s is a CUDA tensor, but " CPEFT_NO_CUDA_MESSAGE,
                     t->name);
        return -1;
#endif
    default:
        PyErr_Format(PyExc_BufferError,
                     "%s is on DLPack device type %d; cpeft takes CPU and CUDA tensors", t->name,
                     (int)device_type);
        return -1;
    }
}

/* Fill t from the tensor dl of an export t now owns. */
static int read_dltensor(const DLTensor *dl, cpeft_tensor *t)
{
    if (dlpack_device(dl->device.device_type, dl->device.device_id, t) < 0) {
        return -1;
    }
    if (dl->dtype.lanes != 1) {
        PyErr_Format(PyExc_BufferError, "%s must have DLPack lanes == 1, got %u", t->name,
                     (unsigned)dl->dtype.lanes);
        return -1;
    }
    t->dtype = dlpack_dtype(dl->dtype, t->foreign_dtype, sizeof t->foreign_dtype);
    t->dtype_name = t->dtype == CPEFT_DTYPE_UNSUPPORTED ? t->foreign_dtype
                                                        : cpeft_dtype_name(t->dtype);
    t->itemsize = ((size_t)dl->dtype.bits + 7) / 8;
    if (dl->ndim < 0 || dl->ndim > CPEFT_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "%s must have at most %d dimensions, got %d", t->name,
                     CPEFT_MAX_NDIM, (int)dl->ndim);
        return -1;
    }
    t->ndim = dl->ndim;
    int64_t compact = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
        t->shape[i] = dl->shape[i];
        t->strides[i] = dl->strides ? dl->strides[i] : compact;
        compact *= dl->shape[i];
    }
    t->data = (char *)dl->data + dl->byte_offset;
    return 0;
}

int cpeft_dlpack_import_versioned(DLManagedTensorVersioned *m, cpeft_tensor *t)
{
    t->managed_versioned = m;
    if (m->version.major != CPEFT_DLPACK_MAJOR) {
        PyErr_Format(PyExc_BufferError,
                     "%s is a DLPack %u.%u tensor; cpeft reads DLPack major version %d", t->name,
                     m->version.major, m->version.minor, CPEFT_DLPACK_MAJOR);
        return -1;
    }
    t->readonly = (m->flags & CPEFT_DLPACK_FLAG_READ_ONLY) != 0;
    return read_dltensor(&m->dl_tensor, t);
}

int cpeft_dlpack_import(PyObject *capsule, cpeft_tensor *t)
{
    const char *capsule_name = PyCapsule_GetName(capsule);
    if (capsule_name == NULL && PyErr_Occurred()) {
        return -1;
    }
    t->capsule = Py_NewRef(capsule);
    if (capsule_name != NULL && strcmp(capsule_name, "dltensor_versioned") == 0) {
        DLManagedTensorVersioned *m = PyCapsule_GetPointer(capsule, "dltensor_versioned");
        if (m == NULL || PyCapsule_SetName(capsule, "used_dltensor_versioned") < 0) {
            return -1;
        }
        return cpeft_dlpack_import_versioned(m, t);
    }
    if (capsule_name != NULL && strcmp(capsule_name, "dltensor") == 0) {
        DLManagedTensor *m = PyCapsule_GetPointer(capsule, "dltensor");
        if (m == NULL || PyCapsule_SetName(capsule, "used_dltensor") < 0) {
            return -1;
        }
        t->managed = m;
        return read_dltensor(&m->dl_tensor, t);
    }
    PyErr_Format(PyExc_BufferError,
                 "%s: expected a DLPack capsule named 'dltensor' or 'dltensor_versioned', "
                 "got one named '%s' (a capsule can be consumed only once)",
                 t->name, capsule_name ? capsule_name : "");
    return -1;
}

/* Whether `name` is in the type's own namespace (not inherited): 1, 0, or -1 with an error. */
static int type_defines(PyTypeObject *type, PyObject *name)
{
    PyObject *dict = PyObject_GetAttrString((PyObject *)type, "__dict__");
    if (dict == NULL)
        return -1;
    int found = PySequence_Contains(dict, name);
    Py_DECREF(dict);
    return found;
}

/*
 * The exchange API type(obj) offers, if the boundary may use it: a capsule of a 1.x table with an
 * exporter, and no __dlpack__ of a subclass between the type and the class that offers the table
 * (such a subclass chose how it is exported, and is asked through __dlpack__). NULL without an
 * error when there is none; NULL with an error when looking raised (an attribute lookup on a type
 * may run Python code, which is why this runs before any pointer is taken).
 */
static const DLPackExchangeAPI *find_exchange_api(PyTypeObject *type)
{
    const DLPackExchangeAPI *api = NULL;
    PyObject *attr = PyUnicode_InternFromString("__dlpack_c_exchange_api__");
    PyObject *capsule = attr ? PyObject_GetAttr((PyObject *)type, attr) : NULL;
    PyObject *own_dlpack = NULL, *offered_dlpack = NULL;
    if (capsule == NULL) {
        if (attr != NULL && PyErr_ExceptionMatches(PyExc_AttributeError))
            PyErr_Clear();
        goto finish;
    }
    if (!PyCapsule_IsValid(capsule, "dlpack_exchange_api"))
        goto finish;
    const DLPackExchangeAPI *table = PyCapsule_GetPointer(capsule, "dlpack_exchange_api");
    if (table == NULL || table->header.version.major != CPEFT_DLPACK_MAJOR ||
        table->managed_tensor_from_py_object_no_sync == NULL || table->current_work_stream == NULL)
        goto finish;
    PyObject *mro = type->tp_mro;
    PyTypeObject *offering = NULL;
    for (Py_ssize_t i = 0; mro != NULL && i < PyTuple_GET_SIZE(mro) && offering == NULL; ++i) {
        PyTypeObject *base = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        int defines = type_defines(base, attr);
        if (defines < 0)
            goto finish;
        if (defines)
            offering = base;
    }
    if (offering == NULL)
        goto finish;
    own_dlpack = PyObject_GetAttrString((PyObject *)type, "__dlpack__");
    offered_dlpack = own_dlpack ? PyObject_GetAttrString((PyObject *)offering, "__dlpack__") : NULL;
    if (offered_dlpack == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError))
            PyErr_Clear();
        goto finish;
    }
    if (own_dlpack == offered_dlpack)
        api = table;

finish:
    Py_XDECREF(own_dlpack);
    Py_XDECREF(offered_dlpack);
    Py_XDECREF(capsule);
    Py_XDECREF(attr);
    return api;
}

const DLPackExchangeAPI *cpeft_dlpack_exchange_api(cpeft_state *state, PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    /* CPython zeroes a type's version tag when the type or a base is modified (a __dlpack__
     * assigned later) and gives it a fresh one at the next attribute lookup, so a recorded tag
     * still in place means the answer still holds; 0 is never a valid tag. */
    int slot = -1;
    for (int i = 0; i < CPEFT_EXCHANGE_API_CACHE; ++i) {
        if (state->exchange_apis[i].type == type) {
            if (type->tp_version_tag != 0 &&
                type->tp_version_tag == state->exchange_apis[i].version_tag)
                return state->exchange_apis[i].api;
            slot = i;
        }
    }
    const DLPackExchangeAPI *api = find_exchange_api(type);
    if (api == NULL && PyErr_Occurred())
        return NULL;
    if (slot < 0) {
        slot = state->exchange_apis_next;
        state->exchange_apis_next = (slot + 1) % CPEFT_EXCHANGE_API_CACHE;
    }
    PyTypeObject *evicted = state->exchange_apis[slot].type;
    state->exchange_apis[slot].type = (PyTypeObject *)Py_NewRef(type);
    state->exchange_apis[slot].version_tag = type->tp_version_tag;
    state->exchange_apis[slot].api = api;
    Py_XDECREF(evicted);
    return api;
}

DLManagedTensorVersioned *cpeft_dlpack_exchange_export(const DLPackExchangeAPI *api, PyObject *obj,
                                                       const char *name, uintptr_t stream_value)
{
    DLManagedTensorVersioned *m = NULL;
    if (api->managed_tensor_from_py_object_no_sync(obj, &m) != 0 || m == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_BufferError, "the exporter failed without saying why");
        cpeft_reraise_with_context(PyExc_BufferError, "%s could not be exported through DLPack",
                                   name);
        return NULL;
    }
#ifdef CPEFT_WITH_CUDA
    /* Nothing orders this export after the producer's pending writes: that holds only when the
     * call runs on the stream the producer works on. Otherwise __dlpack__(stream=...) is asked,
     * which makes the call's stream wait for the producer's. */
    if (m->dl_tensor.device.device_type == kDLCUDA) {
        void *current = NULL;
        if (api->current_work_stream(kDLCUDA, m->dl_tensor.device.device_id, &current) != 0) {
            if (m->deleter != NULL)
                m->deleter(m);
            cpeft_reraise_with_context(PyExc_BufferError,
                                       "the current stream of %s's device could not be read", name);
            return NULL;
        }
        /* NULL is the framework's default stream, the legacy one (DLPack's 1). */
        uintptr_t producer_stream = current == NULL ? 1 : (uintptr_t)current;
        if (producer_stream != stream_value) {
            if (m->deleter != NULL)
                m->deleter(m);
            return NULL;
        }
    }
#else
    (void)stream_value;
#endif
    return m;
}

void cpeft_dlpack_release(cpeft_tensor *t)
{
    if (t->managed_versioned != NULL && t->managed_versioned->deleter != NULL) {
        t->managed_versioned->deleter(t->managed_versioned);
    }
    if (t->managed != NULL && t->managed->deleter != NULL) {
        t->managed->deleter(t->managed);
    }
}
