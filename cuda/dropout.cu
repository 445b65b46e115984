/*
 * Counter-based dropout on the GPU: the mask as data (dropout.h) and the two row-chunk
 * applications lora_linear.cu uses. Every element follows cpeft_dropout_keep (core.h) exactly, so
 * CPU and GPU, forward and backward, see the same mask for the same (seed, offset).
 */
#include "cpeft/dropout.h"

#include "dropout_rows.cuh"
#include "kernel_support.cuh"
#include "status.cuh"

namespace cpeft_cuda {
namespace {

struct DropoutCounters {
    uint64_t seed;
    uint64_t offset;
    float p;            /* compared as float, like cpeft_dropout_keep */
};

/* dst[(m - dst_row0), i] = (keep ? factor : 0) * src[(m - src_row0), i]   (src NULL: 1).
 * The factor multiplies even a dropped element (as 0) so that inf/NaN inputs give NaN exactly as
 * the CPU twin and torch's x * mask * scale do. */
template <class S, class T> struct DropoutApply {
    const S *src;
    int64_t src_rs, src_cs, src_row0;
    T *dst;
    int64_t dst_rs, dst_cs, dst_row0;
    typename Num<T>::acc factor;

    __device__ __forceinline__ void operator()(int64_t m, int64_t i, bool keep) const
    {
        typedef typename Num<T>::acc Acc;
        const Acc f = keep ? factor : Acc(0);
        const Acc v = src ? f * (Acc)Num<S>::load(src[(m - src_row0) * src_rs + i * src_cs]) : f;
        dst[(m - dst_row0) * dst_rs + i * dst_cs] = Num<T>::store(v);
    }
};

/* One thread per Philox counter block: a single Philox call gives the uniforms of four
 * consecutive counters, so each thread handles the (up to four) elements of its block instead of
 * running Philox once per element. Elements e in [e_lo, e_hi) of the flattened M x IN input have
 * counters offset + e modulo 2^64 (as cpeft_dropout_keep computes them), so a range may cross
 * 2^64: blocks are counted relative to the first one and their numbers taken modulo 2^62 (the
 * block of counter c is c >> 2), never compared as absolute counters. */
template <class S, class T>
static __global__ void dropout_apply_kernel(DropoutCounters d, uint64_t e_lo, uint64_t e_hi,
                                            int64_t in, DropoutApply<S, T> op)
{
    const uint64_t block_mask = ((uint64_t)1 << 62) - 1;
    const uint64_t c_lo = d.offset + e_lo, count = e_hi - e_lo;
    const uint64_t first_block = c_lo >> 2, lead = c_lo & 3;
    const uint64_t blocks = (lead + count + 3) >> 2;
    for (uint64_t k = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; k < blocks;
         k += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t b = (first_block + k) & block_mask;
        uint32_t ctr[4] = {(uint32_t)b, (uint32_t)(b >> 32), 0u, 0u};
        cpeft_philox4x32_10(ctr, (uint32_t)d.seed, (uint32_t)(d.seed >> 32));
        /* Positions in the range of this block's lanes: k*4 - lead + lane. */
        const int lane_begin = k == 0 ? (int)lead : 0;
        const uint64_t left = count - (k * 4 + (uint64_t)lane_begin - lead);
        const int lane_end = left < (uint64_t)(4 - lane_begin) ? lane_begin + (int)left : 4;
        const uint64_t e = e_lo + k * 4 + (uint64_t)lane_begin - lead;
        int64_t m = (int64_t)(e / (uint64_t)in);
        int64_t i = (int64_t)e - m * in;
        for (int lane = lane_begin; lane < lane_end; ++lane) {
            const float uniform = (float)(ctr[lane] >> 8) * (1.0f / 16777216.0f);
            op(m, i, uniform >= d.p);
            if (++i == in) {
                i = 0;
                ++m;
            }
        }
    }
}

template <class S, class T>
static int launch_dropout(const cpeft_dropout *d, uint64_t e_lo, uint64_t e_hi, int64_t in,
                          const DropoutApply<S, T> &op, cudaStream_t stream, cpeft_status *st)
{
    if (e_hi <= e_lo || in <= 0)
        return CPEFT_OK;
    const DropoutCounters counters = {d->seed, d->offset, (float)d->p};
    const uint64_t blocks = (((d->offset + e_lo) & 3) + (e_hi - e_lo) + 3) >> 2;
    const int threads = 256;
    dropout_apply_kernel<S, T>
        <<<grid_1d((int64_t)blocks, threads), threads, 0, stream>>>(counters, e_lo, e_hi, in, op);
    CPEFT_LAUNCH_CHECK(st, "dropout_apply_kernel");
    return CPEFT_OK;
}

} /* namespace */

int dropout_rows(cpeft_dtype dt, const cpeft_dropout *d, const cpeft_mat &x, int64_t row0,
                 int64_t rows, void *out, cudaStream_t stream, cpeft_status *st)
{
    const int64_t in = x.cols;
    const double factor = cpeft_dropout_keep_scale(d->p);
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        const DropoutApply<T, T> op = {static_cast<const T *>(x.data),
                                       x.row_stride,
                                       x.col_stride,
                                       0,
                                       static_cast<T *>(out),
                                       in,
                                       1,
                                       row0,
                                       (Acc)factor};
        return launch_dropout(d, (uint64_t)(row0 * in), (uint64_t)((row0 + rows) * in), in, op,
                              stream, st);
    });
}

int dropout_scale_rows(cpeft_dtype dt, const cpeft_dropout *d, const void *t, double alpha,
                       int64_t row0, int64_t rows, const cpeft_mat &dst, cudaStream_t stream,
                       cpeft_status *st)
{
    const int64_t in = dst.cols;
    const double factor = alpha * cpeft_dropout_keep_scale(d->p);
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        const DropoutApply<Acc, T> op = {static_cast<const Acc *>(t),
                                         in,
                                         1,
                                         row0,
                                         static_cast<T *>(dst.data),
                                         dst.row_stride,
                                         dst.col_stride,
                                         0,
                                         (Acc)factor};
        return launch_dropout(d, (uint64_t)(row0 * in), (uint64_t)((row0 + rows) * in), in, op,
                              stream, st);
    });
}

} /* namespace cpeft_cuda */

int cpeft_dropout_mask_cuda(cpeft_dtype dtype, const cpeft_dropout *d, cpeft_mat mask, void *stream,
                            cpeft_status *st)
{
    using namespace cpeft_cuda;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    const int64_t in = mask.cols;
    const double factor = cpeft_dropout_keep_scale(d->p);
    return dispatch_float(dtype, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        const DropoutApply<T, T> op = {
            nullptr,         0, 0,          0, static_cast<T *>(mask.data), mask.row_stride,
            mask.col_stride, 0, (Acc)factor};
        return launch_dropout(d, 0, (uint64_t)(mask.rows * in), in, op, s, st);
    });
}
