/*
 * DoRA on the GPU (dora.h): cuBLAS for every product, small kernels around them.
 *
 * Row norms: W·Aᵀ (OUT x R) and A·Aᵀ (R x R) with fp32 (fp64) results, B·(A·Aᵀ), then one thread
 * per row combines them with ‖w_j‖² (computed here, or the caller's cached copy); W + s·B·A is
 * never formed.
 *
 * Forward without dropout: xa = x·Aᵀ, u = s·xa·Bᵀ, u += x·Wᵀ (the rank-R term is the C operand
 * of the base GEMM, read by its epilogue), then y = c ⊙ u + bias in one pass. u is `base` when
 * the caller keeps it for grad_m; otherwise, when M > IN, c is folded into a scaled copy of W
 * (OUT x IN, the cached workspace) and into B, so y = bias + s·xa·(c ⊙ B)ᵀ + x·(c ⊙ W)ᵀ is
 * written by the GEMMs alone, with no pass over y. With dropout (peft's training formula) xd·Wᵀ
 * is built a row chunk at a time from drop(x), y = c ⊙ s·xa·Bᵀ + (c - 1) ⊙ xd·Wᵀ + bias in one
 * pass that also leaves u = xd·Wᵀ + s·xa·Bᵀ in `base` when kept, then x·Wᵀ is accumulated.
 *
 * Backward: grad_m and grad_bias are column reductions over g (grad_m against u); grad_b =
 * s·c ⊙ gᵀ·xa; gb = g·(c ⊙ B); grad_x's rank-R part first, then the base GEMM accumulates
 * g·(c ⊙ W) (or, with dropout, g·W after the dropped part drop'(g·((c - 1) ⊙ W) + s·gb·A)),
 * c folded into whichever of W (OUT x IN) and g (M x OUT) is smaller.
 */
#include "cpeft/dora.h"

#include "cpeft/views.h"
#include "colreduce.cuh"
#include "dropout_rows.cuh"
#include "elementwise.cuh"
#include "gemm.cuh"
#include "index_runs.cuh"
#include "kernel_support.cuh"
#include "status.cuh"
#include "stream_context.cuh"

namespace cpeft_cuda {
namespace {

const ColReduceOperand kNoOperand = {nullptr, 0, 0, nullptr, CPEFT_INT32, 0, 0};
const int kBlock = 256;

/* Rows of dropped x per chunk (about 32 MiB of fp32), as in lora_linear.cu. */
int64_t dropout_chunk_rows(int64_t m, int64_t in)
{
    const int64_t budget = (int64_t)1 << 23;
    int64_t rows = in > 0 ? budget / in : m;
    if (rows < 1)
        rows = 1;
    if (rows > m)
        rows = m;
    return rows;
}

/* out[j] = Σ_k w[j, k]² for every row j; one block per row, tree-reduced in Acc. */
template <class T, class O>
__global__ void row_sq_norm_kernel(int64_t rows, int64_t cols, const T *w, int64_t rs, int64_t cs,
                                   O *out, int64_t out_stride)
{
    typedef typename Num<T>::acc Acc;
    __shared__ Acc partial[kBlock];
    for (int64_t j = blockIdx.x; j < rows; j += gridDim.x) {
        Acc sum = 0;
        for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
            const Acc v = Num<T>::load(w[j * rs + k * cs]);
            sum += v * v;
        }
        partial[threadIdx.x] = sum;
        __syncthreads();
        for (int half = blockDim.x / 2; half > 0; half /= 2) {
            if ((int)threadIdx.x < half)
                partial[threadIdx.x] += partial[threadIdx.x + half];
            __syncthreads();
        }
        if (threadIdx.x == 0)
            out[j * out_stride] = (O)partial[0];
        __syncthreads();
    }
}

/* n_j = sqrt(max(0, wsq_j + Σ_k b_jk·(2s·wa_jk + s²·bg_jk))); wsq from the caller (T) or from
 * row_sq_norm_kernel (Acc); wa and bg dense OUT x R in Acc. */
template <class T>
__global__ void finish_norm_kernel(int64_t out, int64_t r, const T *wsq_given, int64_t wsq_stride,
                                   const typename Num<T>::acc *wsq_acc,
                                   const typename Num<T>::acc *wa, const typename Num<T>::acc *bg,
                                   const T *b, int64_t b_rs, int64_t b_cs, double s, T *norm,
                                   int64_t norm_stride)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < out;
         j += (int64_t)gridDim.x * blockDim.x) {
        Acc acc = wsq_given ? Num<T>::load(wsq_given[j * wsq_stride]) : wsq_acc[j];
        for (int64_t k = 0; k < r; ++k)
            acc += Num<T>::load(b[j * b_rs + k * b_cs]) *
                   (Acc(2 * s) * wa[j * r + k] + Acc(s * s) * bg[j * r + k]);
        norm[j * norm_stride] = Num<T>::store(sqrt(acc > Acc(0) ? acc : Acc(0)));
    }
}

/* The per-column factors, each rounded to T as peft computes them in the data type:
 * c = m / n, c - 1, s·c and 1 / n (dense, len entries each, in one buffer). */
