/*
 * LoRA linear over mixed-adapter batches on the GPU (lora_grouped.h).
 *
 * The row counts per adapter size the GEMMs, so the index comes back to the host once per call
 * (one stream sync, as peft's per-adapter loop has) and is grouped there by a stable counting
 * sort; the resulting row order goes to the device. Then, all on the stream:
 *   xs = drop(x)[order]                   one gather launch over every adapter row
 *   xa_s,g = xs_g·A_gᵀ, d_g = s_g·xa_s,g·B_gᵀ   a GEMM pair per adapter (cuBLAS, loop on the
 * stream) y = x·Wᵀ + b, then y[order] += d      one scatter launch Backward mirrors it: g and xa
 * gathered once, per adapter grad_b_g, gb_g = g_g·B_g, grad_a_g and gb_g·A_g, then one masked
 * scatter-add into grad_x = g·W. A first step: the per-adapter GEMMs are a loop of cuBLAS calls,
 * not one grouped launch (cublasGemmGroupedBatchedEx would make them one).
 */
#include "cpeft/lora_grouped.h"

#include <cstdlib>

#include "cpeft/views.h"
#include "colreduce.cuh"
#include "elementwise.cuh"
#include "gemm.cuh"
#include "kernel_support.cuh"
#include "status.cuh"
#include "stream_context.cuh"

namespace cpeft_cuda {
namespace {

/* Host-side grouping: order[start[g] .. start[g+1]) are the rows of adapter g, in batch order. */
struct HostGrouping {
    int64_t *order = nullptr;
    int64_t *start = nullptr;
    ~HostGrouping()
    {
        std::free(order);
        std::free(start);
    }
    int64_t rows() const { return start ? start[adapters] : 0; }
    int64_t adapters = 0;
};

int group_rows_on_host(const cpeft_lora_grouped_args *a, Session &s, HostGrouping *gr,
                       cpeft_status *st)
{
    const int64_t m = a->m, g_count = a->adapters;
    const size_t isz = cpeft_dtype_size(a->index_dtype);
    const int64_t span = m > 0 ? (m - 1) * a->index.stride + 1 : 0;
    void *host_index = std::malloc(span > 0 ? (size_t)span * isz : 1);
    gr->order = static_cast<int64_t *>(std::malloc(sizeof(int64_t) * (size_t)(m > 0 ? m : 1)));
    gr->start = static_cast<int64_t *>(std::calloc((size_t)g_count + 1, sizeof(int64_t)));
    gr->adapters = g_count;
    int64_t *next = static_cast<int64_t *>(std::malloc(sizeof(int64_t) * (size_t)g_count));
    if (host_index == nullptr || gr->order == nullptr || gr->start == nullptr || next == nullptr) {
        std::free(host_index);
        std::free(next);
        return cpeft_fail(st, CPEFT_ERR_NOMEM, "lora_grouped: cannot allocate the row grouping");
    }
    int rc = CPEFT_OK;
    if (span > 0) {
        cudaError_t err = cudaMemcpyAsync(host_index, a->index.data, (size_t)span * isz,
                                          cudaMemcpyDeviceToHost, s.stream);
        if (err == cudaSuccess)
            err = cudaStreamSynchronize(s.stream);
        if (err != cudaSuccess)
            rc = fail_cuda(st, err, "cudaMemcpyAsync(index to host)", __FILE__, __LINE__, __func__);
    }
    for (int pass = 0; pass < 2 && rc == CPEFT_OK; ++pass) {
        for (int64_t i = 0; i < m; ++i) {
            const int64_t e = i * a->index.stride;
            const int64_t g = a->index_dtype == CPEFT_INT32 ? static_cast<int32_t *>(host_index)[e]
                                                            : static_cast<int64_t *>(host_index)[e];
            if (g < -1 || g >= g_count) {
                rc = cpeft_fail(st, CPEFT_ERR_INDEX,
                                "lora_grouped: index[%lld] = %lld is outside "
                                "[-1, %lld)",
                                (long long)i, (long long)g, (long long)g_count);
                break;
            }
            if (g < 0)
                continue;
            if (pass == 0)
                gr->start[g + 1] += 1;
            else
                gr->order[next[g]++] = i;
        }
        if (pass == 0 && rc == CPEFT_OK) {
            for (int64_t g = 0; g < g_count; ++g) {
                gr->start[g + 1] += gr->start[g];
                next[g] = gr->start[g];
            }
        }
    }
    std::free(host_index);
    std::free(next);
    return rc;
}

/* dst (n x cols, dense) = src[order[i]] rows, multiplied by the dropout factor of element
 * (order[i], j) when use_dropout (counter order[i] * cols + j, cols = IN). */
template <class T>
__global__ void gather_rows_kernel(int64_t n, int64_t cols, const int64_t *order, const T *src,
                                   int64_t s_rs, int64_t s_cs, T *dst, cpeft_dropout d,
                                   int use_dropout)
{
    typedef typename Num<T>::acc Acc;
    const Acc keep_scale = (Acc)cpeft_dropout_keep_scale(d.p);
    const int64_t total = n * cols;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e / cols, j = e - i * cols, row = order[i];
        Acc v = Num<T>::load(src[row * s_rs + j * s_cs]);
        if (use_dropout)
            v = v * (cpeft_dropout_keep(&d, (uint64_t)(row * cols + j)) ? keep_scale : (Acc)0);
        dst[e] = Num<T>::store(v);
    }
}

/* dst[order[i]] (+)= factor ⊙ src[i] for src (n x cols, dense); factor as in gather. */
template <class T>
__global__ void scatter_rows_kernel(int64_t n, int64_t cols, const int64_t *order, const T *src,
                                    T *dst, int64_t d_rs, int64_t d_cs, int accumulate,
                                    cpeft_dropout d, int use_dropout)
{
    typedef typename Num<T>::acc Acc;
    const Acc keep_scale = (Acc)cpeft_dropout_keep_scale(d.p);
    const int64_t total = n * cols;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e / cols, j = e - i * cols, row = order[i];
        Acc v = Num<T>::load(src[e]);
        if (use_dropout)
            v = v * (cpeft_dropout_keep(&d, (uint64_t)(row * cols + j)) ? keep_scale : (Acc)0);
        T *target = dst + row * d_rs + j * d_cs;
        *target = Num<T>::store(accumulate ? Num<T>::load(*target) + v : v);
    }
}

