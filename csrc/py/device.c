/*
 * The device of a call. Its tensors must all live on one device (cpeft_device_join, with the GIL).
 * Compute functions take device pointers and a stream, and the stream belongs to one device, so
 * the boundary makes the tensors' device current for the compute and gives the caller back its
 * own afterwards (cpeft_device_enter / _leave, without the GIL: no Python objects there).
 */
#include "device.h"

static void format_device(char *buf, size_t size, int device_type, int device_id)
{
    if (device_type == CPEFT_DEVICE_CUDA) {
        snprintf(buf, size, "cuda:%d", device_id);
    } else {
        snprintf(buf, size, "cpu");
    }
}

int cpeft_device_join(cpeft_device *device, const char *name, int type, int id)
{
    if (device->owner == NULL) {
        device->type = type;
        device->id = id;
        device->owner = name;
        return 0;
    }
    if (type != device->type || id != device->id) {
        char want[32], got[32];
        format_device(want, sizeof want, device->type, device->id);
        format_device(got, sizeof got, type, id);
        PyErr_Format(PyExc_ValueError, "%s must be on the same device as %s (%s), got %s", name,
                     device->owner, want, got);
        return -1;
    }
    return 0;
}

#ifdef CPEFT_WITH_CUDA
#include <cuda_runtime_api.h>

int cpeft_device_enter(int device_id, int *previous, cpeft_status *st)
{
    cudaError_t err = cudaGetDevice(previous);
    if (err == cudaSuccess && *previous != device_id) {
        err = cudaSetDevice(device_id);
    }
    if (err != cudaSuccess) {
        return cpeft_fail(st, CPEFT_ERR_CUDA, "selecting CUDA device %d failed: %s (%s)", device_id,
                          cudaGetErrorName(err), cudaGetErrorString(err));
    }
    return CPEFT_OK;
}

void cpeft_device_leave(int previous)
{
    int current = previous;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous) {
        cudaSetDevice(previous);
    }
}

int cpeft_cuda_device_count(void)
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();   /* no driver or no GPU: clear the sticky error, report none */
        return 0;
    }
    return count;
}

#else

int cpeft_device_enter(int device_id, int *previous, cpeft_status *st)
{
    *previous = device_id;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

void cpeft_device_leave(int previous) { (void)previous; }

int cpeft_cuda_device_count(void) { return 0; }

#endif
