/*
 * LoRA linear on the GPU (lora_linear.h): cuBLAS for the two base-sized products, the rank-r
 * kernels of rank_r.cu for the skinny ones, fused so that no temporary of y's or x's full size
 * exists and nothing but xa (M x R*K) outlives the forward.
 *
 * Forward, in this order:
 *   xa = drop(x)·Aᵀ                   (rank_project: x read once, the mask regenerated inside)
 *   y  = s·xa_k·B_kᵀ per block         (cuBLAS, beta = 0, or beta = 1 onto a bias / zero pre-fill)
 *   y += x·Wᵀ                          (cuBLAS, beta = 1)
 * The rank-R product goes first so that its result is the C operand of the big, compute-bound
 * base GEMM, whose epilogue reads it while the main loop is busy; doing it second would cost a
 * separate memory-bound read-modify-write pass over y.
 *
 * Backward: gb = g_blocks·B (M x R*K, scratch, rank_project) feeds grad_a = s·gbᵀ·drop(x)
 * (rank_reduce, x read once) and grad_x; grad_b = s·g_kᵀ·xa_k (rank_reduce). grad_x gets its
 * LoRA part first (s·gb·A by cuBLAS, or with dropout rank_expand_dropout applying the mask as it
 * writes) and the base GEMM g·W accumulates onto it with beta = 1, for the same reason as in
 * forward.
 *
 * CPEFT_CUDA_RANK_R=cublas selects the previous path instead (every product through cuBLAS,
 * drop(x) materialized a bounded row chunk at a time), for comparison on a GPU.
 *
 * fp32 adapters on fp16/bf16 activations (fp32_adapters) take the cuBLAS path: cuBLAS's GemmEx
 * takes one type for both operands, and widening x to fp32 (what peft does) would cost a copy of
 * x's size and fp32 SIMT GEMMs. Instead A and B are rounded to the activation dtype into scratch
 * (R*K x IN and SEG*K x R elements), every product runs on 16-bit tensor cores with fp32
 * accumulation, and grad_a / grad_b are written as fp32 C operands, so the master weights'
 * gradients are never rounded to 16 bits. (The rank-r kernels are templated on the adapter type
 * but compiled for same-dtype adapters only.)
 */
#include "cpeft/lora_linear.h"

#include "cpeft/views.h"
#include "colreduce.cuh"
#include "dropout_rows.cuh"
#include "elementwise.cuh"
#include "gemm.cuh"
#include "kernel_support.cuh"
#include "rank_r.cuh"
#include "status.cuh"
#include "stream_context.cuh"

namespace cpeft_cuda {
namespace {

/* Rows per dropout chunk are chosen so a chunk holds about this many elements (32 MiB in fp32):
 * large enough that the chunked GEMMs run at full speed, small enough to stay a modest cached
 * workspace. */
const int64_t kChunkElems = (int64_t)1 << 23;

struct Groups {
    int64_t seg, k;
    int64_t ids[CPEFT_MAX_GROUPS];     /* the enabled groups, in order */
};

int resolve_groups(const cpeft_lora_linear_args *a, Groups *g, cpeft_status *st)
{
    CPEFT_TRY(cpeft_lora_groups(a, &g->seg, &g->k, st));
    int64_t k = 0;
    for (int64_t i = 0; i < a->groups; ++i)
        if (a->enabled[i])
            g->ids[k++] = i;
    return CPEFT_OK;
}

int64_t chunk_rows(int64_t m, int64_t in)
{
    int64_t rows = in > 0 ? kChunkElems / in : m;
    if (rows < 1)
        rows = 1;
    if (rows > m)
        rows = m;
    return rows;
}

/* The adapters as the products read them: lora_a and lora_b themselves, or, with fp32 adapters,
 * copies rounded to the activation dtype (dense, in the workspace carved by the caller). */
struct Adapters {
    cpeft_mat a, b;
};

size_t adapter_copy_bytes(const cpeft_lora_linear_args *a)
{
    if (!a->fp32_adapters)
        return 0;
    const size_t elt = cpeft_dtype_size(a->dtype);
    return ws_align((size_t)(a->lora_a.rows * a->lora_a.cols) * elt) +
           ws_align((size_t)(a->lora_b.rows * a->lora_b.cols) * elt);
}

template <class T>
static __global__ void round_fp32_kernel(int64_t rows, int64_t cols, const float *src, int64_t s_rs,
                                         int64_t s_cs, T *dst)
{
    const int64_t n = rows * cols;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e / cols, j = e - i * cols;
        dst[e] = Num<T>::store(src[i * s_rs + j * s_cs]);
    }
}

/* dst (dense row-major, dtype dt) = src (fp32, any layout), rounded to nearest. */
int round_fp32(cpeft_dtype dt, const cpeft_mat &src, void *dst, cudaStream_t stream,
               cpeft_status *st)
{
    const int64_t n = src.rows * src.cols;
    if (n == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        round_fp32_kernel<T><<<grid_1d(n, 256), 256, 0, stream>>>(
            src.rows, src.cols, static_cast<const float *>(src.data), src.row_stride,
            src.col_stride, static_cast<T *>(dst));
        CPEFT_LAUNCH_CHECK(st, "round_fp32_kernel");
        return (int)CPEFT_OK;
    });
}

