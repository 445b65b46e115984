/*
 * Tensor import: NumPy arrays through the NumPy C API, everything else through DLPack (legacy and
 * versioned capsules, from __dlpack__ or passed raw), into cpeft_tensor views owned by a
 * cpeft_call; checks on dtype, shape and aliasing; BLAS-able 2-D and 1-D views for the compute
 * layer. Strides are kept in elements throughout, as the compute layer expects.
 */
#include "tensor.h"

#include "dtypes.h"

#include <string.h>

static const char *const dtype_names[] = {"float32", "float64", "float16", "bfloat16", "int32",
                                          "int64"};

const char *cpeft_dtype_name(int dtype)
{
    return dtype >= 0 && dtype < (int)(sizeof dtype_names / sizeof dtype_names[0])
               ? dtype_names[dtype]
               : "unsupported";
}

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

static void format_device(char *buf, size_t size, int device_type, int device_id)
{
    if (device_type == CPEFT_DEVICE_CUDA) {
        snprintf(buf, size, "cuda:%d", device_id);
    }
    else {
        snprintf(buf, size, "cpu");
    }
}

/* ---- acquisition: NumPy --------------------------------------------------------------------- */

static int numpy_dtype(PyArray_Descr *descr, size_t itemsize)
{
    switch (descr->kind) {
    case 'f':
        if (itemsize == 4) return CPEFT_FLOAT32;
        if (itemsize == 8) return CPEFT_FLOAT64;
        if (itemsize == 2) return CPEFT_FLOAT16;
        return CPEFT_DTYPE_UNSUPPORTED;
    case 'i':
        if (itemsize == 4) return CPEFT_INT32;
        if (itemsize == 8) return CPEFT_INT64;
        return CPEFT_DTYPE_UNSUPPORTED;
    default:
        return CPEFT_DTYPE_UNSUPPORTED;
    }
}

static int acquire_ndarray(PyArrayObject *arr, cpeft_tensor *t)
{
    PyArray_Descr *descr = PyArray_DESCR(arr);
    t->itemsize = (size_t)PyArray_ITEMSIZE(arr);
    t->dtype = numpy_dtype(descr, t->itemsize);
    if (t->dtype == CPEFT_DTYPE_UNSUPPORTED) {
        /* The scalar type's name without its module ("numpy.int16" -> "int16"), as NumPy prints
         * dtypes and as the supported ones are named. */
        const char *type_name = descr->typeobj->tp_name;
        const char *dot = strrchr(type_name, '.');
        snprintf(t->dtype_name, sizeof t->dtype_name, "%s", dot ? dot + 1 : type_name);
    }
    if (!PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be in native byte order, got a byte-swapped %s array", t->name,
                     t->dtype_name[0] ? t->dtype_name : dtype_names[t->dtype]);
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

/* ---- acquisition: DLPack -------------------------------------------------------------------- */

static int dlpack_dtype(DLDataType dt, char *name, size_t name_size)
{
    if (dt.code == kDLFloat && dt.bits == 32) return CPEFT_FLOAT32;
    if (dt.code == kDLFloat && dt.bits == 64) return CPEFT_FLOAT64;
    if (dt.code == kDLFloat && dt.bits == 16) return CPEFT_FLOAT16;
    if (dt.code == kDLBfloat && dt.bits == 16) return CPEFT_BFLOAT16;
    if (dt.code == kDLInt && dt.bits == 32) return CPEFT_INT32;
    if (dt.code == kDLInt && dt.bits == 64) return CPEFT_INT64;
    static const char *const codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex",
                                        "bool"};
    snprintf(name, name_size, "%s%u", dt.code < 7 ? codes[dt.code] : "dlpack-code-",
             dt.code < 7 ? (unsigned)dt.bits : (unsigned)dt.code);
    return CPEFT_DTYPE_UNSUPPORTED;
}

/* Call obj.__dlpack__, passing the consumer stream for CUDA producers and asking for a versioned
 * capsule; producers that predate max_version (torch 1.x, NumPy 1.x) raise TypeError, so retry
 * once without it. */
static PyObject *export_capsule(cpeft_call *call, PyObject *obj, const char *name)
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
        PyObject *stream = PyLong_FromUnsignedLongLong((unsigned long long)call->stream_value);
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

