/*
 * LoRA linear on the GPU (lora_linear.h): cuBLAS for every product, fused around it so that no
 * temporary of y's or x's full size exists and nothing but xa (M x R*K) outlives the forward.
 *
 * Forward, in this order:
 *   xa = drop(x)·Aᵀ                   (dropout: drop(x) is built a bounded row chunk at a time)
 *   y  = s·xa_k·B_kᵀ per block         (beta = 0, or beta = 1 onto a bias / zero pre-fill)
 *   y += x·Wᵀ                          (beta = 1)
 * The rank-R product goes first so that its result is the C operand of the big, compute-bound
 * base GEMM, whose epilogue reads it while the main loop is busy; doing it second would cost a
 * separate memory-bound read-modify-write pass over y.
 *
 * Backward: gb = g_blocks·B (M x R*K, scratch) feeds grad_a and grad_x; grad_x gets its LoRA part
 * first (s·gb·A, or with dropout s·mask ⊙ (gb·A) a row chunk at a time) and the base GEMM g·W
 * accumulates onto it with beta = 1, for the same reason as in forward.
 *
 * fp32 adapters on fp16/bf16 activations (fp32_adapters): cuBLAS's GemmEx takes one type for
 * both operands, and widening x to fp32 (what peft does) would cost a copy of x's size and fp32
 * SIMT GEMMs. Instead A and B are rounded to the activation dtype into scratch (R*K x IN and
 * SEG*K x R elements), every product runs on 16-bit tensor cores with fp32 accumulation, and
 * grad_a / grad_b are written as fp32 C operands, so the master weights' gradients are never
 * rounded to 16 bits.
 */
#include "cpeft/lora_linear.h"

#include "common.cuh"

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
    if (a->groups < 1 || a->groups > CPEFT_MAX_GROUPS || a->out % a->groups != 0)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "lora_linear: %lld groups do not divide OUT %lld",
                          (long long)a->groups, (long long)a->out);
    g->seg = a->out / a->groups;
    g->k = 0;
    for (int64_t i = 0; i < a->groups; ++i)
        if (a->enabled[i])
            g->ids[g->k++] = i;
    if (a->lora_a.rows != a->r * g->k || a->lora_a.cols != a->in ||
        a->lora_b.rows != g->seg * g->k || a->lora_b.cols != a->r)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "lora_linear: adapter shapes (%lld x %lld), (%lld x %lld) do not match "
                          "r=%lld, %lld enabled groups of %lld rows",
                          (long long)a->lora_a.rows, (long long)a->lora_a.cols,
                          (long long)a->lora_b.rows, (long long)a->lora_b.cols, (long long)a->r,
                          (long long)g->k, (long long)g->seg);
    return CPEFT_OK;
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
static __global__ void round_fp32_kernel(int64_t rows, int64_t cols, const float *src,
                                         int64_t s_rs, int64_t s_cs, T *dst)
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
    out->a = mat_dense(a_copy, a->lora_a.rows, a->lora_a.cols);
    out->b = mat_dense(b_copy, a->lora_b.rows, a->lora_b.cols);
    return CPEFT_OK;
}

int64_t chunk_rows(int64_t m, int64_t in)
{
    int64_t rows = in > 0 ? kChunkElems / in : m;
    if (rows < 1) rows = 1;
    if (rows > m) rows = m;
    return rows;
}

template <class T>
static __global__ void store_acc_kernel(int64_t rows, int64_t cols,
                                        const typename Num<T>::acc *src, T *dst, int64_t d_rs,
                                        int64_t d_cs)
{
    const int64_t n = rows * cols;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e / cols, j = e - i * cols;
        dst[i * d_rs + j * d_cs] = Num<T>::store(src[e]);
    }
}

/* dst (any layout) = src (dense row-major, acc dtype), rounded once. */
int store_acc(cpeft_dtype dt, const void *src, const cpeft_mat &dst, cudaStream_t stream,
              cpeft_status *st)
{
    const int64_t n = dst.rows * dst.cols;
    if (n == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        store_acc_kernel<T><<<grid_1d(n, 256), 256, 0, stream>>>(
            dst.rows, dst.cols, static_cast<const Acc *>(src), static_cast<T *>(dst.data),
            dst.row_stride, dst.col_stride);
        CPEFT_LAUNCH_CHECK(st, "store_acc_kernel");
        return (int)CPEFT_OK;
    });
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
    const bool chunked = dropout && rk > 0;
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
    const cpeft_mat a_t = mat_transpose(ad.a);
    if (!chunked) {
        CPEFT_TRY(gemm(s, dt, dt, 1.0, a->x, a_t, 0.0, o->xa, st));
    } else {
        for (int64_t row0 = 0; row0 < m; row0 += rows) {
            const int64_t n = m - row0 < rows ? m - row0 : rows;
            CPEFT_TRY(dropout_rows(dt, &a->dropout, a->x, row0, n, ws, s.stream, st));
            CPEFT_TRY(gemm(s, dt, dt, 1.0, mat_dense(ws, n, in), a_t, 0.0,
                           mat_block(o->xa, row0, n, 0, rk, elt), st));
        }
    }

    /* y = bias / 0 pre-fill where a B-product does not cover it, then the B-products. */
    const bool prefill = a->bias.data != nullptr || grp.k < a->groups;
    if (a->bias.data)
        CPEFT_TRY(broadcast_rows(dt, o->y, a->bias, nullptr, s.stream, st));
    else if (prefill)
        CPEFT_TRY(zero_fill(o->y, elt, s.stream, st));
    for (int64_t k = 0; k < grp.k; ++k) {
        const cpeft_mat xa_k = mat_block(o->xa, 0, m, k * r, r, elt);
        const cpeft_mat b_k = mat_block(ad.b, k * grp.seg, grp.seg, 0, r, elt);
        const cpeft_mat y_k = mat_block(o->y, 0, m, grp.ids[k] * grp.seg, grp.seg, elt);
        CPEFT_TRY(gemm(s, dt, dt, a->scale, xa_k, mat_transpose(b_k), prefill ? 1.0 : 0.0, y_k,
                       st));
    }

    /* y += x·Wᵀ */
    return gemm(s, dt, dt, 1.0, a->x, mat_transpose(a->weight), 1.0, o->y, st);
}