int prepare_adapters(const cpeft_lora_linear_args *a, Carver &carve, cudaStream_t stream,
                     Adapters *out, cpeft_status *st)
{
    out->a = a->lora_a;
    out->b = a->lora_b;
    if (!a->fp32_adapters)
        return CPEFT_OK;
    const size_t elt = cpeft_dtype_size(a->dtype);
    void *a_copy = carve.take((size_t)(a->lora_a.rows * a->lora_a.cols) * elt);
    void *b_copy = carve.take((size_t)(a->lora_b.rows * a->lora_b.cols) * elt);
    CPEFT_TRY(round_fp32(a->dtype, a->lora_a, a_copy, stream, st));
    CPEFT_TRY(round_fp32(a->dtype, a->lora_b, b_copy, stream, st));
    out->a = cpeft_mat_compact(a_copy, a->lora_a.rows, a->lora_a.cols);
    out->b = cpeft_mat_compact(b_copy, a->lora_b.rows, a->lora_b.cols);
    return CPEFT_OK;
}

} /* namespace */
} /* namespace cpeft_cuda */

using namespace cpeft_cuda;

int cpeft_lora_linear_fwd_cuda(const cpeft_lora_linear_args *a, const cpeft_lora_linear_fwd_out *o,
                               void *stream, cpeft_status *st)
{
    Groups grp;
    CPEFT_TRY(resolve_groups(a, &grp, st));
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = a->dtype;
    const size_t elt = cpeft_dtype_size(dt);
    const int64_t m = a->m, in = a->in, r = a->r, rk = a->r * grp.k;
    const bool dropout = a->dropout.p > 0.0;
    const bool rank_r = rank_r_kernels_enabled() && !a->fp32_adapters;
    const bool chunked = !rank_r && dropout && rk > 0;
    const int64_t rows = chunk_rows(m, in);

    const size_t chunk_bytes = chunked ? ws_align((size_t)(rows * in) * elt) : 0;
    const size_t copy_bytes = adapter_copy_bytes(a);
    void *workspace = nullptr;
    if (chunk_bytes + copy_bytes > 0)
        CPEFT_TRY(s.workspace(chunk_bytes + copy_bytes, &workspace, st));
    Carver carve(workspace);
    void *ws = carve.take(chunk_bytes);
    Adapters ad;
    CPEFT_TRY(prepare_adapters(a, carve, s.stream, &ad, st));

    /* xa = drop(x)·Aᵀ */
    const cpeft_mat a_t = cpeft_mat_transpose(ad.a);
    if (rank_r) {
        CPEFT_TRY(rank_project(dt, a->x, &a->dropout, a->lora_a, o->xa, s.stream, st));
    } else if (!chunked) {
        CPEFT_TRY(gemm(s, dt, dt, 1.0, a->x, a_t, 0.0, o->xa, st));
    } else {
        for (int64_t row0 = 0; row0 < m; row0 += rows) {
            const int64_t n = m - row0 < rows ? m - row0 : rows;
            CPEFT_TRY(dropout_rows(dt, &a->dropout, a->x, row0, n, ws, s.stream, st));
            CPEFT_TRY(gemm(s, dt, dt, 1.0, cpeft_mat_compact(ws, n, in), a_t, 0.0,
                           cpeft_mat_sub(dt, o->xa, row0, n, 0, rk), st));
        }
    }

    /* y = bias / 0 pre-fill where a B-product does not cover it, then the B-products. */
    const bool prefill = a->bias.data != nullptr || grp.k < a->groups;
    if (a->bias.data)
        CPEFT_TRY(broadcast_rows(dt, o->y, a->bias, nullptr, s.stream, st));
    else if (prefill)
        CPEFT_TRY(zero_fill(o->y, elt, s.stream, st));
    for (int64_t k = 0; k < grp.k; ++k) {
        const cpeft_mat xa_k = cpeft_mat_sub(dt, o->xa, 0, m, k * r, r);
        const cpeft_mat b_k = cpeft_mat_sub(dt, ad.b, k * grp.seg, grp.seg, 0, r);
        const cpeft_mat y_k = cpeft_mat_sub(dt, o->y, 0, m, grp.ids[k] * grp.seg, grp.seg);
        CPEFT_TRY(gemm(s, dt, dt, a->scale, xa_k, cpeft_mat_transpose(b_k), prefill ? 1.0 : 0.0,
                       y_k, st));
    }

    /* y += x·Wᵀ */
    return gemm(s, dt, dt, 1.0, a->x, cpeft_mat_transpose(a->weight), 1.0, o->y, st);
}