int gather_rows(cpeft_dtype dt, int64_t n, int64_t cols, const int64_t *order, const cpeft_mat &src,
                void *dst, const cpeft_dropout *d, cudaStream_t stream, cpeft_status *st)
{
    if (n * cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        gather_rows_kernel<T><<<grid_1d(n * cols, 256), 256, 0, stream>>>(
            n, cols, order, static_cast<const T *>(src.data), src.row_stride, src.col_stride,
            static_cast<T *>(dst), d ? *d : cpeft_dropout{0.0, 0, 0}, d != nullptr && d->p > 0.0);
        CPEFT_LAUNCH_CHECK(st, "gather_rows_kernel");
        return (int)CPEFT_OK;
    });
}

int scatter_rows(cpeft_dtype dt, int64_t n, int64_t cols, const int64_t *order, const void *src,
                 const cpeft_mat &dst, int accumulate, const cpeft_dropout *d, cudaStream_t stream,
                 cpeft_status *st)
{
    if (n * cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        scatter_rows_kernel<T><<<grid_1d(n * cols, 256), 256, 0, stream>>>(
            n, cols, order, static_cast<const T *>(src), static_cast<T *>(dst.data), dst.row_stride,
            dst.col_stride, accumulate, d ? *d : cpeft_dropout{0.0, 0, 0},
            d != nullptr && d->p > 0.0);
        CPEFT_LAUNCH_CHECK(st, "scatter_rows_kernel");
        return (int)CPEFT_OK;
    });
}

/* The device copy of the row order, carved from the workspace. */
int upload_order(const HostGrouping &gr, void *order_dev, cudaStream_t stream, cpeft_status *st)
{
    if (gr.rows() == 0)
        return CPEFT_OK;
    /* From pageable memory: the call returns once the source is staged, so the host buffer may
     * be freed right after it. */
    CPEFT_CUDA_CHECK(st, cudaMemcpyAsync(order_dev, gr.order, sizeof(int64_t) * (size_t)gr.rows(),
                                         cudaMemcpyHostToDevice, stream));
    return CPEFT_OK;
}

} /* namespace */
} /* namespace cpeft_cuda */

using namespace cpeft_cuda;

