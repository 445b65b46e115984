/*
 * The call lifecycle (call.h): begin (scalar stream, DLPack exports, GC pause), acquisition of
 * inputs and outputs from ndarrays, capsules or exchange-API exports, the registry of in-place
 * targets in flight, the aliasing check, and the end that gives every tensor back.
 */
#include "call.h"

#include <stddef.h>
#include <string.h>

#include "checks.h"
#include "dlpack_import.h"
#include "ndarray.h"

static void compute_extent(cpeft_tensor *t)
{
    int64_t lo = 0, hi = 0;
    for (int i = 0; i < t->ndim; ++i) {
        if (t->shape[i] == 0) {
            t->extent_lo = t->extent_hi = t->data;
            return;
        }
        int64_t reach = (t->shape[i] - 1) * t->strides[i];
        if (reach < 0)
            lo += reach;
        else
            hi += reach;
    }
    t->extent_lo = t->data + lo * (int64_t)t->itemsize;
    t->extent_hi = t->data + (hi + 1) * (int64_t)t->itemsize;
}

/* The export cpeft_call_prepare made for argument `name`; NULL with SystemError when the entry
 * point did not list it (a bug in cpeft, caught by the tests, never a reason to run Python code
 * after data pointers were taken). */
static cpeft_prepared *prepared_export(cpeft_call *call, PyObject *obj, const char *name)
{
    for (int i = 0; i < call->prepared_count; ++i) {
        cpeft_prepared *p = &call->exports[i];
        if (p->obj == obj && strcmp(p->name, name) == 0) {
            return p;
        }
    }
    PyErr_Format(PyExc_SystemError, "cpeft: argument %s was not prepared before acquisition", name);
    return NULL;
}

/* Empty tensors may come with data == NULL (torch does this), and the compute layer reads NULL as
 * "not requested": they get this address instead, never dereferenced since they have no
 * elements. Aligned for every dtype. */
static _Alignas(16) char empty_tensor_storage[16];

/*
 * In-place targets (merge weights, biases, records) of calls in flight, in state->inplace_calls.
 * Two merges of one weight at once would each see the other's writes between their count and
 * apply passes; the second one is refused before it takes anything. The list is only read and
 * written with the GIL held (each call registers before it releases the GIL and unregisters after
 * taking it back), so the GIL is its lock.
 */
static const cpeft_tensor *inplace_conflict(const cpeft_call *call, const cpeft_tensor *t)
{
    for (const cpeft_call *other = call->state->inplace_calls; other != NULL;
         other = other->next_inplace) {
        if (other == call)
            continue;
        for (int i = 0; i < other->count; ++i) {
            const cpeft_tensor *o = &other->tensors[i];
            if (o->role != CPEFT_ROLE_INPLACE || o->device_type != t->device_type ||
                o->device_id != t->device_id || o->extent_lo == o->extent_hi) {
                continue;
            }
            if (t->extent_lo < o->extent_hi && o->extent_lo < t->extent_hi) {
                return o;
            }
        }
    }
    return NULL;
}

static int register_inplace(cpeft_call *call, cpeft_tensor *t)
{
    if (t->extent_lo == t->extent_hi) {
        return 0;
    }
    const cpeft_tensor *o = inplace_conflict(call, t);
    if (o != NULL) {
        PyErr_Format(PyExc_RuntimeError,
                     "%s is being modified in place by another cpeft call right now (its %s): "
                     "concurrent merges or unmerges of one tensor are not supported, run them "
                     "one after the other",
                     t->name, o->name);
        return -1;
    }
    if (!call->inplace_registered) {
        call->next_inplace = call->state->inplace_calls;
        call->state->inplace_calls = call;
        call->inplace_registered = 1;
    }
    return 0;
}

static void unregister_inplace(cpeft_call *call)
{
    if (!call->inplace_registered)
        return;
    for (cpeft_call **link = &call->state->inplace_calls; *link != NULL;
         link = &(*link)->next_inplace) {
        if (*link == call) {
            *link = call->next_inplace;
            break;
        }
    }
    call->inplace_registered = 0;
}

