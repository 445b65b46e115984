/*
 * cuda_reserve_workspace: grows the CUDA workspace of a stream ahead of CUDA graph capture
 * (cpeft/workspace.h), since a stream being captured cannot grow it.
 */
#include "cpeft/workspace.h"
#include "device.h"
#include "params.h"

const char cpeft_doc_cuda_reserve_workspace[] =
    "cuda_reserve_workspace(nbytes, stream=None, device=None)\n--\n\n"
    "Grow the CUDA workspace cpeft keeps for `stream` (an int cudaStream_t handle; None: the\n"
    "legacy default stream) on `device` (None: the current CUDA device) to at least nbytes, and\n"
    "wait until it is allocated. Call it before capturing cpeft calls into a CUDA graph on that\n"
    "stream: a captured call that needs a larger workspace raises instead of growing it. Returns\n"
    "the workspace's size in bytes.";

PyObject *cpeft_py_cuda_reserve_workspace(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames)
{
    static char *const kwlist[] = {"nbytes", "stream", "device", NULL};
    PyObject *nbytes_obj = NULL, *stream_obj = Py_None, *device_obj = Py_None;
    if (!cpeft_parse_args(args, nargs, kwnames, "O|OO:cuda_reserve_workspace", kwlist, &nbytes_obj,
                          &stream_obj, &device_obj)) {
        return NULL;
    }
    int64_t nbytes = 0, device = -1;
    uintptr_t stream = 0;
    if (cpeft_parse_i64(nbytes_obj, "nbytes", "an int >= 0", &nbytes) < 0 ||
        cpeft_parse_stream(stream_obj, &stream) < 0) {
        return NULL;
    }
    if (nbytes < 0) {
        PyErr_Format(PyExc_ValueError, "nbytes must be an int >= 0, got %lld", (long long)nbytes);
        return NULL;
    }
    if (device_obj != Py_None) {
        if (cpeft_parse_i64(device_obj, "device", "None or a CUDA device index", &device) < 0) {
            return NULL;
        }
        int count = cpeft_cuda_device_count();
        if (device < 0 || device >= count) {
            PyErr_Format(PyExc_ValueError,
                         "device must be None or a CUDA device index in "
                         "[0, %d), got %lld",
                         count, (long long)device);
            return NULL;
        }
    }
    cpeft_status st = {CPEFT_OK, ""};
    size_t reserved = 0;
    int rc = CPEFT_OK;
    Py_BEGIN_ALLOW_THREADS int previous = 0;
    if (device >= 0) {
        rc = cpeft_device_enter((int)device, &previous, &st);
    }
    if (rc == CPEFT_OK) {
        rc = cpeft_cuda_reserve_workspace((size_t)nbytes, (void *)stream, &reserved, &st);
        if (device >= 0) {
            cpeft_device_leave(previous);
        }
    }
    Py_END_ALLOW_THREADS if (rc != CPEFT_OK)
    {
        cpeft_raise_status(cpeft_get_state(module), &st);
        return NULL;
    }
    return PyLong_FromSize_t(reserved);
}