template <class T>
__global__ void scales_kernel(int64_t len, const T *m, int64_t m_stride, const T *n,
                              int64_t n_stride, double s, T *c, T *c_minus_one, T *s_c, T *inv_n)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < len;
         j += (int64_t)gridDim.x * blockDim.x) {
        const Acc nj = Num<T>::load(n[j * n_stride]);
        const T cj = Num<T>::store(Num<T>::load(m[j * m_stride]) / nj);
        c[j] = cj;
        c_minus_one[j] = Num<T>::store(Num<T>::load(cj) - Acc(1));
        s_c[j] = Num<T>::store(Acc(s) * Num<T>::load(cj));
        inv_n[j] = Num<T>::store(Acc(1) / nj);
    }
}

/* y = (accumulate ? y : 0) + l ⊙ u + bias, l and bias along columns; y may be u. */
template <class T>
__global__ void combine_kernel(int64_t rows, int64_t cols, const T *u, int64_t u_rs, int64_t u_cs,
                               const T *l, const T *bias, int64_t bias_stride, T *y, int64_t y_rs,
                               int64_t y_cs)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x) {
        const Acc lj = Num<T>::load(l[j]);
        const Acc bj = bias ? Num<T>::load(bias[j * bias_stride]) : Acc(0);
        for (int64_t i = blockIdx.y; i < rows; i += gridDim.y)
            y[i * y_rs + j * y_cs] = Num<T>::store(lj * Num<T>::load(u[i * u_rs + j * u_cs]) + bj);
    }
}

/*
 * The dropout forward, y holding t = s·xa·Bᵀ and d = xd·Wᵀ: y = c ⊙ t + (c - 1) ⊙ d + bias, and
 * d's place receives u = d + t when the caller keeps u. c multiplies t directly: forming c·t as
 * t + (c - 1)·(t + d) loses c entirely once |c| is below the dtype's epsilon.
 */
template <class T>
__global__ void combine_dropped_kernel(int64_t rows, int64_t cols, T *d, int64_t d_rs, int64_t d_cs,
                                       const T *c, const T *c_minus_one, const T *bias,
                                       int64_t bias_stride, int keep_u, T *y, int64_t y_rs,
                                       int64_t y_cs)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x) {
        const Acc cj = Num<T>::load(c[j]), cm1j = Num<T>::load(c_minus_one[j]);
        const Acc bj = bias ? Num<T>::load(bias[j * bias_stride]) : Acc(0);
        for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
            const Acc t = Num<T>::load(y[i * y_rs + j * y_cs]);
            const Acc dij = Num<T>::load(d[i * d_rs + j * d_cs]);
            y[i * y_rs + j * y_cs] = Num<T>::store(cj * t + cm1j * dij + bj);
            if (keep_u)
                d[i * d_rs + j * d_cs] = Num<T>::store(dij + t);
        }
    }
}

/* dst[p, k] = src[idx[p], k] (⊙ scale[k] when given); an out-of-range index gives a NaN row. */
template <class T, class I>
__global__ void gather_kernel(int64_t n, int64_t cols, const I *idx, int64_t idx_stride,
                              int64_t limit, const T *src, int64_t s_rs, int64_t s_cs,
                              const T *scale, T *dst, int64_t d_rs, int64_t d_cs)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t p = blockIdx.x; p < n; p += gridDim.x) {
        const int64_t row = (int64_t)idx[p * idx_stride];
        const bool valid = row >= 0 && row < limit;
        for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
            Acc v = valid ? Num<T>::load(src[row * s_rs + k * s_cs]) : quiet_nan(Acc());
            if (scale)
                v *= Num<T>::load(scale[k]);
            dst[p * d_rs + k * d_cs] = Num<T>::store(v);
        }
    }
}

/* Embedding: grad_b[d, k] = s·c_d·t[d, k] and grad_m[d] = (grad_m[d] + s·t_d·b_d) / n_d, where
 * grad_m holds Σ_n g[n,d]·W[idx[n],d] on entry and t = gᵀ·Aᵀ[idx] (D x R, Acc). An empty batch
 * (n_rows = 0) contributes nothing: its sums are empty, 0 whatever b and c hold (0·inf = NaN). */
template <class T>
__global__ void embedding_finish_kernel(int64_t n_rows, int64_t dim, int64_t r,
                                        const typename Num<T>::acc *t, const T *b, int64_t b_rs,
                                        int64_t b_cs, double s, const T *s_c, const T *inv_n,
                                        T *grad_b, int64_t gb_rs, int64_t gb_cs, T *grad_m,
                                        int64_t gm_stride)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t d = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; d < dim;
         d += (int64_t)gridDim.x * blockDim.x) {
        Acc dot = 0;
        for (int64_t k = 0; k < r; ++k) {
            const Acc tk = t[d * r + k];
            if (n_rows > 0)
                dot += tk * Num<T>::load(b[d * b_rs + k * b_cs]);
            if (grad_b)
                grad_b[d * gb_rs + k * gb_cs] = Num<T>::store(n_rows > 0 ? Num<T>::load(s_c[d]) * tk
                                                                         : Acc(0));
        }
        if (grad_m)
            grad_m[d * gm_stride] = Num<T>::store(
                (Num<T>::load(grad_m[d * gm_stride]) + Acc(s) * dot) * Num<T>::load(inv_n[d]));
    }
}

