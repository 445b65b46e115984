/* Elementwise passes over cpeft_mat views (see elementwise.cuh). */
#include "elementwise.cuh"

#include <climits>

#include "cpeft/views.h"
#include "kernel_support.cuh"
#include "status.cuh"

namespace cpeft_cuda {

int zero_fill(const cpeft_mat &m, size_t elt, cudaStream_t stream, cpeft_status *st)
{
    if (m.rows == 0 || m.cols == 0)
        return CPEFT_OK;
    if (cpeft_mat_is_row_major(m)) {
        CPEFT_CUDA_CHECK(st, cudaMemset2DAsync(m.data, (size_t)m.row_stride * elt, 0,
                                               (size_t)m.cols * elt, (size_t)m.rows, stream));
    } else if (cpeft_mat_is_col_major(m)) {
        CPEFT_CUDA_CHECK(st, cudaMemset2DAsync(m.data, (size_t)m.col_stride * elt, 0,
                                               (size_t)m.rows * elt, (size_t)m.cols, stream));
    } else {
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "zero_fill: strides (%lld, %lld) not BLAS-able",
                          (long long)m.row_stride, (long long)m.col_stride);
    }
    return CPEFT_OK;
}

template <class T>
static __global__ void broadcast_rows_kernel(int64_t rows, int64_t cols, T *y, int64_t y_rs,
                                             int64_t y_cs, const T *v, int64_t v_stride,
                                             const T *scale, int64_t scale_stride)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x) {
        Acc value = Num<T>::load(v[j * v_stride]);
        if (scale)
            value *= Num<T>::load(scale[j * scale_stride]);
        const T stored = Num<T>::store(value);
        for (int64_t i = blockIdx.y; i < rows; i += gridDim.y)
            y[i * y_rs + j * y_cs] = stored;
    }
}

int broadcast_rows(cpeft_dtype dt, const cpeft_mat &y, const cpeft_vec &row_vec,
                   const cpeft_vec *row_scale, cudaStream_t stream, cpeft_status *st)
{
    if (y.rows == 0 || y.cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        broadcast_rows_kernel<T><<<grid_2d(y.rows, y.cols), kElementBlock, 0, stream>>>(
            y.rows, y.cols, static_cast<T *>(y.data), y.row_stride, y.col_stride,
            static_cast<const T *>(row_vec.data), row_vec.stride,
            row_scale ? static_cast<const T *>(row_scale->data) : nullptr,
            row_scale ? row_scale->stride : 0);
        CPEFT_LAUNCH_CHECK(st, "broadcast_rows_kernel");
        return (int)CPEFT_OK;
    });
}

template <class T>
static __global__ void scale_matrix_kernel(int64_t rows, int64_t cols, const T *src, int64_t s_rs,
                                           int64_t s_cs, const T *l, int64_t l_stride,
                                           int along_cols, T *dst, int64_t d_rs, int64_t d_cs)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x) {
        const Acc col_factor = along_cols ? Num<T>::load(l[j * l_stride]) : Acc(1);
        for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
            const Acc factor = along_cols ? col_factor : Num<T>::load(l[i * l_stride]);
            const Acc v = Num<T>::load(src[i * s_rs + j * s_cs]);
            dst[i * d_rs + j * d_cs] = Num<T>::store(v * factor);
        }
    }
}

/* The unit-stride case of scale_matrix_kernel: each thread scales 4 consecutive elements of a
 * row with one wide load and store (the scalar kernel ran at about 0.9 TB/s on an H200, a fifth
 * of the memory speed: gpu-runs/2026-11-30-18e3f0a/profile.txt, scale_matrix_kernel). */
static const int kVecThreads = 256;
static const int kVecTargetBlocks = 2048;

