/* The deterministic column reduction (see colreduce.cuh). */
#include "colreduce.cuh"

#include <climits>

#include "kernel_support.cuh"
#include "status.cuh"

namespace cpeft_cuda {

static const int kColTile = 32; /* columns per block: one warp reads 32 consecutive elements */
static const int kRowThreads = 8; /* rows per block step */
static const int kSlices = 64; /* fixed, so chunks fed with accumulate = 1 line up */

size_t colreduce_partial_bytes(cpeft_dtype dt, int64_t cols)
{
    return (size_t)kSlices * (size_t)(cols > 0 ? cols : 1) * cpeft_dtype_size(cpeft_acc_dtype(dt));
}

template <class T, class I>
static __global__ void colreduce_kernel(int64_t rows, int64_t cols, const T *a, int64_t a_rs,
                                        int64_t a_cs, const T *b, int64_t b_rs, int64_t b_cs,
                                        const I *b_index, int64_t b_index_stride,
                                        int64_t b_index_limit, const T *col_scale,
                                        int64_t col_scale_stride, T *scaled, int64_t s_rs,
                                        int64_t s_cs, typename Num<T>::acc *partial, int accumulate)
{
    typedef typename Num<T>::acc Acc;
    __shared__ Acc tile[kRowThreads][kColTile];
    const int64_t j = (int64_t)blockIdx.x * kColTile + threadIdx.x;
    Acc sum = 0;
    if (j < cols) {
        const Acc l = col_scale ? Num<T>::load(col_scale[j * col_scale_stride]) : Acc(1);
        for (int64_t i = (int64_t)blockIdx.y * kRowThreads + threadIdx.y; i < rows;
             i += (int64_t)gridDim.y * kRowThreads) {
            Acc v = Num<T>::load(a[i * a_rs + j * a_cs]);
            if (scaled)
                scaled[i * s_rs + j * s_cs] = Num<T>::store(v * l);
            if (b) {
                int64_t row = i;
                if (b_index) {
                    row = (int64_t)b_index[i * b_index_stride];
                    if (row < 0 || row >= b_index_limit)
                        continue;
                }
                v *= Num<T>::load(b[row * b_rs + j * b_cs]);
            }
            sum += v;
        }
    }
    tile[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && j < cols) {
        Acc total = 0;
        for (int r = 0; r < kRowThreads; ++r)
            total += tile[r][threadIdx.x];
        Acc *slot = partial + (int64_t)blockIdx.y * cols + j;
        *slot = accumulate ? *slot + total : total;
    }
}

/* colreduce_kernel for unit-stride columns and no row index: each thread owns 4 consecutive
 * columns with wide loads (the scalar kernel moved about 1 TB/s on an H200:
 * gpu-runs/2026-11-30-18e3f0a/profile.txt, colreduce_kernel). Rows are assigned to threads
 * exactly as there, so every column is summed in the same order and the result has the same
 * bits. */
template <class T>
static __global__ void colreduce_vec_kernel(int64_t rows, int64_t cols, const T *a, int64_t a_rs,
                                            const T *b, int64_t b_rs, const T *col_scale,
                                            int64_t col_scale_stride, T *scaled, int64_t s_rs,
                                            typename Num<T>::acc *partial, int accumulate)
{
    typedef typename Num<T>::acc Acc;
    __shared__ Acc tile[kRowThreads][kColTile * 4];
    const int64_t j0 = ((int64_t)blockIdx.x * kColTile + threadIdx.x) * 4;
    Acc sum[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    if (j0 < cols) {
        Acc l[4];
#pragma unroll
        for (int q = 0; q < 4; ++q)
            l[q] = col_scale && j0 + q < cols
                       ? (Acc)Num<T>::load(col_scale[(j0 + q) * col_scale_stride])
                       : Acc(1);
        for (int64_t i = (int64_t)blockIdx.y * kRowThreads + threadIdx.y; i < rows;
             i += (int64_t)gridDim.y * kRowThreads) {
            Acc v[4];
            load4(a + i * a_rs, 1, j0, cols, v);
            if (scaled) {
                Acc w[4];
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    w[q] = v[q] * l[q];
                store4(scaled + i * s_rs, 1, j0, cols, w);
            }
            if (b) {
                Acc u[4];
                load4(b + i * b_rs, 1, j0, cols, u);
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    v[q] *= u[q];
            }
#pragma unroll
            for (int q = 0; q < 4; ++q)
                sum[q] += v[q];
        }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q)
        tile[threadIdx.y][threadIdx.x * 4 + q] = sum[q];
    __syncthreads();
    if (threadIdx.y != 0)
        return;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        if (j0 + q >= cols)
            break;
        Acc total = 0;
        for (int r = 0; r < kRowThreads; ++r)
            total += tile[r][threadIdx.x * 4 + q];
        Acc *slot = partial + (int64_t)blockIdx.y * cols + j0 + q;
        *slot = accumulate ? *slot + total : total;
    }
}

int colreduce_accumulate(cpeft_dtype dt, int64_t rows, int64_t cols, const cpeft_mat &a,
                         const ColReduceOperand &b, const cpeft_vec *col_scale,
                         const cpeft_mat *scaled_out, void *partial, int accumulate,
                         cudaStream_t stream, cpeft_status *st)
{
    if (cols == 0)
        return CPEFT_OK;
    int64_t gx = (cols + kColTile - 1) / kColTile;
    if (gx > INT_MAX)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, "column reduction over %lld columns",
                          (long long)cols);
    const dim3 grid((unsigned)gx, kSlices), block(kColTile, kRowThreads);
    const bool unit_stride = a.col_stride == 1 && !b.index && (!b.data || b.col_stride == 1) &&
                             (!scaled_out || scaled_out->col_stride == 1);
    if (unit_stride) {
        const dim3 vec_grid((unsigned)((cols + 4 * kColTile - 1) / (4 * kColTile)), kSlices);
        return dispatch_float(dt, st, [&](auto tag) {
            typedef typename decltype(tag)::type T;
            typedef typename Num<T>::acc Acc;
            colreduce_vec_kernel<T><<<vec_grid, block, 0, stream>>>(
                rows, cols, static_cast<const T *>(a.data), a.row_stride,
                static_cast<const T *>(b.data), b.row_stride,
                col_scale ? static_cast<const T *>(col_scale->data) : nullptr,
                col_scale ? col_scale->stride : 0,
                scaled_out ? static_cast<T *>(scaled_out->data) : nullptr,
                scaled_out ? scaled_out->row_stride : 0, static_cast<Acc *>(partial), accumulate);
            CPEFT_LAUNCH_CHECK(st, "colreduce_vec_kernel");
            return (int)CPEFT_OK;
        });
    }
    cpeft_dtype index_dt = b.index ? b.index_dtype : CPEFT_INT32;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        return dispatch_index(index_dt, st, [&](auto itag) {
            typedef typename decltype(itag)::type I;
            colreduce_kernel<T, I><<<grid, block, 0, stream>>>(
                rows, cols, static_cast<const T *>(a.data), a.row_stride, a.col_stride,
                static_cast<const T *>(b.data), b.row_stride, b.col_stride,
                static_cast<const I *>(b.index), b.index_stride, b.index_limit,
                col_scale ? static_cast<const T *>(col_scale->data) : nullptr,
                col_scale ? col_scale->stride : 0,
                scaled_out ? static_cast<T *>(scaled_out->data) : nullptr,
                scaled_out ? scaled_out->row_stride : 0, scaled_out ? scaled_out->col_stride : 0,
                static_cast<Acc *>(partial), accumulate);
            CPEFT_LAUNCH_CHECK(st, "colreduce_kernel");
            return (int)CPEFT_OK;
        });
    });
}

template <class T>
static __global__ void colreduce_finalize_kernel(int64_t cols, const typename Num<T>::acc *partial,
                                                 const T *post, int64_t post_stride, T *out,
                                                 int64_t out_stride)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x) {
        Acc total = 0;
        for (int p = 0; p < kSlices; ++p)
            total += partial[(int64_t)p * cols + j];
        if (post)
            total *= Num<T>::load(post[j * post_stride]);
        out[j * out_stride] = Num<T>::store(total);
    }
}

int colreduce_finalize(cpeft_dtype dt, int64_t cols, const void *partial, const cpeft_vec *post,
                       const cpeft_vec &out, cudaStream_t stream, cpeft_status *st)
{
    if (cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        colreduce_finalize_kernel<T><<<grid_1d(cols, kElementBlock), kElementBlock, 0, stream>>>(
            cols, static_cast<const Acc *>(partial),
            post ? static_cast<const T *>(post->data) : nullptr, post ? post->stride : 0,
            static_cast<T *>(out.data), out.stride);
        CPEFT_LAUNCH_CHECK(st, "colreduce_finalize_kernel");
        return (int)CPEFT_OK;
    });
}

} /* namespace cpeft_cuda */