unsigned grid_rows(int64_t rows)
{
    return (unsigned)(rows < 1 ? 1 : (rows > 65535 ? 65535 : rows));
}

/* ---- launchers ------------------------------------------------------------------------------ */

int row_sq_norms(cpeft_dtype dt, const cpeft_mat &w, void *out, int out_is_acc, int64_t out_stride,
                 cudaStream_t stream, cpeft_status *st)
{
    if (w.rows == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        if (out_is_acc)
            row_sq_norm_kernel<T, Acc><<<grid_rows(w.rows), kBlock, 0, stream>>>(
                w.rows, w.cols, static_cast<const T *>(w.data), w.row_stride, w.col_stride,
                static_cast<Acc *>(out), out_stride);
        else
            row_sq_norm_kernel<T, T><<<grid_rows(w.rows), kBlock, 0, stream>>>(
                w.rows, w.cols, static_cast<const T *>(w.data), w.row_stride, w.col_stride,
                static_cast<T *>(out), out_stride);
        CPEFT_LAUNCH_CHECK(st, "row_sq_norm_kernel");
        return (int)CPEFT_OK;
    });
}

/* Bytes dora_norm needs from the workspace. */
size_t norm_bytes(const cpeft_dora_norm_args *a)
{
    const size_t acc = cpeft_dtype_size(cpeft_acc_dtype(a->dtype));
    return ws_align((size_t)a->out * acc) + 2 * ws_align((size_t)(a->out * a->r) * acc) +
           ws_align((size_t)(a->r * a->r) * cpeft_dtype_size(a->dtype));
}

/* n from the identity in dora.h; ws holds norm_bytes(a). */
int dora_norm(Session &s, const cpeft_dora_norm_args *a, const cpeft_vec &norm, void *ws,
              cpeft_status *st)
{
    const cpeft_dtype dt = a->dtype, acc = cpeft_acc_dtype(dt);
    const size_t acc_elt = cpeft_dtype_size(acc);
    Carver carve(ws);
    void *wsq = carve.take((size_t)a->out * acc_elt);
    void *wa = carve.take((size_t)(a->out * a->r) * acc_elt);
    void *bg = carve.take((size_t)(a->out * a->r) * acc_elt);
    void *gram = carve.take((size_t)(a->r * a->r) * cpeft_dtype_size(dt));
    if (a->weight_sq_norm.data == nullptr)
        CPEFT_TRY(row_sq_norms(dt, a->weight, wsq, 1, 1, s.stream, st));
    CPEFT_TRY(gemm(s, dt, acc, 1.0, a->weight, cpeft_mat_transpose(a->lora_a), 0.0,
                   cpeft_mat_compact(wa, a->out, a->r), st));
    /* A·Aᵀ is an operand of the next product, so it is kept in the data type. */
    CPEFT_TRY(gemm(s, dt, dt, 1.0, a->lora_a, cpeft_mat_transpose(a->lora_a), 0.0,
                   cpeft_mat_compact(gram, a->r, a->r), st));
    CPEFT_TRY(gemm(s, dt, acc, 1.0, a->lora_b, cpeft_mat_compact(gram, a->r, a->r), 0.0,
                   cpeft_mat_compact(bg, a->out, a->r), st));
    if (a->out == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        finish_norm_kernel<T><<<grid_1d(a->out, kBlock), kBlock, 0, s.stream>>>(
            a->out, a->r, static_cast<const T *>(a->weight_sq_norm.data), a->weight_sq_norm.stride,
            static_cast<const Acc *>(wsq), static_cast<const Acc *>(wa),
            static_cast<const Acc *>(bg), static_cast<const T *>(a->lora_b.data),
            a->lora_b.row_stride, a->lora_b.col_stride, a->scale, static_cast<T *>(norm.data),
            norm.stride);
        CPEFT_LAUNCH_CHECK(st, "finish_norm_kernel");
        return (int)CPEFT_OK;
    });
}

struct Scales {
    cpeft_vec c, c_minus_one, s_c, inv_n;
};

size_t scales_bytes(cpeft_dtype dt, int64_t len)
{
    return 4 * ws_align((size_t)len * cpeft_dtype_size(dt));
}

int magnitude_scales(cpeft_dtype dt, const cpeft_vec &m, const cpeft_vec &n, double s, void *ws,
                     Scales *out, cudaStream_t stream, cpeft_status *st)
{
    Carver carve(ws);
    const size_t bytes = (size_t)m.len * cpeft_dtype_size(dt);
    out->c = {carve.take(bytes), m.len, 1};
    out->c_minus_one = {carve.take(bytes), m.len, 1};
    out->s_c = {carve.take(bytes), m.len, 1};
    out->inv_n = {carve.take(bytes), m.len, 1};
    if (m.len == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        scales_kernel<T><<<grid_1d(m.len, kBlock), kBlock, 0, stream>>>(
            m.len, static_cast<const T *>(m.data), m.stride, static_cast<const T *>(n.data),
            n.stride, s, static_cast<T *>(out->c.data), static_cast<T *>(out->c_minus_one.data),
            static_cast<T *>(out->s_c.data), static_cast<T *>(out->inv_n.data));
        CPEFT_LAUNCH_CHECK(st, "scales_kernel");
        return (int)CPEFT_OK;
    });
}