template <class T>
static __global__ void scale_matrix_vec_kernel(int64_t rows, int64_t cols, const T *src,
                                               int64_t s_rs, const T *l, int64_t l_stride,
                                               int along_cols, T *dst, int64_t d_rs)
{
    typedef typename Num<T>::acc Acc;
    const int64_t i0 = ((int64_t)blockIdx.x * kVecThreads + threadIdx.x) * 4;
    if (i0 >= cols)
        return;
    Acc col_factor[4];
#pragma unroll
    for (int q = 0; q < 4; ++q)
        col_factor[q] = along_cols && i0 + q < cols ? (Acc)Num<T>::load(l[(i0 + q) * l_stride])
                                                    : Acc(1);
    for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
        Acc v[4];
        load4(src + i * s_rs, 1, i0, cols, v);
        const Acc row_factor = along_cols ? Acc(1) : (Acc)Num<T>::load(l[i * l_stride]);
#pragma unroll
        for (int q = 0; q < 4; ++q)
            v[q] *= along_cols ? col_factor[q] : row_factor;
        store4(dst + i * d_rs, 1, i0, cols, v);
    }
}

int scale_matrix(cpeft_dtype dt, const cpeft_mat &src, const cpeft_vec &l, int along_cols,
                 const cpeft_mat &dst, cudaStream_t stream, cpeft_status *st)
{
    if (src.rows == 0 || src.cols == 0)
        return CPEFT_OK;
    /* Threads run along columns, so a column-major pair is walked through its transpose. */
    const bool flip = cpeft_mat_is_col_major(src) && !cpeft_mat_is_row_major(src);
    const cpeft_mat from = flip ? cpeft_mat_transpose(src) : src;
    const cpeft_mat to = flip ? cpeft_mat_transpose(dst) : dst;
    const int cols_scaled = flip ? !along_cols : along_cols;
    if (from.col_stride == 1 && to.col_stride == 1) {
        const int64_t col_blocks = (from.cols + 4 * kVecThreads - 1) / (4 * kVecThreads);
        if (col_blocks > INT_MAX)
            return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, "scale_matrix: %lld columns",
                              (long long)from.cols);
        int64_t row_blocks = (kVecTargetBlocks + col_blocks - 1) / col_blocks;
        if (row_blocks > from.rows)
            row_blocks = from.rows;
        if (row_blocks > 65535)
            row_blocks = 65535;
        if (row_blocks < 1)
            row_blocks = 1;
        const dim3 grid((unsigned)col_blocks, (unsigned)row_blocks);
        return dispatch_float(dt, st, [&](auto tag) {
            typedef typename decltype(tag)::type T;
            scale_matrix_vec_kernel<T><<<grid, kVecThreads, 0, stream>>>(
                from.rows, from.cols, static_cast<const T *>(from.data), from.row_stride,
                static_cast<const T *>(l.data), l.stride, cols_scaled, static_cast<T *>(to.data),
                to.row_stride);
            CPEFT_LAUNCH_CHECK(st, "scale_matrix_vec_kernel");
            return (int)CPEFT_OK;
        });
    }
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        scale_matrix_kernel<T><<<grid_2d(from.rows, from.cols), kElementBlock, 0, stream>>>(
            from.rows, from.cols, static_cast<const T *>(from.data), from.row_stride,
            from.col_stride, static_cast<const T *>(l.data), l.stride, cols_scaled,
            static_cast<T *>(to.data), to.row_stride, to.col_stride);
        CPEFT_LAUNCH_CHECK(st, "scale_matrix_kernel");
        return (int)CPEFT_OK;
    });
}

template <class T>
static __global__ void store_acc_kernel(int64_t rows, int64_t cols, const typename Num<T>::acc *src,
                                        T *dst, int64_t d_rs, int64_t d_cs)
{
    const int64_t n = rows * cols;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e / cols, j = e - i * cols;
        dst[i * d_rs + j * d_cs] = Num<T>::store(src[e]);
    }
}

int store_acc(cpeft_dtype dt, const void *src, const cpeft_mat &dst, cudaStream_t stream,
              cpeft_status *st)
{
    const int64_t n = dst.rows * dst.cols;
    if (n == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        store_acc_kernel<T><<<grid_1d(n, kElementBlock), kElementBlock, 0, stream>>>(
            dst.rows, dst.cols, static_cast<const Acc *>(src), static_cast<T *>(dst.data),
            dst.row_stride, dst.col_stride);
        CPEFT_LAUNCH_CHECK(st, "store_acc_kernel");
        return (int)CPEFT_OK;
    });
}

} /* namespace cpeft_cuda */
