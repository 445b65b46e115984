/*
 * LoRA embedding on the GPU (lora_embedding.h).
 *
 * Forward: one kernel (rank_embedding_forward, rank_r.cu) writes y[n] = W[idx[n]] +
 * s·A[:, idx[n]]ᵀ·Bᵀ: W's rows read once, y written once, nothing of vocabulary size touched.
 *
 * Backward: grad_b = s·gᵀ·Ag with Ag (N x R) = Aᵀ[idx] gathered (rank_reduce: g read once,
 * deterministic slices); gB = g·B in fp32 (rank_project); grad_a and grad_weight go through the
 * sorted-run scatter of index_runs.cuh (sort the N indices, write each distinct index's column/row
 * once with fp32 sums): deterministic, no atomics, no V-sized accumulator; only the zero-fill of
 * those two gradients, which have V rows by definition, is of vocabulary size.
 *
 * Out-of-range indices (the boundary checks CPU indices only) never cause an out-of-bounds
 * access: their rows of y are NaN, their Ag rows are 0, and they contribute nothing to grad_a or
 * grad_weight. Rows at padding_idx contribute to grad_b (their forward value is real) but not to
 * grad_a or grad_weight, as in torch.
 *
 * CPEFT_CUDA_RANK_R=cublas selects the previous products (gather kernel then cuBLAS GEMMs).
 */
#include "cpeft/lora_embedding.h"

#include "cpeft/views.h"
#include "elementwise.cuh"
#include "gemm.cuh"
#include "index_runs.cuh"
#include "kernel_support.cuh"
#include "rank_r.cuh"
#include "status.cuh"
#include "stream_context.cuh"

namespace cpeft_cuda {
namespace {

template <class T, class I>
static __global__ void lora_embedding_gather_kernel(
    int64_t n, int64_t dim, int64_t r, const I *indices, int64_t idx_stride, int64_t vocab,
    const T *w, int64_t w_rs, int64_t w_cs, const T *lora_a, int64_t a_rs, int64_t a_cs, T *y,
    int64_t y_rs, int64_t y_cs, T *ag)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t p = blockIdx.x; p < n; p += gridDim.x) {
        const int64_t row = (int64_t)indices[p * idx_stride];
        const bool valid = row >= 0 && row < vocab;
        if (y)
            for (int64_t c = threadIdx.x; c < dim; c += blockDim.x)
                y[p * y_rs + c * y_cs] = valid ? w[row * w_rs + c * w_cs]
                                               : Num<T>::store(quiet_nan(Acc()));
        for (int64_t c = threadIdx.x; c < r; c += blockDim.x)
            ag[p * r + c] = valid ? lora_a[c * a_rs + row * a_cs] : Num<T>::store(Acc(0));
    }
}

/* Ag (N x R, dense) = Aᵀ[idx]; and y = W[idx] when y is given. */
int gather(const cpeft_lora_embedding_args *a, const cpeft_mat *y, void *ag, cudaStream_t stream,
           cpeft_status *st)
{
    if (a->n == 0)
        return CPEFT_OK;
    const int64_t widest = y && a->dim > a->r ? a->dim : a->r;
    const int block = widest >= 256 ? 256 : (widest <= 32 ? 32 : (int)((widest + 31) / 32 * 32));
    const unsigned grid = (unsigned)(a->n < 65535 ? a->n : 65535);
    return dispatch_float(a->dtype, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        return dispatch_index(a->index_dtype, st, [&](auto itag) {
            typedef typename decltype(itag)::type I;
            lora_embedding_gather_kernel<T, I><<<grid, block, 0, stream>>>(
                a->n, a->dim, a->r, static_cast<const I *>(a->indices.data), a->indices.stride,
                a->num_embeddings, static_cast<const T *>(a->weight.data), a->weight.row_stride,
                a->weight.col_stride, static_cast<const T *>(a->lora_a.data), a->lora_a.row_stride,
                a->lora_a.col_stride, y ? static_cast<T *>(y->data) : nullptr,
                y ? y->row_stride : 0, y ? y->col_stride : 0, static_cast<T *>(ag));
            CPEFT_LAUNCH_CHECK(st, "lora_embedding_gather_kernel");
            return (int)CPEFT_OK;
        });
    });
}

} /* namespace */
} /* namespace cpeft_cuda */

using namespace cpeft_cuda;