int combine(cpeft_dtype dt, const cpeft_mat &u, const cpeft_vec &l, const cpeft_vec &bias,
            const cpeft_mat &y, cudaStream_t stream, cpeft_status *st)
{
    if (y.rows == 0 || y.cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        combine_kernel<T><<<grid_2d(y.rows, y.cols), kBlock, 0, stream>>>(
            y.rows, y.cols, static_cast<const T *>(u.data), u.row_stride, u.col_stride,
            static_cast<const T *>(l.data), static_cast<const T *>(bias.data), bias.stride,
            static_cast<T *>(y.data), y.row_stride, y.col_stride);
        CPEFT_LAUNCH_CHECK(st, "combine_kernel");
        return (int)CPEFT_OK;
    });
}

int combine_dropped(cpeft_dtype dt, const cpeft_mat &d, const Scales &sc, const cpeft_vec &bias,
                    bool keep_u, const cpeft_mat &y, cudaStream_t stream, cpeft_status *st)
{
    if (y.rows == 0 || y.cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        combine_dropped_kernel<T><<<grid_2d(y.rows, y.cols), kBlock, 0, stream>>>(
            y.rows, y.cols, static_cast<T *>(d.data), d.row_stride, d.col_stride,
            static_cast<const T *>(sc.c.data), static_cast<const T *>(sc.c_minus_one.data),
            static_cast<const T *>(bias.data), bias.stride, keep_u ? 1 : 0,
            static_cast<T *>(y.data), y.row_stride, y.col_stride);
        CPEFT_LAUNCH_CHECK(st, "combine_dropped_kernel");
        return (int)CPEFT_OK;
    });
}

int gather(cpeft_dtype dt, cpeft_dtype index_dt, const cpeft_vec &indices, int64_t limit,
           const cpeft_mat &src, const cpeft_vec *scale, const cpeft_mat &dst, cudaStream_t stream,
           cpeft_status *st)
{
    if (dst.rows == 0 || dst.cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        return dispatch_index(index_dt, st, [&](auto itag) {
            typedef typename decltype(itag)::type I;
            gather_kernel<T, I><<<grid_rows(dst.rows), 128, 0, stream>>>(
                dst.rows, dst.cols, static_cast<const I *>(indices.data), indices.stride, limit,
                static_cast<const T *>(src.data), src.row_stride, src.col_stride,
                scale ? static_cast<const T *>(scale->data) : nullptr, static_cast<T *>(dst.data),
                dst.row_stride, dst.col_stride);
            CPEFT_LAUNCH_CHECK(st, "gather_kernel");
            return (int)CPEFT_OK;
        });
    });
}

cpeft_dora_norm_args linear_norm_args(const cpeft_dora_linear_args *a)
{
    const cpeft_lora_linear_args *l = &a->lora;
    cpeft_dora_norm_args n = {l->dtype,  l->out,    l->in,
                              l->r,      l->weight, l->lora_a,
                              l->lora_b, l->scale,  a->weight_sq_norm};
    return n;
}

int check_plain(const cpeft_lora_linear_args *l, const char *op, cpeft_status *st)
{
    if (l->groups != 1 || !l->enabled[0] || l->lora_a.rows != l->r || l->lora_a.cols != l->in ||
        l->lora_b.rows != l->out || l->lora_b.cols != l->r)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "%s: DoRA takes one ungrouped adapter of r=%lld, got %lld groups and "
                          "adapter shapes (%lld x %lld), (%lld x %lld)",
                          op, (long long)l->r, (long long)l->groups, (long long)l->lora_a.rows,
                          (long long)l->lora_a.cols, (long long)l->lora_b.rows,
                          (long long)l->lora_b.cols);
    return CPEFT_OK;
}

/* Operands for g·(l ⊙ W), l scaling the rows of W's (OUT, IN) view: a scaled copy of W when
 * M >= IN, else of g (into `buf`, which holds min(M, IN)·OUT elements). */
int scaled_pair(cpeft_dtype dt, const cpeft_mat &g, const cpeft_mat &w, const cpeft_vec &l,
                void *buf, cpeft_mat *g_use, cpeft_mat *w_use, cudaStream_t stream,
                cpeft_status *st)
{
    *g_use = g;
    *w_use = w;
    if (g.rows >= w.cols) {
        *w_use = cpeft_mat_compact_like(w, buf);
        return scale_matrix(dt, w, l, 0, *w_use, stream, st);
    }
    *g_use = cpeft_mat_compact(buf, g.rows, g.cols);
    return scale_matrix(dt, g, l, 1, *g_use, stream, st);
}

size_t scaled_pair_bytes(cpeft_dtype dt, int64_t m, int64_t in, int64_t out)
{
    return ws_align((size_t)((m < in ? m : in) * out) * cpeft_dtype_size(dt));
}

} /* namespace */
} /* namespace cpeft_cuda */