/* Takes ownership of the capsule's tensor (renaming it used_*) and fills t from it. From the
 * rename on, cpeft_call_release calls the producer's deleter, including when this fails later. */
static int acquire_capsule(PyObject *capsule, cpeft_tensor *t)
{
    DLTensor *dl;
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
        t->managed_versioned = m;
        if (m->version.major != CPEFT_DLPACK_MAJOR) {
            PyErr_Format(PyExc_BufferError,
                         "%s is a DLPack %u.%u tensor; cpeft reads DLPack major version %d",
                         t->name, m->version.major, m->version.minor, CPEFT_DLPACK_MAJOR);
            return -1;
        }
        t->readonly = (m->flags & CPEFT_DLPACK_FLAG_READ_ONLY) != 0;
        dl = &m->dl_tensor;
    }
    else if (capsule_name != NULL && strcmp(capsule_name, "dltensor") == 0) {
        DLManagedTensor *m = PyCapsule_GetPointer(capsule, "dltensor");
        if (m == NULL || PyCapsule_SetName(capsule, "used_dltensor") < 0) {
            return -1;
        }
        t->managed = m;
        dl = &m->dl_tensor;
    }
    else {
        PyErr_Format(PyExc_BufferError,
                     "%s: expected a DLPack capsule named 'dltensor' or 'dltensor_versioned', "
                     "got one named '%s' (a capsule can be consumed only once)",
                     t->name, capsule_name ? capsule_name : "");
        return -1;
    }

    if (dlpack_device(dl->device.device_type, dl->device.device_id, t) < 0) {
        return -1;
    }
    if (dl->dtype.lanes != 1) {
        PyErr_Format(PyExc_BufferError, "%s must have DLPack lanes == 1, got %u", t->name,
                     (unsigned)dl->dtype.lanes);
        return -1;
    }
    t->dtype = dlpack_dtype(dl->dtype, t->dtype_name, sizeof t->dtype_name);
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

static void compute_extent(cpeft_tensor *t)
{
    int64_t lo = 0, hi = 0;
    for (int i = 0; i < t->ndim; ++i) {
        if (t->shape[i] == 0) {
            t->extent_lo = t->extent_hi = t->data;
            return;
        }
        int64_t reach = (t->shape[i] - 1) * t->strides[i];
        if (reach < 0) lo += reach;
        else hi += reach;
    }
    t->extent_lo = t->data + lo * (int64_t)t->itemsize;
    t->extent_hi = t->data + (hi + 1) * (int64_t)t->itemsize;
}

static int check_device(cpeft_call *call, cpeft_tensor *t)
{
    if (call->device_owner == NULL) {
        call->device_type = t->device_type;
        call->device_id = t->device_id;
        call->device_owner = t->name;
        return 0;
    }
    if (t->device_type != call->device_type || t->device_id != call->device_id) {
        char want[32], got[32];
        format_device(want, sizeof want, call->device_type, call->device_id);
        format_device(got, sizeof got, t->device_type, t->device_id);
        PyErr_Format(PyExc_ValueError, "%s must be on the same device as %s (%s), got %s",
                     t->name, call->device_owner, want, got);
        return -1;
    }
    return 0;
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
    PyErr_Format(PyExc_SystemError, "cpeft: argument %s was not prepared before acquisition",
                 name);
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
        if (other == call) continue;
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
    if (!call->inplace_registered) return;
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
    memset(t, 0, sizeof *t);
    t->name = name;
    t->role = role;
    t->source = Py_NewRef(obj);

    if (PyArray_Check(obj)) {
        if (acquire_ndarray((PyArrayObject *)obj, t) < 0) return NULL;
    }
    else if (PyCapsule_CheckExact(obj)) {
        if (acquire_capsule(obj, t) < 0) return NULL;
    }
    else {
        cpeft_prepared *export = prepared_export(call, obj, name);
        if (export == NULL) return NULL;
        if (export->capsule == NULL) {
            PyErr_Format(PyExc_TypeError,
                         "%s must be a numpy.ndarray or a tensor with __dlpack__ (torch.Tensor, "
                         "cupy.ndarray, ...), got %.200s",
                         name, Py_TYPE(obj)->tp_name);
            return NULL;
        }
        if (acquire_capsule(export->capsule, t) < 0) return NULL;
    }
    if (t->dtype != CPEFT_DTYPE_UNSUPPORTED) {
        snprintf(t->dtype_name, sizeof t->dtype_name, "%s", dtype_names[t->dtype]);
    }
    if (cpeft_numel(t) == 0) {
        t->data = empty_tensor_storage;
    }
    /* NumPy views such as buf[1:].view(np.float32) start between elements; the compute loops read
     * whole elements, which such an address does not allow. */
    t->misaligned = t->itemsize > 1 && ((uintptr_t)t->data % t->itemsize) != 0;
    compute_extent(t);
    if (check_device(call, t) < 0) return NULL;
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
    if (role == CPEFT_ROLE_INPLACE && register_inplace(call, t) < 0) return NULL;
    if (role != CPEFT_ROLE_OUTPUT && !(t->from_numpy && t->device_type == CPEFT_DEVICE_CPU)) {
        call->all_numpy = 0;
    }
    return t;
}