int cpeft_lora_grouped_fwd_cuda(const cpeft_lora_grouped_args *a,
                                const cpeft_lora_grouped_fwd_out *o, void *stream, cpeft_status *st)
{
    Session s;
    CPEFT_TRY(s.open(stream, st));
    HostGrouping gr;
    CPEFT_TRY(group_rows_on_host(a, s, &gr, st));
    const cpeft_dtype dt = a->dtype;
    const size_t elt = cpeft_dtype_size(dt);
    const int64_t n = gr.rows(), in = a->in, out = a->out, rmax = a->r_max;

    const size_t order_bytes = ws_align(sizeof(int64_t) * (size_t)n);
    const size_t xs_bytes = ws_align((size_t)(n * in) * elt);
    const size_t xas_bytes = ws_align((size_t)(n * rmax) * elt);
    const size_t ds_bytes = ws_align((size_t)(n * out) * elt);
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(order_bytes + xs_bytes + xas_bytes + ds_bytes + 256, &ws, st));
    Carver carve(ws);
    int64_t *order = static_cast<int64_t *>(carve.take(order_bytes));
    void *xs = carve.take(xs_bytes), *xas = carve.take(xas_bytes), *ds = carve.take(ds_bytes);
    CPEFT_TRY(upload_order(gr, order, s.stream, st));

    /* y = x·Wᵀ + b over every row. */
    if (a->bias.data)
        CPEFT_TRY(broadcast_rows(dt, o->y, a->bias, nullptr, s.stream, st));
    CPEFT_TRY(gemm(s, dt, dt, 1.0, a->x, cpeft_mat_transpose(a->weight), a->bias.data ? 1.0 : 0.0,
                   o->y, st));
    CPEFT_TRY(zero_fill(o->xa, elt, s.stream, st));
    if (n == 0)
        return CPEFT_OK;

    CPEFT_TRY(gather_rows(dt, n, in, order, a->x, xs, &a->dropout, s.stream, st));
    const cpeft_mat xas_all = cpeft_mat_compact(xas, n, rmax);
    CPEFT_TRY(zero_fill(xas_all, elt, s.stream, st));
    for (int64_t g = 0, off = 0; g < a->adapters; off += a->ranks[g], ++g) {
        const int64_t first = gr.start[g], rows = gr.start[g + 1] - first, r = a->ranks[g];
        if (rows == 0)
            continue;
        const cpeft_mat xs_g = cpeft_mat_sub(dt, cpeft_mat_compact(xs, n, in), first, rows, 0, in);
        const cpeft_mat xas_g = cpeft_mat_sub(dt, xas_all, first, rows, 0, r);
        const cpeft_mat ds_g = cpeft_mat_sub(dt, cpeft_mat_compact(ds, n, out), first, rows, 0,
                                             out);
        const cpeft_mat a_g = cpeft_mat_sub(dt, a->lora_a, off, r, 0, in);
        const cpeft_mat b_g = cpeft_mat_sub(dt, a->lora_b, 0, out, off, r);
        CPEFT_TRY(gemm(s, dt, dt, 1.0, xs_g, cpeft_mat_transpose(a_g), 0.0, xas_g, st));
        CPEFT_TRY(gemm(s, dt, dt, a->scales[g], xas_g, cpeft_mat_transpose(b_g), 0.0, ds_g, st));
    }
    CPEFT_TRY(scatter_rows(dt, n, rmax, order, xas, o->xa, 0, nullptr, s.stream, st));
    return scatter_rows(dt, n, out, order, ds, o->y, 1, nullptr, s.stream, st);
}