using namespace cpeft_cuda;

int cpeft_dora_weight_sq_norm_cuda(cpeft_dtype dtype, cpeft_mat weight, cpeft_vec out, void *stream,
                                   cpeft_status *st)
{
    Session s;
    CPEFT_TRY(s.open(stream, st));
    return row_sq_norms(dtype, weight, out.data, 0, out.stride, s.stream, st);
}

int cpeft_dora_norm_cuda(const cpeft_dora_norm_args *a, cpeft_vec norm, void *stream,
                         cpeft_status *st)
{
    Session s;
    CPEFT_TRY(s.open(stream, st));
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(norm_bytes(a), &ws, st));
    return dora_norm(s, a, norm, ws, st);
}

int cpeft_dora_linear_fwd_cuda(const cpeft_dora_linear_args *a, const cpeft_dora_linear_fwd_out *o,
                               void *stream, cpeft_status *st)
{
    const cpeft_lora_linear_args *l = &a->lora;
    CPEFT_TRY(check_plain(l, "dora_linear_forward", st));
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = l->dtype;
    const size_t elt = cpeft_dtype_size(dt);
    const int64_t m = l->m, in = l->in, out = l->out, r = l->r;
    const bool dropout = l->dropout.p > 0.0;
    const bool keep = o->base.data != nullptr;
    /* Without a kept base and with M > IN, c goes into copies of W and B instead of a pass. */
    const bool fold = !dropout && !keep && m > in;
    const int64_t rows = dropout_chunk_rows(m, in);
    const cpeft_dora_norm_args na = linear_norm_args(a);

    const size_t nb = ws_align(norm_bytes(&na)), sb = ws_align(scales_bytes(dt, out));
    const size_t u_bytes = dropout && !keep ? ws_align((size_t)(m * out) * elt) : 0;
    const size_t chunk_bytes = dropout ? ws_align((size_t)(rows * in) * elt) : 0;
    const size_t fold_bytes = fold ? ws_align((size_t)(out * in + out * r) * elt) : 0;
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(nb + sb + u_bytes + chunk_bytes + fold_bytes, &ws, st));
    Carver carve(ws);
    void *norm_ws = carve.take(nb);
    void *scales_ws = carve.take(sb);
    void *u_ws = carve.take(u_bytes);
    void *chunk = carve.take(chunk_bytes);
    void *fold_ws = carve.take(fold_bytes);

    CPEFT_TRY(dora_norm(s, &na, o->norm, norm_ws, st));
    Scales sc;
    CPEFT_TRY(magnitude_scales(dt, a->magnitude, o->norm, l->scale, scales_ws, &sc, s.stream, st));
    const cpeft_mat a_t = cpeft_mat_transpose(l->lora_a), b_t = cpeft_mat_transpose(l->lora_b);

    if (!dropout) {
        CPEFT_TRY(gemm(s, dt, dt, 1.0, l->x, a_t, 0.0, o->xa, st));
        if (fold) {
            const cpeft_mat w_scaled = cpeft_mat_compact_like(l->weight, fold_ws);
            const cpeft_mat b_scaled = cpeft_mat_compact(
                static_cast<char *>(fold_ws) + (size_t)(out * in) * elt, out, r);
            CPEFT_TRY(scale_matrix(dt, l->weight, sc.c, 0, w_scaled, s.stream, st));
            CPEFT_TRY(scale_matrix(dt, l->lora_b, sc.c, 0, b_scaled, s.stream, st));
            double beta = 0.0;
            if (l->bias.data) {
                CPEFT_TRY(broadcast_rows(dt, o->y, l->bias, nullptr, s.stream, st));
                beta = 1.0;
            }
            CPEFT_TRY(gemm(s, dt, dt, l->scale, o->xa, cpeft_mat_transpose(b_scaled), beta, o->y,
                           st));
            return gemm(s, dt, dt, 1.0, l->x, cpeft_mat_transpose(w_scaled), 1.0, o->y, st);
        }
        const cpeft_mat &u = keep ? o->base : o->y;
        CPEFT_TRY(gemm(s, dt, dt, l->scale, o->xa, b_t, 0.0, u, st));
        CPEFT_TRY(gemm(s, dt, dt, 1.0, l->x, cpeft_mat_transpose(l->weight), 1.0, u, st));
        return combine(dt, u, sc.c, l->bias, o->y, s.stream, st);
    }

    const cpeft_mat u = keep ? o->base : cpeft_mat_compact(u_ws, m, out);
    for (int64_t row0 = 0; row0 < m; row0 += rows) {
        const int64_t n = m - row0 < rows ? m - row0 : rows;
        const cpeft_mat xd = cpeft_mat_compact(chunk, n, in);
        const cpeft_mat xa_rows = cpeft_mat_sub(dt, o->xa, row0, n, 0, r);
        const cpeft_mat u_rows = cpeft_mat_sub(dt, u, row0, n, 0, out);
        CPEFT_TRY(dropout_rows(dt, &l->dropout, l->x, row0, n, chunk, s.stream, st));
        CPEFT_TRY(gemm(s, dt, dt, 1.0, xd, a_t, 0.0, xa_rows, st));
        CPEFT_TRY(gemm(s, dt, dt, 1.0, xd, cpeft_mat_transpose(l->weight), 0.0, u_rows, st));
    }
    /* u's place holds xd·Wᵀ until the combining pass turns it into u. */
    CPEFT_TRY(gemm(s, dt, dt, l->scale, o->xa, b_t, 0.0, o->y, st));
    CPEFT_TRY(combine_dropped(dt, u, sc, l->bias, keep, o->y, s.stream, st));
    return gemm(s, dt, dt, 1.0, l->x, cpeft_mat_transpose(l->weight), 1.0, o->y, st);
}