namespace {

/* The LoRA products of backward through the rank-r kernels: gb, grad_b, grad_a and the LoRA
 * part of grad_x (written, for the base GEMM to accumulate onto). */
int lora_backward_rank_r(Session &s, const cpeft_lora_linear_args *a, const Groups &grp,
                         const cpeft_lora_linear_bwd_in *in, const cpeft_lora_linear_bwd_out *o,
                         cpeft_status *st)
{
    const cpeft_dtype dt = a->dtype;
    const size_t elt = cpeft_dtype_size(dt);
    const int64_t m = a->m, n_in = a->in, r = a->r, rk = a->r * grp.k;
    const cpeft_mat &g = in->grad_out;
    const bool want_x = o->grad_x.data != nullptr, want_a = o->grad_a.data != nullptr;
    const bool need_gb = (want_x || want_a) && rk > 0;
    const cpeft_dropout *drop = a->dropout.p > 0.0 ? &a->dropout : nullptr;

    const size_t gb_bytes = need_gb ? ws_align((size_t)(m * rk) * elt) : 0;
    size_t partial_bytes = want_a ? rank_reduce_partial_bytes(dt, m, n_in, rk) : 0;
    if (o->grad_b.data) {
        const size_t b_bytes = rank_reduce_partial_bytes(dt, m, grp.seg, r);
        if (b_bytes > partial_bytes)
            partial_bytes = b_bytes;
    }
    partial_bytes = ws_align(partial_bytes);
    void *ws = nullptr;
    if (gb_bytes + partial_bytes > 0)
        CPEFT_TRY(s.workspace(gb_bytes + partial_bytes, &ws, st));
    Carver carve(ws);
    void *gb_data = carve.take(gb_bytes);
    /* Shared by every rank_reduce below: stream order keeps their uses apart. */
    void *partial = partial_bytes ? carve.take(partial_bytes) : nullptr;
    const cpeft_mat gb = cpeft_mat_compact(gb_data, m, rk);

    for (int64_t k = 0; k < grp.k; ++k) {
        const cpeft_mat g_k = cpeft_mat_sub(dt, g, 0, m, grp.ids[k] * grp.seg, grp.seg);
        const cpeft_mat b_k = cpeft_mat_sub(dt, a->lora_b, k * grp.seg, grp.seg, 0, r);
        if (need_gb)
            CPEFT_TRY(rank_project(dt, g_k, nullptr, cpeft_mat_transpose(b_k),
                                   cpeft_mat_sub(dt, gb, 0, m, k * r, r), s.stream, st));
        if (o->grad_b.data) {
            /* grad_b_kᵀ (R x SEG) = s·xa_kᵀ·g_k */
            const cpeft_mat grad_b_k = cpeft_mat_sub(dt, o->grad_b, k * grp.seg, grp.seg, 0, r);
            CPEFT_TRY(rank_reduce(dt, cpeft_mat_sub(dt, in->xa, 0, m, k * r, r), g_k, nullptr,
                                  a->scale, cpeft_mat_transpose(grad_b_k), partial, s.stream, st));
        }
    }
    if (want_a) {
        if (rk > 0)
            CPEFT_TRY(rank_reduce(dt, gb, a->x, drop, a->scale, o->grad_a, partial, s.stream, st));
        else
            CPEFT_TRY(zero_fill(o->grad_a, elt, s.stream, st));
    }
    if (want_x && rk > 0) {
        if (drop)
            CPEFT_TRY(rank_expand_dropout(dt, gb, a->lora_a, drop, a->scale, o->grad_x, s.stream,
                                          st));
        else
            CPEFT_TRY(gemm(s, dt, dt, a->scale, gb, a->lora_a, 0.0, o->grad_x, st));
    }
    return CPEFT_OK;
}

/* The same through cuBLAS only (CPEFT_CUDA_RANK_R=cublas), drop(x) materialized by row chunk. */
int lora_backward_cublas(Session &s, const cpeft_lora_linear_args *a, const Groups &grp,
                         const cpeft_lora_linear_bwd_in *in, const cpeft_lora_linear_bwd_out *o,
                         cpeft_status *st)
{
    const cpeft_dtype dt = a->dtype, acc = cpeft_acc_dtype(dt);
    const size_t elt = cpeft_dtype_size(dt), acc_elt = cpeft_dtype_size(acc);
    /* grad_a / grad_b: fp32 with fp32 adapters, written from the fp32 accumulators. */
    const cpeft_dtype grad_ab_dt = a->fp32_adapters ? CPEFT_FLOAT32 : dt;
    const size_t grad_ab_elt = cpeft_dtype_size(grad_ab_dt);
    const int64_t m = a->m, n_in = a->in, r = a->r, rk = a->r * grp.k;
    const cpeft_mat &g = in->grad_out;
    const bool dropout = a->dropout.p > 0.0;
    const bool want_x = o->grad_x.data != nullptr, want_a = o->grad_a.data != nullptr;
    const bool need_gb = (want_x || want_a) && rk > 0;
    const int64_t rows = chunk_rows(m, n_in);
    const bool chunked = dropout && need_gb && m > 0 && n_in > 0;
    /* With several chunks, fp16/bf16 grad_a accumulates in fp32 scratch and is rounded once. */
    const bool grad_a_scratch = chunked && want_a && rows < m && acc != grad_ab_dt;

    size_t gb_bytes = need_gb ? ws_align((size_t)(m * rk) * elt) : 0;
    size_t chunk_bytes = chunked ? ws_align((size_t)(rows * n_in) * acc_elt) : 0;
    size_t grad_a_bytes = grad_a_scratch ? ws_align((size_t)(rk * n_in) * acc_elt) : 0;
    size_t copy_bytes = adapter_copy_bytes(a);
    void *ws = nullptr;
    if (gb_bytes + chunk_bytes + grad_a_bytes + copy_bytes > 0)
        CPEFT_TRY(s.workspace(gb_bytes + chunk_bytes + grad_a_bytes + copy_bytes, &ws, st));
    Carver carve(ws);
    void *gb_data = carve.take(gb_bytes);
    void *chunk = carve.take(chunk_bytes);
    void *grad_a_acc = carve.take(grad_a_bytes);
    Adapters ad;
    CPEFT_TRY(prepare_adapters(a, carve, s.stream, &ad, st));
    const cpeft_mat gb = cpeft_mat_compact(gb_data, m, rk);

    /* gb = g_blocks·B and grad_b = s·g_blockᵀ·xa_k, block by block. */
    for (int64_t k = 0; k < grp.k; ++k) {
        const cpeft_mat g_k = cpeft_mat_sub(dt, g, 0, m, grp.ids[k] * grp.seg, grp.seg);
        const cpeft_mat b_k = cpeft_mat_sub(dt, ad.b, k * grp.seg, grp.seg, 0, r);
        if (need_gb)
            CPEFT_TRY(gemm(s, dt, dt, 1.0, g_k, b_k, 0.0, cpeft_mat_sub(dt, gb, 0, m, k * r, r),
                           st));
        if (o->grad_b.data)
            CPEFT_TRY(gemm(s, dt, grad_ab_dt, a->scale, cpeft_mat_transpose(g_k),
                           cpeft_mat_sub(dt, in->xa, 0, m, k * r, r), 0.0,
                           cpeft_mat_sub(grad_ab_dt, o->grad_b, k * grp.seg, grp.seg, 0, r), st));
    }

    /* grad_a = s·gbᵀ·drop(x); LoRA part of grad_x = s·drop'(gb·A). */
    if (!chunked) {
        if (want_a)
            CPEFT_TRY(gemm(s, dt, grad_ab_dt, a->scale, cpeft_mat_transpose(gb), a->x, 0.0,
                           o->grad_a, st));
        if (want_x && rk > 0)
            CPEFT_TRY(gemm(s, dt, dt, a->scale, gb, ad.a, 0.0, o->grad_x, st));
    } else {
        const cpeft_mat grad_a_target = grad_a_scratch ? cpeft_mat_compact(grad_a_acc, rk, n_in)
                                                       : o->grad_a;
        const cpeft_dtype grad_a_dtype = grad_a_scratch ? acc : grad_ab_dt;
        for (int64_t row0 = 0; row0 < m; row0 += rows) {
            const int64_t n = m - row0 < rows ? m - row0 : rows;
            const cpeft_mat gb_rows = cpeft_mat_sub(dt, gb, row0, n, 0, rk);
            /* The chunk buffer is reused by the two steps; stream order keeps them apart. */
            if (want_a) {
                CPEFT_TRY(dropout_rows(dt, &a->dropout, a->x, row0, n, chunk, s.stream, st));
                CPEFT_TRY(gemm(s, dt, grad_a_dtype, a->scale, cpeft_mat_transpose(gb_rows),
                               cpeft_mat_compact(chunk, n, n_in), row0 == 0 ? 0.0 : 1.0,
                               grad_a_target, st));
            }
            if (want_x) {
                CPEFT_TRY(gemm(s, dt, acc, 1.0, gb_rows, ad.a, 0.0,
                               cpeft_mat_compact(chunk, n, n_in), st));
                CPEFT_TRY(dropout_scale_rows(dt, &a->dropout, chunk, a->scale, row0, n, o->grad_x,
                                             s.stream, st));
            }
        }
        if (grad_a_scratch)
            CPEFT_TRY(store_acc(dt, grad_a_acc, o->grad_a, s.stream, st));
    }
    if (want_a && rk == 0)
        CPEFT_TRY(zero_fill(o->grad_a, grad_ab_elt, s.stream, st));
    return CPEFT_OK;
}

} /* namespace */