static cpeft_tensor *acquire(cpeft_call *call, PyObject *obj, const char *name, cpeft_role role)
{
    if (call->count == CPEFT_MAX_CALL_TENSORS) {
        PyErr_SetString(PyExc_SystemError, "cpeft: too many tensors in one call");
        return NULL;
    }
    cpeft_tensor *t = &call->tensors[call->count++];
    memset(t, 0, offsetof(cpeft_tensor, shape));
    t->name = name;
    t->role = role;
    t->source = Py_NewRef(obj);

    if (PyArray_Check(obj)) {
        if (cpeft_ndarray_import((PyArrayObject *)obj, t) < 0)
            return NULL;
    } else if (PyCapsule_CheckExact(obj)) {
        if (cpeft_dlpack_import(obj, t) < 0)
            return NULL;
    } else {
        /* cpeft_call_prepare skips None, True and False (output requests), so they have no
         * export: as an input they are simply the wrong kind of object. */
        int request = obj == Py_None || obj == Py_True || obj == Py_False;
        cpeft_prepared *export = request ? NULL : prepared_export(call, obj, name);
        if (export == NULL && !request)
            return NULL;
        if (request || (export->managed == NULL && export->capsule == NULL)) {
            PyErr_Format(PyExc_TypeError,
                         "%s must be a numpy.ndarray or a tensor with __dlpack__ (torch.Tensor, "
                         "cupy.ndarray, ...), got %.200s",
                         name, Py_TYPE(obj)->tp_name);
            return NULL;
        }
        if (export->managed != NULL) {
            DLManagedTensorVersioned *m = export->managed;
            export->managed = NULL;   /* t owns it from here */
            if (cpeft_dlpack_import_versioned(m, t) < 0)
                return NULL;
        } else if (cpeft_dlpack_import(export->capsule, t) < 0) {
            return NULL;
        }
    }
    if (cpeft_numel(t) == 0) {
        t->data = empty_tensor_storage;
    }
    /* NumPy views such as buf[1:].view(np.float32) start between elements; the compute loops read
     * whole elements, which such an address does not allow. */
    t->misaligned = t->itemsize > 1 && ((uintptr_t)t->data % t->itemsize) != 0;
    compute_extent(t);
    if (cpeft_device_join(&call->device, name, t->device_type, t->device_id) < 0)
        return NULL;
    if (role != CPEFT_ROLE_INPUT && t->readonly) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable, got a read-only %s", name,
                     t->from_numpy ? "array" : "tensor");
        return NULL;
    }
    if (role != CPEFT_ROLE_INPUT && t->misaligned) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be aligned to its itemsize (%zu bytes), got an address %zu bytes "
                     "past a multiple of it (a view such as buf[1:].view(...)); pass an aligned "
                     "array, e.g. a fresh numpy.empty",
                     name, t->itemsize, (size_t)((uintptr_t)t->data % t->itemsize));
        return NULL;
    }
    if (role == CPEFT_ROLE_INPLACE && register_inplace(call, t) < 0)
        return NULL;
    if (role != CPEFT_ROLE_OUTPUT && !(t->from_numpy && t->device_type == CPEFT_DEVICE_CPU)) {
        call->all_numpy = 0;
    }
    return t;
}

cpeft_tensor *cpeft_call_input(cpeft_call *call, PyObject *obj, const char *name, cpeft_role role)
{
    return acquire(call, obj, name, role);
}

int cpeft_call_optional_input(cpeft_call *call, PyObject *obj, const char *name, cpeft_tensor **out)
{
    *out = NULL;
    if (obj == NULL || obj == Py_None) {
        return 0;
    }
    *out = acquire(call, obj, name, CPEFT_ROLE_INPUT);
    return *out ? 0 : -1;
}

int cpeft_call_output(cpeft_call *call, PyObject *obj, const char *name, int required, int dtype,
                      int ndim, const int64_t *shape, cpeft_tensor **out)
{
    *out = NULL;
    if (obj == NULL || obj == Py_False || (obj == Py_None && !required)) {
        if (obj == Py_False && required) {
            PyErr_Format(PyExc_ValueError,
                         "%s is always written; pass None, True or an array, "
                         "got False",
                         name);
            return -1;
        }
        return 0;
    }
    if (obj == Py_None || obj == Py_True) {
        if (!call->all_numpy) {
            PyErr_Format(PyExc_ValueError,
                         "%s=True allocates a NumPy array, which needs every input to be a NumPy "
                         "array; pass %s as an array of the inputs' framework "
                         "(cpeft.functional does this for torch and CuPy)",
                         name, name);
            return -1;
        }
        PyObject *arr = cpeft_ndarray_new(name, dtype, ndim, shape);
        if (arr == NULL)
            return -1;
        *out = acquire(call, arr, name, CPEFT_ROLE_OUTPUT);
        Py_DECREF(arr);   /* the tensor holds its own references (source and array) */
        return *out ? 0 : -1;
    }
    cpeft_tensor *t = acquire(call, obj, name, CPEFT_ROLE_OUTPUT);
    if (t == NULL)
        return -1;
    if (t->dtype != dtype) {
        PyErr_Format(PyExc_ValueError, "%s must have dtype %s, got %s", name,
                     cpeft_dtype_name(dtype), t->dtype_name);
        return -1;
    }
    if (cpeft_check_shape(t, ndim, shape, NULL) < 0)
        return -1;
    *out = t;
    return 0;
}

int cpeft_parse_stream(PyObject *obj, uintptr_t *stream)
{
    /* The DLPack stream integer: 1 is the legacy default stream (cudaStreamLegacy); 0 is
     * ambiguous in the protocol, so 0 and None both map to 1. */
    if (obj == NULL || obj == Py_None) {
        *stream = 1;
        return 0;
    }
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "stream must be None or an int CUDA stream handle, got %.200s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError,
                     "stream must be None or an int CUDA stream handle >= 0, "
                     "got %R",
                     obj);
        return -1;
    }
    *stream = value == 0 ? 1 : (uintptr_t)value;
    return 0;
}