int cpeft_lora_linear_bwd_cuda(const cpeft_lora_linear_args *a, const cpeft_lora_linear_bwd_in *in,
                               const cpeft_lora_linear_bwd_out *o, void *stream, cpeft_status *st)
{
    Groups grp;
    CPEFT_TRY(resolve_groups(a, &grp, st));
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = a->dtype, acc = acc_dtype(dt);
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
    size_t partial_bytes = o->grad_bias.data ? ws_align(colreduce_partial_bytes(dt, a->out)) : 0;
    size_t copy_bytes = adapter_copy_bytes(a);
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(gb_bytes + chunk_bytes + grad_a_bytes + partial_bytes + copy_bytes, &ws,
                          st));
    Carver carve(ws);
    void *gb_data = carve.take(gb_bytes);
    void *chunk = carve.take(chunk_bytes);
    void *grad_a_acc = carve.take(grad_a_bytes);
    void *partial = carve.take(partial_bytes);
    Adapters ad;
    CPEFT_TRY(prepare_adapters(a, carve, s.stream, &ad, st));
    const cpeft_mat gb = mat_dense(gb_data, m, rk);

    /* gb = g_blocks·B and grad_b = s·g_blockᵀ·xa_k, block by block. */
    for (int64_t k = 0; k < grp.k; ++k) {
        const cpeft_mat g_k = mat_block(g, 0, m, grp.ids[k] * grp.seg, grp.seg, elt);
        const cpeft_mat b_k = mat_block(ad.b, k * grp.seg, grp.seg, 0, r, elt);
        if (need_gb)
            CPEFT_TRY(gemm(s, dt, dt, 1.0, g_k, b_k, 0.0, mat_block(gb, 0, m, k * r, r, elt), st));
        if (o->grad_b.data)
            CPEFT_TRY(gemm(s, dt, grad_ab_dt, a->scale, mat_transpose(g_k),
                           mat_block(in->xa, 0, m, k * r, r, elt), 0.0,
                           mat_block(o->grad_b, k * grp.seg, grp.seg, 0, r, grad_ab_elt), st));
    }

    /* grad_a = s·gbᵀ·drop(x); LoRA part of grad_x = s·drop'(gb·A). */
    if (!chunked) {
        if (want_a)
            CPEFT_TRY(gemm(s, dt, grad_ab_dt, a->scale, mat_transpose(gb), a->x, 0.0, o->grad_a,
                           st));
        if (want_x && rk > 0)
            CPEFT_TRY(gemm(s, dt, dt, a->scale, gb, ad.a, 0.0, o->grad_x, st));
    } else {
        const cpeft_mat grad_a_target =
            grad_a_scratch ? mat_dense(grad_a_acc, rk, n_in) : o->grad_a;
        const cpeft_dtype grad_a_dtype = grad_a_scratch ? acc : grad_ab_dt;
        for (int64_t row0 = 0; row0 < m; row0 += rows) {
            const int64_t n = m - row0 < rows ? m - row0 : rows;
            const cpeft_mat gb_rows = mat_block(gb, row0, n, 0, rk, elt);
            /* The chunk buffer is reused by the two steps; stream order keeps them apart. */
            if (want_a) {
                CPEFT_TRY(dropout_rows(dt, &a->dropout, a->x, row0, n, chunk, s.stream, st));
                CPEFT_TRY(gemm(s, dt, grad_a_dtype, a->scale, mat_transpose(gb_rows),
                               mat_dense(chunk, n, n_in), row0 == 0 ? 0.0 : 1.0, grad_a_target,
                               st));
            }
            if (want_x) {
                CPEFT_TRY(gemm(s, dt, acc, 1.0, gb_rows, ad.a, 0.0,
                               mat_dense(chunk, n, n_in), st));
                CPEFT_TRY(dropout_scale_rows(dt, &a->dropout, chunk, a->scale, row0, n,
                                             o->grad_x, s.stream, st));
            }
        }
        if (grad_a_scratch)
            CPEFT_TRY(store_acc(dt, grad_a_acc, o->grad_a, s.stream, st));
    }
    if (want_a && rk == 0)
        CPEFT_TRY(zero_fill(o->grad_a, grad_ab_elt, s.stream, st));

    /* grad_x += g·W (beta = 1 onto the LoRA part written above) */
    if (want_x)
        CPEFT_TRY(gemm(s, dt, dt, 1.0, g, a->weight, rk > 0 ? 1.0 : 0.0, o->grad_x, st));

    if (o->grad_bias.data) {
        const ColReduceOperand none = {nullptr, 0, 0, nullptr, CPEFT_INT32, 0, 0};
        CPEFT_TRY(colreduce_accumulate(dt, m, a->out, g, none, nullptr, nullptr, partial, 0,
                                       s.stream, st));
        CPEFT_TRY(colreduce_finalize(dt, a->out, partial, nullptr, o->grad_bias, s.stream, st));
    }
    if (o->grad_weight.data)
        CPEFT_TRY(gemm(s, dt, dt, 1.0, mat_transpose(g), a->x, 0.0, o->grad_weight, st));
    return CPEFT_OK;
}