int cpeft_dora_linear_bwd_cuda(const cpeft_dora_linear_args *a, const cpeft_dora_linear_bwd_in *in,
                               const cpeft_dora_linear_bwd_out *o, void *stream, cpeft_status *st)
{
    const cpeft_lora_linear_args *l = &a->lora;
    CPEFT_TRY(check_plain(l, "dora_linear_backward", st));
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = l->dtype, acc = cpeft_acc_dtype(dt);
    const size_t elt = cpeft_dtype_size(dt), acc_elt = cpeft_dtype_size(acc);
    const int64_t m = l->m, n_in = l->in, out = l->out, r = l->r;
    const cpeft_mat &g = in->grad_out;
    const bool dropout = l->dropout.p > 0.0;
    const bool want_x = o->grad_x.data != nullptr, want_a = o->grad_a.data != nullptr;
    const bool need_gb = want_x || want_a;
    const int64_t rows = dropout_chunk_rows(m, n_in);
    const bool chunked = dropout && need_gb && m > 0 && n_in > 0;
    const bool grad_a_scratch = chunked && want_a && rows < m && acc != dt;

    const size_t sb = ws_align(scales_bytes(dt, out));
    const size_t partial_bytes = ws_align(colreduce_partial_bytes(dt, out));
    const size_t gb_bytes = need_gb ? ws_align((size_t)(m * r + out * r) * elt) : 0;
    const size_t pair_bytes = want_x ? scaled_pair_bytes(dt, m, n_in, out) : 0;
    const size_t chunk_bytes = chunked ? ws_align((size_t)(rows * n_in) * acc_elt) : 0;
    const size_t grad_a_bytes = grad_a_scratch ? ws_align((size_t)(r * n_in) * acc_elt) : 0;
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(sb + partial_bytes + gb_bytes + pair_bytes + chunk_bytes + grad_a_bytes,
                          &ws, st));
    Carver carve(ws);
    void *scales_ws = carve.take(sb);
    void *partial = carve.take(partial_bytes);
    void *gb_data = carve.take(gb_bytes);
    void *pair_ws = carve.take(pair_bytes);
    void *chunk = carve.take(chunk_bytes);
    void *grad_a_acc = carve.take(grad_a_bytes);

    Scales sc;
    CPEFT_TRY(magnitude_scales(dt, a->magnitude, in->norm, l->scale, scales_ws, &sc, s.stream, st));
    if (o->grad_m.data) {
        const ColReduceOperand base = {
            in->base.data, in->base.row_stride, in->base.col_stride, nullptr, CPEFT_INT32, 0, 0};
        CPEFT_TRY(colreduce_accumulate(dt, m, out, g, base, nullptr, nullptr, partial, 0, s.stream,
                                       st));
        CPEFT_TRY(colreduce_finalize(dt, out, partial, &sc.inv_n, o->grad_m, s.stream, st));
    }
    if (o->grad_bias.data) {
        CPEFT_TRY(colreduce_accumulate(dt, m, out, g, kNoOperand, nullptr, nullptr, partial, 0,
                                       s.stream, st));
        CPEFT_TRY(colreduce_finalize(dt, out, partial, nullptr, o->grad_bias, s.stream, st));
    }
    if (o->grad_b.data) {
        CPEFT_TRY(gemm(s, dt, dt, l->scale, cpeft_mat_transpose(g), in->xa, 0.0, o->grad_b, st));
        /* An empty batch's gradient is an empty sum, 0 whatever c holds (0·inf = NaN). */
        if (m > 0)
            CPEFT_TRY(scale_matrix(dt, o->grad_b, sc.c, 0, o->grad_b, s.stream, st));
    }
    if (!need_gb)
        return CPEFT_OK;

    /* gb = g·(c ⊙ B) */
    const cpeft_mat gb = cpeft_mat_compact(gb_data, m, r);
    const cpeft_mat b_scaled = cpeft_mat_compact(
        static_cast<char *>(gb_data) + (size_t)(m * r) * elt, out, r);
    CPEFT_TRY(scale_matrix(dt, l->lora_b, sc.c, 0, b_scaled, s.stream, st));
    CPEFT_TRY(gemm(s, dt, dt, 1.0, g, b_scaled, 0.0, gb, st));

    cpeft_mat g_use = g, w_use = l->weight;
    if (want_x)
        CPEFT_TRY(scaled_pair(dt, g, l->weight, dropout ? sc.c_minus_one : sc.c, pair_ws, &g_use,
                              &w_use, s.stream, st));
    if (!dropout) {
        if (want_a)
            CPEFT_TRY(gemm(s, dt, dt, l->scale, cpeft_mat_transpose(gb), l->x, 0.0, o->grad_a, st));
        if (want_x) {
            CPEFT_TRY(gemm(s, dt, dt, l->scale, gb, l->lora_a, 0.0, o->grad_x, st));
            CPEFT_TRY(gemm(s, dt, dt, 1.0, g_use, w_use, 1.0, o->grad_x, st));
        }
        return CPEFT_OK;
    }
    if (!chunked) {
        if (want_a)
            CPEFT_TRY(zero_fill(o->grad_a, elt, s.stream, st));
        return CPEFT_OK;   /* M == 0 or IN == 0: grad_x is empty or zero-sized */
    }
    const cpeft_mat grad_a_target = grad_a_scratch ? cpeft_mat_compact(grad_a_acc, r, n_in)
                                                   : o->grad_a;
    const cpeft_dtype grad_a_dtype = grad_a_scratch ? acc : dt;
    for (int64_t row0 = 0; row0 < m; row0 += rows) {
        const int64_t n = m - row0 < rows ? m - row0 : rows;
        const cpeft_mat gb_rows = cpeft_mat_sub(dt, gb, row0, n, 0, r);
        if (want_a) {
            CPEFT_TRY(dropout_rows(dt, &l->dropout, l->x, row0, n, chunk, s.stream, st));
            CPEFT_TRY(gemm(s, dt, grad_a_dtype, l->scale, cpeft_mat_transpose(gb_rows),
                           cpeft_mat_compact(chunk, n, n_in), row0 == 0 ? 0.0 : 1.0, grad_a_target,
                           st));
        }
        if (want_x) {
            const cpeft_mat tmp = cpeft_mat_compact(chunk, n, n_in);
            CPEFT_TRY(gemm(s, dt, acc, l->scale, gb_rows, l->lora_a, 0.0, tmp, st));
            CPEFT_TRY(gemm(s, dt, acc, 1.0, cpeft_mat_sub(dt, g_use, row0, n, 0, out), w_use, 1.0,
                           tmp, st));
            CPEFT_TRY(dropout_scale_rows(dt, &l->dropout, chunk, 1.0, row0, n, o->grad_x, s.stream,
                                         st));
        }
    }
    if (grad_a_scratch)
        CPEFT_TRY(store_acc(dt, grad_a_acc, o->grad_a, s.stream, st));
    if (want_x)
        CPEFT_TRY(gemm(s, dt, dt, 1.0, g, l->weight, 1.0, o->grad_x, st));
    return CPEFT_OK;
}