int cpeft_call_begin(cpeft_call *call, PyObject *module, PyObject *stream_obj)
{
    call->state = cpeft_get_state(module);
    call->count = 0;
    call->all_numpy = 1;
    call->device.type = CPEFT_DEVICE_CPU;
    call->device.id = 0;
    call->device.owner = NULL;
    call->status.code = CPEFT_OK;
    call->status.message[0] = '\0';
    call->gc_paused = 0;
    call->prepared_count = 0;
    call->next_inplace = NULL;
    call->inplace_registered = 0;
    if (cpeft_parse_stream(stream_obj, &call->stream_value) < 0) {
        return -1;
    }
    call->stream = (void *)call->stream_value;
    return 0;
}

int cpeft_call_prepare(cpeft_call *call, PyObject *const *objs, const char *const *names, int n)
{
    for (int i = 0; i < n; ++i) {
        PyObject *obj = objs[i];
        if (obj == NULL || obj == Py_None || obj == Py_True || obj == Py_False ||
            PyArray_Check(obj) || PyCapsule_CheckExact(obj)) {
            continue;
        }
        if (call->prepared_count == CPEFT_MAX_CALL_TENSORS) {
            PyErr_SetString(PyExc_SystemError, "cpeft: too many tensors in one call");
            return -1;
        }
        cpeft_prepared *p = &call->exports[call->prepared_count++];
        p->name = names[i];
        p->obj = Py_NewRef(obj);
        p->managed = NULL;
        p->capsule = NULL;
        const DLPackExchangeAPI *api = cpeft_dlpack_exchange_api(call->state, obj);
        if (api == NULL && PyErr_Occurred()) {
            cpeft_reraise_with_context(PyExc_BufferError,
                                       "%s: its type's __dlpack_c_exchange_api__ could not be read",
                                       names[i]);
            return -1;
        }
        if (api != NULL) {
            p->managed = cpeft_dlpack_exchange_export(api, obj, names[i], call->stream_value);
            if (p->managed == NULL && PyErr_Occurred()) {
                return -1;
            }
        }
        if (p->managed == NULL && PyObject_HasAttrString(obj, "__dlpack__")) {
            p->capsule = cpeft_dlpack_export(obj, names[i], call->stream_value);
            if (p->capsule == NULL) {
                return -1;
            }
        }
    }
    cpeft_call_gc_pause(call);
    return 0;
}

void cpeft_call_gc_pause(cpeft_call *call)
{
    /* Only a GC this call disabled is enabled again: a user's gc.disable() stays. */
    call->gc_paused = PyGC_Disable();
}

void cpeft_call_gc_resume(cpeft_call *call)
{
    if (call->gc_paused) {
        PyGC_Enable();
        call->gc_paused = 0;
    }
}

PyObject *cpeft_call_end(cpeft_call *call, PyObject *result)
{
    cpeft_call_gc_resume(call);
    unregister_inplace(call);
    /* Deleters and capsule destructors may be Python code (a ctypes callback): they must not run
     * with this call's exception pending, and an error of theirs must not replace it. */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *pending = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
#endif
    for (int i = 0; i < call->count; ++i) {
        cpeft_tensor *t = &call->tensors[i];
        cpeft_dlpack_release(t);
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable(t->source);
        }
        PyMem_RawFree(t->compact_copy);
        Py_XDECREF(t->capsule);
        Py_XDECREF(t->array);
        Py_XDECREF(t->source);
    }
    call->count = 0;
    for (int i = 0; i < call->prepared_count; ++i) {
        /* An export the call never consumed: its capsule's destructor calls the deleter. */
        DLManagedTensorVersioned *m = call->exports[i].managed;
        if (m != NULL && m->deleter != NULL) {
            m->deleter(m);
        }
        Py_XDECREF(call->exports[i].capsule);
        Py_DECREF(call->exports[i].obj);
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable(NULL);
        }
    }
    call->prepared_count = 0;
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(pending);
#else
    PyErr_Restore(type, value, traceback);
#endif
    return result;
}

int cpeft_call_check_aliasing(cpeft_call *call)
{
    for (int i = 0; i < call->count; ++i) {
        cpeft_tensor *w = &call->tensors[i];
        if (w->role == CPEFT_ROLE_INPUT || w->extent_lo == w->extent_hi)
            continue;
        for (int j = 0; j < call->count; ++j) {
            cpeft_tensor *o = &call->tensors[j];
            if (j == i || o->extent_lo == o->extent_hi)
                continue;
            if (w->extent_lo < o->extent_hi && o->extent_lo < w->extent_hi) {
                PyErr_Format(PyExc_ValueError,
                             "%s aliases %s: outputs and in-place targets must not share memory "
                             "with any other argument",
                             w->name, o->name);
                return -1;
            }
        }
    }
    return 0;
}
