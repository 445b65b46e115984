/*
 * What the CUDA kernels of every op family share: the numeric traits that load and store
 * fp32/fp64/fp16/bf16 with fp32 (fp64) accumulation, the dtype dispatch, 4-wide vector access and
 * grid sizes.
 */
#ifndef CPEFT_CUDA_KERNEL_SUPPORT_CUH
#define CPEFT_CUDA_KERNEL_SUPPORT_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cpeft/core.h"

namespace cpeft_cuda {

template <class T> struct Num;

template <> struct Num<float> {
    typedef float acc;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Num<double> {
    typedef double acc;
    static __device__ __forceinline__ double load(double v) { return v; }
    static __device__ __forceinline__ double store(double v) { return v; }
};
template <> struct Num<__half> {
    typedef float acc;
    static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
    typedef float acc;
    static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 store(float v)
    {
        return __float2bfloat16_rn(v);
    }
};

__device__ __forceinline__ float quiet_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double quiet_nan(double)
{
    return __longlong_as_double(0x7ff8000000000000LL);
}

template <class T> struct TypeTag {
    typedef T type;
};

/* Calls f(TypeTag<T>()) with T the C++ type of a float cpeft_dtype. */
template <class F> int dispatch_float(cpeft_dtype dt, cpeft_status *st, F &&f)
{
    switch (dt) {
    case CPEFT_FLOAT32: return f(TypeTag<float>());
    case CPEFT_FLOAT64: return f(TypeTag<double>());
    case CPEFT_FLOAT16: return f(TypeTag<__half>());
    case CPEFT_BFLOAT16: return f(TypeTag<__nv_bfloat16>());
    default:
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "CUDA kernels: dtype code %d is not a float type",
                          (int)dt);
    }
}

/* Calls f(TypeTag<I>()) with I the C++ type of an index cpeft_dtype. */
template <class F> int dispatch_index(cpeft_dtype dt, cpeft_status *st, F &&f)
{
    switch (dt) {
    case CPEFT_INT32: return f(TypeTag<int32_t>());
    case CPEFT_INT64: return f(TypeTag<int64_t>());
    default:
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "CUDA kernels: index dtype code %d is not int32 or int64", (int)dt);
    }
}

/* 4-wide access to 4 consecutive elements p[(i0 + q) * stride], q = 0..3, of which those at
 * i0 + q >= len are absent (loaded as 0, not stored): one 8/16/32-byte access when unit-stride
 * and aligned, else one per element. */
template <class T>
__device__ __forceinline__ bool vector_ok(const T *p, int64_t stride, int64_t i0, int64_t len)
{
    return stride == 1 && i0 + 4 <= len &&
           (reinterpret_cast<uintptr_t>(p + i0) & (4 * sizeof(T) - 1)) == 0;
}

/* v[q] = p[(i0 + q) * stride] for i0 + q < len, else 0; one 4-wide load when unit-stride and
 * aligned. */
template <class T>
__device__ __forceinline__ void load4(const T *p, int64_t stride, int64_t i0, int64_t len,
                                      typename Num<T>::acc v[4])
{
    typedef typename Num<T>::acc Acc;
    if (vector_ok(p, stride, i0, len)) {
        T t[4];
        if constexpr (sizeof(T) == 2) {
            const uint2 raw = *reinterpret_cast<const uint2 *>(p + i0);
            memcpy(t, &raw, sizeof(raw));
        } else if constexpr (sizeof(T) == 4) {
            const float4 raw = *reinterpret_cast<const float4 *>(p + i0);
            memcpy(t, &raw, sizeof(raw));
        } else {
            const double2 lo = reinterpret_cast<const double2 *>(p + i0)[0];
            const double2 hi = reinterpret_cast<const double2 *>(p + i0)[1];
            memcpy(t, &lo, sizeof(lo));
            memcpy(t + 2, &hi, sizeof(hi));
        }
#pragma unroll
        for (int q = 0; q < 4; ++q)
            v[q] = Num<T>::load(t[q]);
        return;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q)
        v[q] = i0 + q < len ? (Acc)Num<T>::load(p[(i0 + q) * stride]) : Acc(0);
}

template <class T>
__device__ __forceinline__ void store4(T *p, int64_t stride, int64_t i0, int64_t len,
                                       const typename Num<T>::acc v[4])
{
    if (vector_ok(p, stride, i0, len)) {
        T t[4];
#pragma unroll
        for (int q = 0; q < 4; ++q)
            t[q] = Num<T>::store(v[q]);
        if constexpr (sizeof(T) == 2) {
            uint2 raw;
            memcpy(&raw, t, sizeof(raw));
            *reinterpret_cast<uint2 *>(p + i0) = raw;
        } else if constexpr (sizeof(T) == 4) {
            float4 raw;
            memcpy(&raw, t, sizeof(raw));
            *reinterpret_cast<float4 *>(p + i0) = raw;
        } else {
            double2 lo, hi;
            memcpy(&lo, t, sizeof(lo));
            memcpy(&hi, t + 2, sizeof(hi));
            reinterpret_cast<double2 *>(p + i0)[0] = lo;
            reinterpret_cast<double2 *>(p + i0)[1] = hi;
        }
        return;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q)
        if (i0 + q < len)
            p[(i0 + q) * stride] = Num<T>::store(v[q]);
}

/* Grid sizes for grid-stride loops: enough blocks to fill the GPU, never above the launch limit. */
inline unsigned grid_1d(int64_t work, int block)
{
    int64_t g = (work + block - 1) / block;
    if (g < 1)
        g = 1;
    if (g > 65535)
        g = 65535;
    return (unsigned)g;
}

/* Threads per block of the elementwise kernels. */
static const int kElementBlock = 256;

/* Grid of a kElementBlock-thread elementwise kernel over a rows x cols matrix: threads run along
 * columns (the unit-stride dimension of the usual row-major activations), blocks stride over
 * rows. */
inline dim3 grid_2d(int64_t rows, int64_t cols)
{
    int64_t gx = (cols + kElementBlock - 1) / kElementBlock;
    if (gx < 1)
        gx = 1;
    if (gx > 65535)
        gx = 65535;
    int64_t gy = rows < 1 ? 1 : (rows > 65535 ? 65535 : rows);
    return dim3((unsigned)gx, (unsigned)gy);
}

} /* namespace cpeft_cuda */

#endif /* CPEFT_CUDA_KERNEL_SUPPORT_CUH */