int cpeft_dora_embedding_fwd_cuda(const cpeft_dora_embedding_args *a, cpeft_mat y, cpeft_vec norm,
                                  void *stream, cpeft_status *st)
{
    const cpeft_lora_embedding_args *l = &a->lora;
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = l->dtype;
    const size_t elt = cpeft_dtype_size(dt);
    const cpeft_dora_norm_args na = {
        dt,        l->dim,   l->num_embeddings, l->r, cpeft_mat_transpose(l->weight), l->lora_a,
        l->lora_b, l->scale, a->weight_sq_norm};
    const size_t nb = ws_align(norm_bytes(&na)), sb = ws_align(scales_bytes(dt, l->dim));
    const size_t rows_bytes = ws_align((size_t)(l->n * l->r) * elt);
    const size_t b_bytes = ws_align((size_t)(l->dim * l->r) * elt);
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(nb + sb + rows_bytes + b_bytes, &ws, st));
    Carver carve(ws);
    void *norm_ws = carve.take(nb);
    void *scales_ws = carve.take(sb);
    void *rows_ws = carve.take(rows_bytes);
    void *b_ws = carve.take(b_bytes);

    CPEFT_TRY(dora_norm(s, &na, norm, norm_ws, st));
    Scales sc;
    CPEFT_TRY(magnitude_scales(dt, a->magnitude, norm, l->scale, scales_ws, &sc, s.stream, st));
    /* y = W[idx] ⊙ c, then += s·Aᵀ[idx]·(c ⊙ B)ᵀ */
    CPEFT_TRY(gather(dt, l->index_dtype, l->indices, l->num_embeddings, l->weight, &sc.c, y,
                     s.stream, st));
    const cpeft_mat a_rows = cpeft_mat_compact(rows_ws, l->n, l->r);
    const cpeft_mat b_scaled = cpeft_mat_compact(b_ws, l->dim, l->r);
    CPEFT_TRY(gather(dt, l->index_dtype, l->indices, l->num_embeddings,
                     cpeft_mat_transpose(l->lora_a), nullptr, a_rows, s.stream, st));
    CPEFT_TRY(scale_matrix(dt, l->lora_b, sc.c, 0, b_scaled, s.stream, st));
    return gemm(s, dt, dt, l->scale, a_rows, cpeft_mat_transpose(b_scaled), 1.0, y, st);
}

