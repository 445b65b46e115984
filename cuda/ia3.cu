/*
 * IA3 on the GPU (ia3.h): linear with output or input scaling, and embedding.
 *
 * Output scaling without base kept goes through cuBLASLt with l as the GEMM's per-row alpha
 * vector (gemm.cuh, gemm_scale_cols): the scale costs nothing. Otherwise the scale vector is
 * folded into whichever operand costs less to scale: a scaled copy of W (OUT x IN, in the cached
 * workspace, independent of M) when M is large, or the activations / output when M is small, so
 * no separate full pass over y follows the GEMM in the common training shapes. The exceptions
 * are forced by what must be produced: output scaling that keeps base (for grad_l) writes base
 * with the GEMM and y = base ⊙ l in one pass, and input-scaling backward with grad_l reads g·W
 * once to form both grad_l and grad_x in a single fused pass.
 */
#include "cpeft/ia3.h"

#include "cpeft/views.h"
#include "colreduce.cuh"
#include "elementwise.cuh"
#include "gemm.cuh"
#include "index_runs.cuh"
#include "kernel_support.cuh"
#include "status.cuh"
#include "stream_context.cuh"

namespace cpeft_cuda {
namespace {

const ColReduceOperand kNoOperand = {nullptr, 0, 0, nullptr, CPEFT_INT32, 0, 0};

/* Rows per activation chunk when the scaled rows are built in the workspace. */
int64_t chunk_rows(int64_t m, int64_t cols)
{
    const int64_t budget = (int64_t)1 << 23;
    int64_t rows = cols > 0 ? budget / cols : m;
    if (rows < 1)
        rows = 1;
    if (rows > m)
        rows = m;
    return rows;
}

template <class T, class I>
static __global__ void ia3_embedding_gather_kernel(
    int64_t n, int64_t dim, const I *indices, int64_t idx_stride, int64_t vocab, const T *w,
    int64_t w_rs, int64_t w_cs, const T *l, int64_t l_stride, T *y, int64_t y_rs, int64_t y_cs)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t p = blockIdx.x; p < n; p += gridDim.x) {
        const int64_t row = (int64_t)indices[p * idx_stride];
        /* An out-of-range index (the boundary checks CPU indices only) yields a NaN row rather
         * than an out-of-bounds read. */
        const bool valid = row >= 0 && row < vocab;
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
            const Acc v = valid ? Num<T>::load(w[row * w_rs + c * w_cs]) *
                                      Num<T>::load(l[c * l_stride])
                                : quiet_nan(Acc());
            y[p * y_rs + c * y_cs] = Num<T>::store(v);
        }
    }
}

} /* namespace */
} /* namespace cpeft_cuda */

using namespace cpeft_cuda;