int cpeft_lora_embedding_fwd_cuda(const cpeft_lora_embedding_args *a, cpeft_mat y, void *stream,
                                  cpeft_status *st)
{
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = a->dtype;
    if (rank_r_kernels_enabled())
        return rank_embedding_forward(dt, a->index_dtype, a->indices, a->num_embeddings, a->weight,
                                      a->lora_a, a->lora_b, a->scale, y, s.stream, st);
    void *ag = nullptr;
    CPEFT_TRY(s.workspace((size_t)(a->n * a->r) * cpeft_dtype_size(dt), &ag, st));
    CPEFT_TRY(gather(a, &y, ag, s.stream, st));
    return gemm(s, dt, dt, a->scale, cpeft_mat_compact(ag, a->n, a->r),
                cpeft_mat_transpose(a->lora_b), 1.0, y, st);
}

int cpeft_lora_embedding_bwd_cuda(const cpeft_lora_embedding_args *a,
                                  const cpeft_lora_embedding_bwd_in *in,
                                  const cpeft_lora_embedding_bwd_out *o, void *stream,
                                  cpeft_status *st)
{
    Session s;
    CPEFT_TRY(s.open(stream, st));
    const cpeft_dtype dt = a->dtype, acc = cpeft_acc_dtype(dt);
    const size_t elt = cpeft_dtype_size(dt);
    const int64_t n = a->n, r = a->r;
    const cpeft_mat &g = in->grad_out;
    const bool want_a = o->grad_a.data != nullptr, want_b = o->grad_b.data != nullptr;
    const bool want_w = o->grad_weight.data != nullptr;

    const bool own = rank_r_kernels_enabled();
    size_t runs_bytes = 0;
    if (want_a || want_w)
        CPEFT_TRY(index_runs_bytes(n, a->num_embeddings, &runs_bytes, st));
    const size_t ag_bytes = want_b ? ws_align((size_t)(n * r) * elt) : 0;
    const size_t gb_bytes = want_a ? ws_align((size_t)(n * r) * cpeft_dtype_size(acc)) : 0;
    const size_t partial_bytes = want_b && own
                                     ? ws_align(rank_reduce_partial_bytes(dt, n, a->dim, r))
                                     : 0;
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(ag_bytes + gb_bytes + partial_bytes + ws_align(runs_bytes), &ws, st));
    Carver carve(ws);
    void *ag = carve.take(ag_bytes);
    void *gb = carve.take(gb_bytes);
    void *partial = partial_bytes ? carve.take(partial_bytes) : nullptr;
    void *runs_ws = carve.take(runs_bytes);

    if (want_b) {
        CPEFT_TRY(gather(a, nullptr, ag, s.stream, st));
        if (own)
            /* grad_bᵀ (R x D) = s·Agᵀ·g */
            CPEFT_TRY(rank_reduce(dt, cpeft_mat_compact(ag, n, r), g, nullptr, a->scale,
                                  cpeft_mat_transpose(o->grad_b), partial, s.stream, st));
        else
            CPEFT_TRY(gemm(s, dt, dt, a->scale, cpeft_mat_transpose(g), cpeft_mat_compact(ag, n, r),
                           0.0, o->grad_b, st));
    }
    if (!want_a && !want_w)
        return CPEFT_OK;

    IndexRuns runs;
    CPEFT_TRY(index_runs_build(a->indices, a->index_dtype, a->num_embeddings, a->padding_idx,
                               runs_ws, runs_bytes, &runs, s.stream, st));
    if (want_a) {
        /* gB = g·B in fp32 (fp64), then grad_a[:, v] = s·Σ_{idx[n] = v} gB[n]ᵀ: one column of
         * grad_a per distinct index, keyed along grad_a's column stride. */
        if (own)
            CPEFT_TRY(rank_project(dt, g, nullptr, cpeft_mat_transpose(a->lora_b),
                                   cpeft_mat_compact(gb, n, r), s.stream, st, true));
        else
            CPEFT_TRY(gemm(s, dt, acc, 1.0, g, a->lora_b, 0.0, cpeft_mat_compact(gb, n, r), st));
        CPEFT_TRY(zero_fill(o->grad_a, elt, s.stream, st));
        CPEFT_TRY(scatter_runs(dt, runs, gb, 1, r, 1, r, a->scale, nullptr, o->grad_a.data,
                               o->grad_a.col_stride, o->grad_a.row_stride, s.stream, st));
    }
    if (want_w) {
        CPEFT_TRY(zero_fill(o->grad_weight, elt, s.stream, st));
        CPEFT_TRY(scatter_runs(dt, runs, g.data, 0, g.row_stride, g.col_stride, a->dim, 1.0,
                               nullptr, o->grad_weight.data, o->grad_weight.row_stride,
                               o->grad_weight.col_stride, s.stream, st));
    }
    return CPEFT_OK;
}
