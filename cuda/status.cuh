/*
 * Status handling of the CUDA compute code: a failed CUDA runtime or cuBLAS call, or a failed
 * launch, becomes a cpeft_status naming the call, the status and where it happened; the boundary
 * turns it into cpeft.CudaError (MemoryError for an allocation). Nothing exits, aborts or asserts.
 */
#ifndef CPEFT_CUDA_STATUS_CUH
#define CPEFT_CUDA_STATUS_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "cpeft/core.h"

namespace cpeft_cuda {

int fail_cuda(cpeft_status *st, cudaError_t err, const char *call, const char *file, int line,
              const char *func);
int fail_cublas(cpeft_status *st, cublasStatus_t status, const char *call, const char *file,
                int line, const char *func);

/* The whole call expression is stringized; fail_cuda prints it up to its '(' so the message names
 * the function that failed without its (possibly long) argument list. */
#define CPEFT_CUDA_CHECK(st, call)                                                               \
    do {                                                                                         \
        cudaError_t cpeft_err_ = (call);                                                         \
        if (cpeft_err_ != cudaSuccess)                                                           \
            return cpeft_cuda::fail_cuda((st), cpeft_err_, #call, __FILE__, __LINE__, __func__); \
    } while (0)

#define CPEFT_CUBLAS_CHECK(st, call)                                                     \
    do {                                                                                 \
        cublasStatus_t cpeft_blas_ = (call);                                             \
        if (cpeft_blas_ != CUBLAS_STATUS_SUCCESS)                                        \
            return cpeft_cuda::fail_cublas((st), cpeft_blas_, #call, __FILE__, __LINE__, \
                                           __func__);                                    \
    } while (0)

/* A launch reports configuration errors only through cudaGetLastError. */
#define CPEFT_LAUNCH_CHECK(st, kernel_name)                                                    \
    do {                                                                                       \
        cudaError_t cpeft_err_ = cudaGetLastError();                                           \
        if (cpeft_err_ != cudaSuccess)                                                         \
            return cpeft_cuda::fail_cuda((st), cpeft_err_, "launch of " kernel_name, __FILE__, \
                                         __LINE__, __func__);                                  \
    } while (0)

/* Propagates a failed helper's status unchanged. */
#define CPEFT_TRY(expr)            \
    do {                           \
        int cpeft_rc_ = (expr);    \
        if (cpeft_rc_ != CPEFT_OK) \
            return cpeft_rc_;      \
    } while (0)

} /* namespace cpeft_cuda */

#endif /* CPEFT_CUDA_STATUS_CUH */
