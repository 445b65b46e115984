/* The radix sort of embedding indices into runs and the run scatter (see index_runs.cuh). */
#include "index_runs.cuh"

#include <cub/device/device_radix_sort.cuh>

#include <climits>

#include "kernel_support.cuh"
#include "stream_context.cuh"
#include "status.cuh"

namespace cpeft_cuda {

static int key_bits(int64_t v)
{
    int bits = 1;
    while (bits < 32 && ((uint64_t)v >> bits) != 0)
        ++bits;
    return bits;
}

static int sort_temp_bytes(int64_t n, int64_t v, size_t *bytes, cpeft_status *st)
{
    *bytes = 0;
    CPEFT_CUDA_CHECK(st,
                     cub::DeviceRadixSort::SortPairs(nullptr, *bytes, (const uint32_t *)nullptr,
                                                     (uint32_t *)nullptr, (const int32_t *)nullptr,
                                                     (int32_t *)nullptr, (int)n, 0, key_bits(v)));
    return CPEFT_OK;
}

static int check_runs_limits(int64_t n, int64_t v, cpeft_status *st)
{
    if (n > INT_MAX)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED,
                          "CUDA embedding backward: %lld indices (at most %d supported)",
                          (long long)n, INT_MAX);
    if (v >= (int64_t)UINT32_MAX)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED,
                          "CUDA embedding backward: vocabulary of %lld rows (below 2^32 supported)",
                          (long long)v);
    return CPEFT_OK;
}

int index_runs_bytes(int64_t n, int64_t v, size_t *bytes, cpeft_status *st)
{
    CPEFT_TRY(check_runs_limits(n, v, st));
    size_t sort_bytes = 0;
    CPEFT_TRY(sort_temp_bytes(n, v, &sort_bytes, st));
    const size_t vec = (size_t)(n > 0 ? n : 1) * 4;
    *bytes = 4 * ws_align(vec) + ws_align(sort_bytes);
    return CPEFT_OK;
}

template <class I>
static __global__ void make_keys_kernel(const I *indices, int64_t stride, int64_t n, int64_t v,
                                        int64_t padding_idx, uint32_t sentinel, uint32_t *keys,
                                        int32_t *order)
{
    for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < n;
         p += (int64_t)gridDim.x * blockDim.x) {
        const int64_t k = (int64_t)indices[p * stride];
        keys[p] = (k < 0 || k >= v || k == padding_idx) ? sentinel : (uint32_t)k;
        order[p] = (int32_t)p;
    }
}

int index_runs_build(const cpeft_vec &indices, cpeft_dtype index_dtype, int64_t v,
                     int64_t padding_idx, void *ws, size_t ws_bytes, IndexRuns *runs,
                     cudaStream_t stream, cpeft_status *st)
{
    const int64_t n = indices.len;
    CPEFT_TRY(check_runs_limits(n, v, st));
    size_t sort_bytes = 0;
    CPEFT_TRY(sort_temp_bytes(n, v, &sort_bytes, st));
    const size_t vec = (size_t)(n > 0 ? n : 1) * 4;
    if (ws_bytes < 4 * ws_align(vec) + ws_align(sort_bytes))
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "index_runs_build: workspace too small");
    Carver carve(ws);
    uint32_t *keys_in = static_cast<uint32_t *>(carve.take(vec));
    uint32_t *keys_out = static_cast<uint32_t *>(carve.take(vec));
    int32_t *order_in = static_cast<int32_t *>(carve.take(vec));
    int32_t *order_out = static_cast<int32_t *>(carve.take(vec));
    void *sort_temp = carve.take(sort_bytes);
    runs->keys = keys_out;
    runs->order = order_out;
    runs->n = n;
    runs->sentinel = (uint32_t)v;
    if (n == 0)
        return CPEFT_OK;
    CPEFT_TRY(dispatch_index(index_dtype, st, [&](auto itag) {
        typedef typename decltype(itag)::type I;
        make_keys_kernel<I><<<grid_1d(n, kElementBlock), kElementBlock, 0, stream>>>(
            static_cast<const I *>(indices.data), indices.stride, n, v, padding_idx, (uint32_t)v,
            keys_in, order_in);
        CPEFT_LAUNCH_CHECK(st, "make_keys_kernel");
        return (int)CPEFT_OK;
    }));
    CPEFT_CUDA_CHECK(st, cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, keys_in, keys_out,
                                                         order_in, order_out, (int)n, 0,
                                                         key_bits(v), stream));
    return CPEFT_OK;
}

/* One block per sorted position; only the first position of each run does work, so every
 * destination row is written by exactly one block and no atomics are needed. */
template <class S, class T>
static __global__ void scatter_runs_kernel(const uint32_t *keys, const int32_t *order, int64_t n,
                                           uint32_t sentinel, const S *src, int64_t src_rs,
                                           int64_t src_cs, int64_t cols, typename Num<T>::acc scale,
                                           const T *col_scale, int64_t col_scale_stride, T *dst,
                                           int64_t dst_ks, int64_t dst_cs)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t p = blockIdx.x; p < n; p += gridDim.x) {
        const uint32_t key = keys[p];
        if (key == sentinel || (p > 0 && keys[p - 1] == key))
            continue;
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
            Acc sum = 0;
            for (int64_t q = p; q < n && keys[q] == key; ++q)
                sum += (Acc)Num<S>::load(src[(int64_t)order[q] * src_rs + c * src_cs]);
            sum *= scale;
            if (col_scale)
                sum *= Num<T>::load(col_scale[c * col_scale_stride]);
            dst[(int64_t)key * dst_ks + c * dst_cs] = Num<T>::store(sum);
        }
    }
}

int scatter_runs(cpeft_dtype dt, const IndexRuns &runs, const void *src, int src_is_acc,
                 int64_t src_row_stride, int64_t src_col_stride, int64_t cols, double scale,
                 const cpeft_vec *col_scale, void *dst, int64_t dst_key_stride,
                 int64_t dst_col_stride, cudaStream_t stream, cpeft_status *st)
{
    if (runs.n == 0 || cols == 0)
        return CPEFT_OK;
    const int block = cols >= 256 ? 256 : (int)((cols + 31) / 32 * 32);
    const unsigned grid = (unsigned)(runs.n < 65535 ? runs.n : 65535);
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        const T *cs = col_scale ? static_cast<const T *>(col_scale->data) : nullptr;
        const int64_t css = col_scale ? col_scale->stride : 0;
        if (src_is_acc)
            scatter_runs_kernel<Acc, T>
                <<<grid, block, 0, stream>>>(runs.keys, runs.order, runs.n, runs.sentinel,
                                             static_cast<const Acc *>(src), src_row_stride,
                                             src_col_stride, cols, (Acc)scale, cs, css,
                                             static_cast<T *>(dst), dst_key_stride, dst_col_stride);
        else
            scatter_runs_kernel<T, T>
                <<<grid, block, 0, stream>>>(runs.keys, runs.order, runs.n, runs.sentinel,
                                             static_cast<const T *>(src), src_row_stride,
                                             src_col_stride, cols, (Acc)scale, cs, css,
                                             static_cast<T *>(dst), dst_key_stride, dst_col_stride);
        CPEFT_LAUNCH_CHECK(st, "scatter_runs_kernel");
        return (int)CPEFT_OK;
    });
}

} /* namespace cpeft_cuda */
