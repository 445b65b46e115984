/*
 * The CUDA device of a call. Compute functions take device pointers and a stream, and the stream
 * belongs to one device, so the boundary makes the tensors' device current for the compute and
 * gives the caller back its own afterwards. Runs without the GIL: no Python objects here.
 */
#include "boundary.h"

#ifdef CPEFT_WITH_CUDA
#include <cuda_runtime_api.h>

int cpeft_device_enter(int device_id, int *previous, cpeft_status *st)
{
    cudaError_t err = cudaGetDevice(previous);
    if (err == cudaSuccess && *previous != device_id) {
        err = cudaSetDevice(device_id);
    }
    if (err != cudaSuccess) {
        return cpeft_fail(st, CPEFT_ERR_CUDA, "selecting CUDA device %d failed: %s (%s)",
                          device_id, cudaGetErrorName(err), cudaGetErrorString(err));
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

void cpeft_device_leave(int previous)
{
    (void)previous;
}

int cpeft_cuda_device_count(void)
{
    return 0;
}

#endif