int cpeft_ia3_linear_fwd_cuda(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_fwd_out *o,
                              void *stream, cpeft_status *st)
{
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = a->dtype;
    const size_t elt = cpeft_dtype_size(dt);
    const int64_t m = a->m, in = a->in, out = a->out;
    const bool has_bias = a->bias.data != nullptr;
    const double beta = has_bias ? 1.0 : 0.0;

    if (!a->feedforward) {
        if (!o->base.data) {
            /* y = (x·Wᵀ)·diag(l) + b ⊙ l with l as cuBLASLt's alpha vector: no pass over y, no
             * scaled copy of W. */
            void *ws = nullptr;
            CPEFT_TRY(s.workspace(ws_align((size_t)out * sizeof(float)), &ws, st));
            if (has_bias)
                CPEFT_TRY(broadcast_rows(dt, o->y, a->bias, &a->l, s.stream, st));
            bool done = false;
            CPEFT_TRY(gemm_scale_cols(s, dt, a->l, ws, a->x, cpeft_mat_transpose(a->weight), beta,
                                      o->y, &done, st));
            if (done)
                return CPEFT_OK;
        }
        if (o->base.data || m <= in) {
            /* base = x·Wᵀ + b (into base, or into y when base is not kept), then y = base ⊙ l. */
            const cpeft_mat &base = o->base.data ? o->base : o->y;
            if (has_bias)
                CPEFT_TRY(broadcast_rows(dt, base, a->bias, nullptr, s.stream, st));
            CPEFT_TRY(gemm(s, dt, dt, 1.0, a->x, cpeft_mat_transpose(a->weight), beta, base, st));
            return scale_matrix(dt, base, a->l, 1, o->y, s.stream, st);
        }
        /* y = x·(diag(l)·W)ᵀ + b ⊙ l */
        void *ws = nullptr;
        CPEFT_TRY(s.workspace((size_t)(out * in) * elt, &ws, st));
        const cpeft_mat w_scaled = cpeft_mat_compact_like(a->weight, ws);
        CPEFT_TRY(scale_matrix(dt, a->weight, a->l, 0, w_scaled, s.stream, st));
        if (has_bias)
            CPEFT_TRY(broadcast_rows(dt, o->y, a->bias, &a->l, s.stream, st));
        return gemm(s, dt, dt, 1.0, a->x, cpeft_mat_transpose(w_scaled), beta, o->y, st);
    }

    if (has_bias)
        CPEFT_TRY(broadcast_rows(dt, o->y, a->bias, nullptr, s.stream, st));
    if (m >= out) {
        /* y = x·(W·diag(l))ᵀ + b */
        void *ws = nullptr;
        CPEFT_TRY(s.workspace((size_t)(out * in) * elt, &ws, st));
        const cpeft_mat w_scaled = cpeft_mat_compact_like(a->weight, ws);
        CPEFT_TRY(scale_matrix(dt, a->weight, a->l, 1, w_scaled, s.stream, st));
        return gemm(s, dt, dt, 1.0, a->x, cpeft_mat_transpose(w_scaled), beta, o->y, st);
    }
    /* Few rows: y = (x ⊙ l)·Wᵀ + b with x ⊙ l built a bounded row chunk at a time. */
    const int64_t rows = chunk_rows(m, in);
    void *ws = nullptr;
    CPEFT_TRY(s.workspace((size_t)(rows * in) * elt, &ws, st));
    for (int64_t row0 = 0; row0 < m; row0 += rows) {
        const int64_t n = m - row0 < rows ? m - row0 : rows;
        const cpeft_mat x_scaled = cpeft_mat_compact(ws, n, in);
        CPEFT_TRY(scale_matrix(dt, cpeft_mat_sub(dt, a->x, row0, n, 0, in), a->l, 1, x_scaled,
                               s.stream, st));
        CPEFT_TRY(gemm(s, dt, dt, 1.0, x_scaled, cpeft_mat_transpose(a->weight), beta,
                       cpeft_mat_sub(dt, o->y, row0, n, 0, out), st));
    }
    return CPEFT_OK;
}