int cpeft_dora_embedding_bwd_cuda(const cpeft_dora_embedding_args *a, cpeft_mat grad_out,
                                  cpeft_vec norm, const cpeft_dora_embedding_bwd_out *o,
                                  void *stream, cpeft_status *st)
{
    const cpeft_lora_embedding_args *l = &a->lora;
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = l->dtype, acc = cpeft_acc_dtype(dt);
    const size_t elt = cpeft_dtype_size(dt), acc_elt = cpeft_dtype_size(acc);
    const int64_t n = l->n, r = l->r, dim = l->dim;
    const cpeft_mat &g = grad_out;
    const bool want_a = o->grad_a.data != nullptr;

    size_t runs_bytes = 0;
    if (want_a)
        CPEFT_TRY(index_runs_bytes(n, l->num_embeddings, &runs_bytes, st));
    const size_t sb = ws_align(scales_bytes(dt, dim));
    const size_t rows_bytes = ws_align((size_t)(n * r) * elt);
    const size_t t_bytes = ws_align((size_t)(dim * r) * acc_elt);
    const size_t b_bytes = want_a ? ws_align((size_t)(dim * r) * elt) : 0;
    const size_t gb_bytes = want_a ? ws_align((size_t)(n * r) * acc_elt) : 0;
    const size_t partial_bytes = o->grad_m.data ? ws_align(colreduce_partial_bytes(dt, dim)) : 0;
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(sb + rows_bytes + t_bytes + b_bytes + gb_bytes + partial_bytes +
                              ws_align(runs_bytes),
                          &ws, st));
    Carver carve(ws);
    void *scales_ws = carve.take(sb);
    void *rows_ws = carve.take(rows_bytes);
    void *t_ws = carve.take(t_bytes);
    void *b_ws = carve.take(b_bytes);
    void *gb_ws = carve.take(gb_bytes);
    void *partial = carve.take(partial_bytes);
    void *runs_ws = carve.take(runs_bytes);

    Scales sc;
    CPEFT_TRY(magnitude_scales(dt, a->magnitude, norm, l->scale, scales_ws, &sc, s.stream, st));
    if (o->grad_m.data || o->grad_b.data) {
        const cpeft_mat a_rows = cpeft_mat_compact(rows_ws, n, r);
        CPEFT_TRY(gather(dt, l->index_dtype, l->indices, l->num_embeddings,
                         cpeft_mat_transpose(l->lora_a), nullptr, a_rows, s.stream, st));
        CPEFT_TRY(gemm(s, dt, acc, 1.0, cpeft_mat_transpose(g), a_rows, 0.0,
                       cpeft_mat_compact(t_ws, dim, r), st));
        if (o->grad_m.data) {
            /* Σ_n g[n, d]·W[idx[n], d], the base rows read through the indices. */
            const ColReduceOperand rows = {
                l->weight.data, l->weight.row_stride, l->weight.col_stride, l->indices.data,
                l->index_dtype, l->indices.stride,    l->num_embeddings};
            CPEFT_TRY(colreduce_accumulate(dt, n, dim, g, rows, nullptr, nullptr, partial, 0,
                                           s.stream, st));
            CPEFT_TRY(colreduce_finalize(dt, dim, partial, nullptr, o->grad_m, s.stream, st));
        }
        if (dim > 0) {
            CPEFT_TRY(dispatch_float(dt, st, [&](auto tag) {
                typedef typename decltype(tag)::type T;
                typedef typename Num<T>::acc Acc;
                embedding_finish_kernel<T><<<grid_1d(dim, kBlock), kBlock, 0, s.stream>>>(
                    n, dim, r, static_cast<const Acc *>(t_ws),
                    static_cast<const T *>(l->lora_b.data), l->lora_b.row_stride,
                    l->lora_b.col_stride, l->scale, static_cast<const T *>(sc.s_c.data),
                    static_cast<const T *>(sc.inv_n.data), static_cast<T *>(o->grad_b.data),
                    o->grad_b.row_stride, o->grad_b.col_stride, static_cast<T *>(o->grad_m.data),
                    o->grad_m.stride);
                CPEFT_LAUNCH_CHECK(st, "embedding_finish_kernel");
                return (int)CPEFT_OK;
            }));
        }
    }
    if (!want_a)
        return CPEFT_OK;
    IndexRuns runs;
    CPEFT_TRY(index_runs_build(l->indices, l->index_dtype, l->num_embeddings, l->padding_idx,
                               runs_ws, runs_bytes, &runs, s.stream, st));
    /* gb = g·(c ⊙ B) in fp32 (fp64); grad_a[:, v] = s·Σ_{idx[n] = v} gb[n]ᵀ */
    const cpeft_mat b_scaled = cpeft_mat_compact(b_ws, dim, r);
    CPEFT_TRY(scale_matrix(dt, l->lora_b, sc.c, 0, b_scaled, s.stream, st));
    CPEFT_TRY(gemm(s, dt, acc, 1.0, g, b_scaled, 0.0, cpeft_mat_compact(gb_ws, n, r), st));
    CPEFT_TRY(zero_fill(o->grad_a, elt, s.stream, st));
    return scatter_runs(dt, runs, gb_ws, 1, r, 1, r, l->scale, nullptr, o->grad_a.data,
                        o->grad_a.col_stride, o->grad_a.row_stride, s.stream, st);
}