int cpeft_lora_grouped_bwd_cuda(const cpeft_lora_grouped_args *a,
                                const cpeft_lora_grouped_bwd_in *in,
                                const cpeft_lora_grouped_bwd_out *o, void *stream, cpeft_status *st)
{
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = a->dtype;
    const size_t elt = cpeft_dtype_size(dt);
    const int64_t m = a->m, n_in = a->in, out = a->out, rmax = a->r_max;
    const cpeft_mat &g = in->grad_out;
    const bool want_x = o->grad_x.data != nullptr, want_a = o->grad_a.data != nullptr,
               want_b = o->grad_b.data != nullptr;

    HostGrouping gr;
    if (want_x || want_a || want_b)
        CPEFT_TRY(group_rows_on_host(a, s, &gr, st));
    const int64_t n = gr.rows();
    const size_t partial_bytes = o->grad_bias.data ? ws_align(colreduce_partial_bytes(dt, out)) : 0;
    const size_t order_bytes = ws_align(sizeof(int64_t) * (size_t)n);
    const size_t gs_bytes = ws_align((size_t)(n * out) * elt);
    const size_t r_bytes = ws_align((size_t)(n * rmax) * elt);
    const size_t xs_bytes = (want_a || want_x) ? ws_align((size_t)(n * n_in) * elt) : 0;
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(partial_bytes + order_bytes + gs_bytes + 2 * r_bytes + xs_bytes + 256,
                          &ws, st));
    Carver carve(ws);
    void *partial = carve.take(partial_bytes);
    int64_t *order = static_cast<int64_t *>(carve.take(order_bytes));
    void *gs = carve.take(gs_bytes), *xas = carve.take(r_bytes), *gb = carve.take(r_bytes);
    void *xs = carve.take(xs_bytes);

    if (want_x)
        CPEFT_TRY(gemm(s, dt, dt, 1.0, g, a->weight, 0.0, o->grad_x, st));
    if (o->grad_bias.data) {
        const ColReduceOperand none = {nullptr, 0, 0, nullptr, CPEFT_INT32, 0, 0};
        CPEFT_TRY(colreduce_accumulate(dt, m, out, g, none, nullptr, nullptr, partial, 0, s.stream,
                                       st));
        CPEFT_TRY(colreduce_finalize(dt, out, partial, nullptr, o->grad_bias, s.stream, st));
    }
    if (o->grad_weight.data)
        CPEFT_TRY(gemm(s, dt, dt, 1.0, cpeft_mat_transpose(g), a->x, 0.0, o->grad_weight, st));
    if (want_a)
        CPEFT_TRY(zero_fill(o->grad_a, elt, s.stream, st));
    if (want_b)
        CPEFT_TRY(zero_fill(o->grad_b, elt, s.stream, st));
    if (n == 0 || !(want_x || want_a || want_b))
        return CPEFT_OK;

    CPEFT_TRY(upload_order(gr, order, s.stream, st));
    CPEFT_TRY(gather_rows(dt, n, out, order, g, gs, nullptr, s.stream, st));
    if (want_b)
        CPEFT_TRY(gather_rows(dt, n, rmax, order, in->xa, xas, nullptr, s.stream, st));
    if (want_a)
        CPEFT_TRY(gather_rows(dt, n, n_in, order, a->x, xs, &a->dropout, s.stream, st));
    for (int64_t grp = 0, off = 0; grp < a->adapters; off += a->ranks[grp], ++grp) {
        const int64_t first = gr.start[grp], rows = gr.start[grp + 1] - first, r = a->ranks[grp];
        if (rows == 0)
            continue;
        const double scale = a->scales[grp];
        const cpeft_mat gs_g = cpeft_mat_sub(dt, cpeft_mat_compact(gs, n, out), first, rows, 0,
                                             out);
        const cpeft_mat xas_g = cpeft_mat_sub(dt, cpeft_mat_compact(xas, n, rmax), first, rows, 0,
                                              r);
        const cpeft_mat gb_g = cpeft_mat_sub(dt, cpeft_mat_compact(gb, n, rmax), first, rows, 0, r);
        const cpeft_mat xs_g = cpeft_mat_sub(dt, cpeft_mat_compact(xs, n, n_in), first, rows, 0,
                                             n_in);
        const cpeft_mat a_g = cpeft_mat_sub(dt, a->lora_a, off, r, 0, n_in);
        const cpeft_mat b_g = cpeft_mat_sub(dt, a->lora_b, 0, out, off, r);
        if (want_b)
            CPEFT_TRY(gemm(s, dt, dt, scale, cpeft_mat_transpose(gs_g), xas_g, 0.0,
                           cpeft_mat_sub(dt, o->grad_b, 0, out, off, r), st));
        if (!want_a && !want_x)
            continue;
        CPEFT_TRY(gemm(s, dt, dt, 1.0, gs_g, b_g, 0.0, gb_g, st));
        if (want_a)
            CPEFT_TRY(gemm(s, dt, dt, scale, cpeft_mat_transpose(gb_g), xs_g, 0.0,
                           cpeft_mat_sub(dt, o->grad_a, off, r, 0, n_in), st));
        /* xs_g is free once grad_a_g is queued: stream order keeps the two uses apart. */
        if (want_x)
            CPEFT_TRY(gemm(s, dt, dt, scale, gb_g, a_g, 0.0, xs_g, st));
    }
    if (want_x)
        return scatter_rows(dt, n, n_in, order, xs, o->grad_x, 1, &a->dropout, s.stream, st);
    return CPEFT_OK;
}