cpeft_tensor *cpeft_call_input(cpeft_call *call, PyObject *obj, const char *name, cpeft_role role)
{
    return acquire(call, obj, name, role);
}

int cpeft_call_optional_input(cpeft_call *call, PyObject *obj, const char *name,
                              cpeft_tensor **out)
{
    *out = NULL;
    if (obj == NULL || obj == Py_None) {
        return 0;
    }
    *out = acquire(call, obj, name, CPEFT_ROLE_INPUT);
    return *out ? 0 : -1;
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

int cpeft_call_output(cpeft_call *call, PyObject *obj, const char *name, int required,
                      int dtype, int ndim, const int64_t *shape, cpeft_tensor **out)
{
    *out = NULL;
    if (obj == NULL || obj == Py_False || (obj == Py_None && !required)) {
        if (obj == Py_False && required) {
            PyErr_Format(PyExc_ValueError, "%s is always written; pass None, True or an array, "
                         "got False", name);
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
        int typenum = numpy_typenum(dtype);
        npy_intp dims[CPEFT_MAX_NDIM];
        for (int i = 0; i < ndim; ++i) dims[i] = (npy_intp)shape[i];
        if (typenum < 0) {
            PyErr_Format(PyExc_ValueError, "%s: NumPy has no %s dtype", name, dtype_names[dtype]);
            return -1;
        }
        PyObject *arr = PyArray_SimpleNew(ndim, dims, typenum);
        if (arr == NULL) return -1;
        *out = acquire(call, arr, name, CPEFT_ROLE_OUTPUT);
        Py_DECREF(arr);   /* the tensor holds its own references (source and array) */
        return *out ? 0 : -1;
    }
    cpeft_tensor *t = acquire(call, obj, name, CPEFT_ROLE_OUTPUT);
    if (t == NULL) return -1;
    if (t->dtype != dtype) {
        PyErr_Format(PyExc_ValueError, "%s must have dtype %s, got %s", name, dtype_names[dtype],
                     t->dtype_name);
        return -1;
    }
    if (cpeft_check_shape(t, ndim, shape, NULL) < 0) return -1;
    *out = t;
    return 0;
}

int cpeft_call_init(cpeft_call *call, PyObject *module, PyObject *stream_obj)
{
    call->state = cpeft_get_state(module);
    call->count = 0;
    call->all_numpy = 1;
    call->device_type = CPEFT_DEVICE_CPU;
    call->device_id = 0;
    call->device_owner = NULL;
    call->status.code = CPEFT_OK;
    call->status.message[0] = '\0';
    call->prepared = 0;
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
        p->capsule = NULL;
        if (PyObject_HasAttrString(obj, "__dlpack__")) {
            p->capsule = export_capsule(call, obj, names[i]);
            if (p->capsule == NULL) {
                return -1;
            }
        }
    }
    call->prepared = 1;
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

void cpeft_call_release(cpeft_call *call)
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
        if (t->managed_versioned != NULL && t->managed_versioned->deleter != NULL) {
            t->managed_versioned->deleter(t->managed_versioned);
        }
        if (t->managed != NULL && t->managed->deleter != NULL) {
            t->managed->deleter(t->managed);
        }
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
}

int cpeft_call_check_aliasing(cpeft_call *call)
{
    for (int i = 0; i < call->count; ++i) {
        cpeft_tensor *w = &call->tensors[i];
        if (w->role == CPEFT_ROLE_INPUT || w->extent_lo == w->extent_hi) continue;
        for (int j = 0; j < call->count; ++j) {
            cpeft_tensor *o = &call->tensors[j];
            if (j == i || o->extent_lo == o->extent_hi) continue;
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

/* ---- checks --------------------------------------------------------------------------------- */

int cpeft_check_float_dtype(const cpeft_call *call, const cpeft_tensor *t, const cpeft_tensor *like)
{
    int dt = t->dtype;
    int on_cuda = cpeft_call_on_cuda(call);
    if (!cpeft_float_dtype_supported(dt, on_cuda)) {
        char expected[64];
        cpeft_format_float_dtypes(expected, sizeof expected, on_cuda);
        PyErr_Format(PyExc_ValueError, "%s must have dtype %s on the %s, got %s", t->name,
                     expected, on_cuda ? "GPU" : "CPU", t->dtype_name);
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
    for (int i = 0; same && i < ndim; ++i) same = t->shape[i] == shape[i];
    if (!same) {
        char want[256], got[256];
        cpeft_format_shape(want, sizeof want, ndim, shape);
        cpeft_format_shape(got, sizeof got, t->ndim, t->shape);
        if (meaning != NULL) {
            PyErr_Format(PyExc_ValueError, "%s must have shape %s = %s, got %s", t->name, want,
                         meaning, got);
        }
        else {
            PyErr_Format(PyExc_ValueError, "%s must have shape %s, got %s", t->name, want, got);
        }
        return -1;
    }
    return 0;
}

int64_t cpeft_leading_numel(const cpeft_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i + 1 < t->ndim; ++i) n *= t->shape[i];
    return n;
}

int64_t cpeft_numel(const cpeft_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
    return n;
}

/* ---- views ---------------------------------------------------------------------------------- */

/* Collapse dims [first, last) into one evenly spaced run: its size and stride, or 0 when the
 * elements are not evenly spaced. Size-1 dims carry no stride information (producers export
 * anything there), so they are skipped; *stride_free says the run has at most one element. */
static int collapse_dims(const cpeft_tensor *t, int first, int last, int64_t *size,
                         int64_t *stride, int *stride_free)
{
    int64_t n = 1;
    for (int i = first; i < last; ++i) n *= t->shape[i];
    *size = n;
    *stride = 1;
    *stride_free = n <= 1;
    if (n <= 1) return 1;
    int64_t expected = 0;
    int have_inner = 0;
    for (int i = last - 1; i >= first; --i) {
        if (t->shape[i] == 1) continue;
        if (have_inner && t->strides[i] != expected) return 0;
        if (!have_inner) *stride = t->strides[i];
        have_inner = 1;
        expected = t->strides[i] * t->shape[i];
    }
    return 1;
}

/* A BLAS-able description of a rows x cols run, or 0 (see cpeft_mat in core.h). */
static int blas_layout(int64_t rows, int64_t cols, int64_t rs, int rs_free, int64_t cs,
                       int cs_free, cpeft_mat *m)
{
    m->rows = rows;
    m->cols = cols;
    int64_t min_rs = cols > 1 ? cols : 1;
    int64_t min_cs = rows > 1 ? rows : 1;
    if (rows == 0 || cols == 0) {
        m->row_stride = min_rs;
        m->col_stride = 1;
        return 1;
    }
    if ((cs_free || cs == 1) && (rs_free || rs >= min_rs)) {
        m->col_stride = 1;
        m->row_stride = rs_free ? min_rs : rs;
        return 1;
    }
    if ((rs_free || rs == 1) && (cs_free || cs >= min_cs)) {
        m->row_stride = 1;
        m->col_stride = cs_free ? min_cs : cs;
        return 1;
    }
    return 0;
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
            if (++index[d] < t->shape[d]) break;
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

static int copy_or_reject(cpeft_call *call, cpeft_tensor *t, const char *layout)
{
    if (t->role == CPEFT_ROLE_INPUT && !cpeft_call_on_cuda(call)) {
        if (make_compact_copy(t) < 0) return -1;
        t->misaligned = 0;   /* PyMem_RawMalloc aligns for every dtype */
        return 0;
    }
    if (t->misaligned) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be aligned to its itemsize (%zu bytes); CUDA inputs are never "
                     "copied, pass an aligned tensor", t->name, t->itemsize);
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

int cpeft_tensor_mat(cpeft_call *call, cpeft_tensor *t, int transpose, cpeft_mat *mat)
{
    for (int attempt = 0; attempt < 2; ++attempt) {
        int64_t rows, cols, rs, cs;
        int rs_free, cs_free, ok;
        if (t->ndim == 0) {
            rows = cols = 1;
            rs = cs = 1;
            rs_free = cs_free = 1;
            ok = 1;
        }
        else {
            ok = collapse_dims(t, 0, t->ndim - 1, &rows, &rs, &rs_free);
            cols = t->shape[t->ndim - 1];
            cs = t->strides[t->ndim - 1];
            cs_free = cols <= 1;
        }
        cpeft_mat m;
        if (ok && !t->misaligned &&
            (transpose ? blas_layout(cols, rows, cs, cs_free, rs, rs_free, &m)
                       : blas_layout(rows, cols, rs, rs_free, cs, cs_free, &m))) {
            /* BLAS takes 32-bit leading dimensions; the GEMM wrapper blocks sizes beyond that,
             * but a leading dimension is the memory's own. */
            int64_t ld = m.col_stride == 1 ? m.row_stride : m.col_stride;
            if (ld <= INT32_MAX) {
                m.data = t->data;
                *mat = m;
                return 0;
            }
            if (attempt == 1) {
                PyErr_Format(PyExc_ValueError,
                             "%s has %lld elements per row, beyond the 32-bit BLAS range of "
                             "leading dimensions", t->name, (long long)ld);
                return -1;
            }
        }
        if (attempt == 0 &&
            copy_or_reject(call, t, "BLAS-able 2-D view with a 32-bit leading dimension and an "
                                    "address aligned to its itemsize") < 0) {
            return -1;
        }
    }
    PyErr_Format(PyExc_SystemError, "cpeft: %s has no BLAS-able view after a compact copy",
                 t->name);
    return -1;
}

int cpeft_tensor_vec(cpeft_call *call, cpeft_tensor *t, cpeft_vec *vec)
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
        if (attempt == 0 &&
            copy_or_reject(call, t, "positive, uniform stride below 2**31 and an aligned "
                                    "address") < 0) {
            return -1;
        }
    }
    PyErr_Format(PyExc_SystemError, "cpeft: %s has no vector view after a compact copy", t->name);
    return -1;
}

int cpeft_tensor_contiguous(cpeft_call *call, cpeft_tensor *t, void **data)
{
    cpeft_vec v;
    if (cpeft_tensor_vec(call, t, &v) < 0) return -1;
    if (v.stride != 1) {
        if (copy_or_reject(call, t, "contiguous layout") < 0) return -1;
        if (cpeft_tensor_vec(call, t, &v) < 0) return -1;
    }
    *data = v.data;
    return 0;
}

int cpeft_check_indices_in_range(const cpeft_call *call, const cpeft_tensor *t, cpeft_vec indices,
                                 int64_t num_embeddings)
{
    if (cpeft_call_on_cuda(call)) {
        return 0;   /* device memory: the CUDA kernels flag out-of-range values themselves */
    }
    for (int64_t i = 0; i < indices.len; ++i) {
        int64_t v = t->dtype == CPEFT_INT32
                        ? (int64_t)((const int32_t *)indices.data)[i * indices.stride]
                        : ((const int64_t *)indices.data)[i * indices.stride];
        if (v < 0 || v >= num_embeddings) {
            PyErr_Format(PyExc_IndexError,
                         "%s must hold values in [0, %lld) (num_embeddings), got %lld at flat "
                         "position %lld",
                         t->name, (long long)num_embeddings, (long long)v, (long long)i);
            return -1;
        }
    }
    return 0;
}