int cpeft_ia3_linear_bwd_cuda(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_bwd_in *in,
                              const cpeft_ia3_linear_bwd_out *o, void *stream, cpeft_status *st)
{
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = a->dtype;
    const size_t elt = cpeft_dtype_size(dt);
    const int64_t m = a->m, n_in = a->in, out = a->out;
    const cpeft_mat &g = in->grad_out;
    const bool want_x = o->grad_x.data != nullptr, want_l = o->grad_l.data != nullptr;

    if (!a->feedforward) {
        if (want_l && !in->base.data)
            return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                              "ia3_linear_backward: grad_l with output scaling needs base");
        const size_t w_bytes = want_x ? ws_align((size_t)(out * n_in) * elt) : 0;
        const size_t part_bytes = ws_align(colreduce_partial_bytes(dt, out));
        void *ws = nullptr;
        CPEFT_TRY(s.workspace(w_bytes + part_bytes, &ws, st));
        Carver carve(ws);
        void *w_data = carve.take(w_bytes);
        void *partial = carve.take(part_bytes);
        if (want_x) {
            /* grad_x = (g ⊙ l)·W = g·(diag(l)·W): the scale goes into W, not over g. */
            const cpeft_mat w_scaled = cpeft_mat_compact_like(a->weight, w_data);
            CPEFT_TRY(scale_matrix(dt, a->weight, a->l, 0, w_scaled, s.stream, st));
            CPEFT_TRY(gemm(s, dt, dt, 1.0, g, w_scaled, 0.0, o->grad_x, st));
        }
        if (want_l) {
            const ColReduceOperand base = {in->base.data,
                                           in->base.row_stride,
                                           in->base.col_stride,
                                           nullptr,
                                           CPEFT_INT32,
                                           0,
                                           0};
            CPEFT_TRY(colreduce_accumulate(dt, m, out, g, base, nullptr, nullptr, partial, 0,
                                           s.stream, st));
            CPEFT_TRY(colreduce_finalize(dt, out, partial, nullptr, o->grad_l, s.stream, st));
        }
        if (o->grad_bias.data) {
            CPEFT_TRY(colreduce_accumulate(dt, m, out, g, kNoOperand, nullptr, nullptr, partial, 0,
                                           s.stream, st));
            /* l scales the sum: an empty batch's sum stays an exact 0 even for an infinite l. */
            CPEFT_TRY(colreduce_finalize(dt, out, partial, m > 0 ? &a->l : nullptr, o->grad_bias,
                                         s.stream, st));
        }
        if (o->grad_weight.data) {
            /* glᵀ·x = diag(l)·(gᵀ·x): scale the OUT x IN result rather than the M x OUT g. */
            CPEFT_TRY(gemm(s, dt, dt, 1.0, cpeft_mat_transpose(g), a->x, 0.0, o->grad_weight, st));
            if (m > 0)
                CPEFT_TRY(scale_matrix(dt, o->grad_weight, a->l, 0, o->grad_weight, s.stream, st));
        }
        return CPEFT_OK;
    }

    /* Input scaling: gw = g·W, grad_x = gw ⊙ l, grad_l = Σ_rows x ⊙ gw. */
    const bool gw_scratch = want_l && !want_x;
    const int64_t rows = gw_scratch ? chunk_rows(m, n_in) : m;
    const bool fold_w = want_x && !want_l && m > out;
    const size_t w_bytes = fold_w ? ws_align((size_t)(out * n_in) * elt) : 0;
    const size_t gw_bytes = gw_scratch ? ws_align((size_t)(rows * n_in) * elt) : 0;
    const size_t part_bytes = ws_align(colreduce_partial_bytes(dt, n_in > out ? n_in : out));
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(w_bytes + gw_bytes + part_bytes, &ws, st));
    Carver carve(ws);
    void *w_data = carve.take(w_bytes);
    void *gw_data = carve.take(gw_bytes);
    void *partial = carve.take(part_bytes);

    if (want_l) {
        if (want_x) {
            /* gw lands in grad_x; one fused pass reads it with x for grad_l and scales it by l
             * in place into grad_x. */
            CPEFT_TRY(gemm(s, dt, dt, 1.0, g, a->weight, 0.0, o->grad_x, st));
            const ColReduceOperand x = {
                a->x.data, a->x.row_stride, a->x.col_stride, nullptr, CPEFT_INT32, 0, 0};
            CPEFT_TRY(colreduce_accumulate(dt, m, n_in, o->grad_x, x, &a->l, &o->grad_x, partial, 0,
                                           s.stream, st));
        } else {
            /* Runs at least once so that M == 0 still writes zero partial sums. */
            for (int64_t row0 = 0;; row0 += rows) {
                const int64_t n = m - row0 < rows ? m - row0 : rows;
                const cpeft_mat gw = cpeft_mat_compact(gw_data, n, n_in);
                CPEFT_TRY(gemm(s, dt, dt, 1.0, cpeft_mat_sub(dt, g, row0, n, 0, out), a->weight,
                               0.0, gw, st));
                const cpeft_mat x_rows = cpeft_mat_sub(dt, a->x, row0, n, 0, n_in);
                const ColReduceOperand x = {
                    x_rows.data, x_rows.row_stride, x_rows.col_stride, nullptr, CPEFT_INT32, 0, 0};
                CPEFT_TRY(colreduce_accumulate(dt, n, n_in, gw, x, nullptr, nullptr, partial,
                                               row0 > 0, s.stream, st));
                if (row0 + n >= m)
                    break;
            }
        }
        CPEFT_TRY(colreduce_finalize(dt, n_in, partial, nullptr, o->grad_l, s.stream, st));
    } else if (want_x) {
        if (fold_w) {
            const cpeft_mat w_scaled = cpeft_mat_compact_like(a->weight, w_data);
            CPEFT_TRY(scale_matrix(dt, a->weight, a->l, 1, w_scaled, s.stream, st));
            CPEFT_TRY(gemm(s, dt, dt, 1.0, g, w_scaled, 0.0, o->grad_x, st));
        } else {
            CPEFT_TRY(gemm(s, dt, dt, 1.0, g, a->weight, 0.0, o->grad_x, st));
            CPEFT_TRY(scale_matrix(dt, o->grad_x, a->l, 1, o->grad_x, s.stream, st));
        }
    }
    if (o->grad_bias.data) {
        CPEFT_TRY(colreduce_accumulate(dt, m, out, g, kNoOperand, nullptr, nullptr, partial, 0,
                                       s.stream, st));
        CPEFT_TRY(colreduce_finalize(dt, out, partial, nullptr, o->grad_bias, s.stream, st));
    }
    if (o->grad_weight.data) {
        /* gᵀ·(x ⊙ l) = (gᵀ·x)·diag(l) */
        CPEFT_TRY(gemm(s, dt, dt, 1.0, cpeft_mat_transpose(g), a->x, 0.0, o->grad_weight, st));
        if (m > 0)   /* an empty batch's gradient stays 0 even for an infinite l */
            CPEFT_TRY(scale_matrix(dt, o->grad_weight, a->l, 1, o->grad_weight, s.stream, st));
    }
    return CPEFT_OK;
}