int cpeft_lora_linear_bwd_cuda(const cpeft_lora_linear_args *a, const cpeft_lora_linear_bwd_in *in,
                               const cpeft_lora_linear_bwd_out *o, void *stream, cpeft_status *st)
{
    Groups grp;
    CPEFT_TRY(resolve_groups(a, &grp, st));
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = a->dtype;
    const int64_t m = a->m, rk = a->r * grp.k;
    const cpeft_mat &g = in->grad_out;
    const bool want_x = o->grad_x.data != nullptr;

    if (rank_r_kernels_enabled() && !a->fp32_adapters)
        CPEFT_TRY(lora_backward_rank_r(s, a, grp, in, o, st));
    else
        CPEFT_TRY(lora_backward_cublas(s, a, grp, in, o, st));

    /* grad_x += g·W (beta = 1 onto the LoRA part written above) */
    if (want_x)
        CPEFT_TRY(gemm(s, dt, dt, 1.0, g, a->weight, rk > 0 ? 1.0 : 0.0, o->grad_x, st));

    if (o->grad_bias.data) {
        /* The workspace is taken again: the LoRA products above are queued before it. */
        void *partial = nullptr;
        CPEFT_TRY(s.workspace(colreduce_partial_bytes(dt, a->out), &partial, st));
        const ColReduceOperand none = {nullptr, 0, 0, nullptr, CPEFT_INT32, 0, 0};
        CPEFT_TRY(colreduce_accumulate(dt, m, a->out, g, none, nullptr, nullptr, partial, 0,
                                       s.stream, st));
        CPEFT_TRY(colreduce_finalize(dt, a->out, partial, nullptr, o->grad_bias, s.stream, st));
    }
    if (o->grad_weight.data)
        CPEFT_TRY(gemm(s, dt, dt, 1.0, cpeft_mat_transpose(g), a->x, 0.0, o->grad_weight, st));
    return CPEFT_OK;
}