int cpeft_ia3_embedding_fwd_cuda(const cpeft_ia3_embedding_args *a, cpeft_mat y, void *stream,
                                 cpeft_status *st)
{
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (a->n == 0 || a->dim == 0)
        return CPEFT_OK;
    const int block = a->dim >= 256 ? 256 : (int)((a->dim + 31) / 32 * 32);
    const unsigned grid = (unsigned)(a->n < 65535 ? a->n : 65535);
    return dispatch_float(a->dtype, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        return dispatch_index(a->index_dtype, st, [&](auto itag) {
            typedef typename decltype(itag)::type I;
            ia3_embedding_gather_kernel<T, I><<<grid, block, 0, s>>>(
                a->n, a->dim, static_cast<const I *>(a->indices.data), a->indices.stride,
                a->num_embeddings, static_cast<const T *>(a->weight.data), a->weight.row_stride,
                a->weight.col_stride, static_cast<const T *>(a->l.data), a->l.stride,
                static_cast<T *>(y.data), y.row_stride, y.col_stride);
            CPEFT_LAUNCH_CHECK(st, "ia3_embedding_gather_kernel");
            return (int)CPEFT_OK;
        });
    });
}

int cpeft_ia3_embedding_bwd_cuda(const cpeft_ia3_embedding_args *a, cpeft_mat grad_out,
                                 const cpeft_ia3_embedding_bwd_out *o, void *stream,
                                 cpeft_status *st)
{
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = a->dtype;
    const size_t elt = cpeft_dtype_size(dt);
    size_t runs_bytes = 0;
    if (o->grad_weight.data)
        CPEFT_TRY(index_runs_bytes(a->n, a->num_embeddings, &runs_bytes, st));
    const size_t part_bytes = o->grad_l.data ? ws_align(colreduce_partial_bytes(dt, a->dim)) : 0;
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(part_bytes + ws_align(runs_bytes), &ws, st));
    Carver carve(ws);
    void *partial = carve.take(part_bytes);
    void *runs_ws = carve.take(runs_bytes);

    if (o->grad_l.data) {
        /* Σ_n g[n] ⊙ W[idx[n]], gathering W's rows inside the reduction; out-of-range rows are
         * skipped there. */
        const ColReduceOperand w_rows = {
            a->weight.data, a->weight.row_stride, a->weight.col_stride, a->indices.data,
            a->index_dtype, a->indices.stride,    a->num_embeddings};
        CPEFT_TRY(colreduce_accumulate(dt, a->n, a->dim, grad_out, w_rows, nullptr, nullptr,
                                       partial, 0, s.stream, st));
        CPEFT_TRY(colreduce_finalize(dt, a->dim, partial, nullptr, o->grad_l, s.stream, st));
    }
    if (o->grad_weight.data) {
        /* grad_weight[idx[n]] += g[n] ⊙ l: zero-fill (it has V rows by definition), then each
         * distinct index's row is written once from its summed rows. */
        CPEFT_TRY(zero_fill(o->grad_weight, elt, s.stream, st));
        IndexRuns runs;
        CPEFT_TRY(index_runs_build(a->indices, a->index_dtype, a->num_embeddings, a->padding_idx,
                                   runs_ws, runs_bytes, &runs, s.stream, st));
        CPEFT_TRY(scatter_runs(dt, runs, grad_out.data, 0, grad_out.row_stride, grad_out.col_stride,
                               a->dim, 1.0, &a->l, o->grad_weight.data, o->grad_weight.row_stride,
                               o->grad_weight.col_stride, s.stream, st));
    }
    return CPEFT_OK;
}
