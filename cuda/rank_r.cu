/*
 * The skinny products of the LoRA branch as own kernels (common.cuh, "Rank-r products").
 *
 * cuBLAS runs x·Aᵀ (M x IN times IN x R), g·B, gbᵀ·x and gᵀ·xa as split-K GEMMs: 5-12 us each
 * at M=4096, 4096², r=16 on an H200, against a memory floor of about 7 us for one read of x
 * (gpu-runs/2026-11-30-18e3f0a/profile.txt). And with dropout cuBLAS needs drop(x) as data: the
 * previous path materialized it a row chunk at a time, six 36-us passes per step. Here:
 *
 *   project: out (M x R) = d(big) (M x L) · smallᵀ (R x L): one warp per row group, small staged
 *            in shared memory a chunk of L at a time, big read once, each lane summing 4
 *            consecutive columns, a warp shuffle tree at the end.
 *   reduce:  out (R x L) = alpha · smallᵀ (M x R) · d(big) (M x L): threads own columns of big,
 *            rows cut into slices whose fp32 partial sums are added in slice order by a second
 *            kernel, so the result does not depend on scheduling (no atomics).
 *   expand:  out (M x L) = alpha · d(small (M x R) · a (R x L)): the LoRA part of grad_x with the
 *            dropout mask applied as it is written (without dropout cuBLAS does this product at
 *            memory speed already).
 *
 * d is the dropout of core.h regenerated in the kernel: element (m, i) has counter
 * offset + m*L + i modulo 2^64, and each lane's four consecutive columns cost one Philox call
 * (two when the counters straddle a Philox block). The kernels are templated on the adapter's
 * element type apart from the activations', so fp32 adapters beside fp16/bf16 activations can be
 * instantiated without widening x; today every operand of one call has one dtype.
 */
#include "common.cuh"

#include <climits>
#include <cstdlib>
#include <cstring>

namespace cpeft_cuda {

bool rank_r_kernels_enabled()
{
    const char *choice = getenv("CPEFT_CUDA_RANK_R");
    return !(choice && strcmp(choice, "cublas") == 0);
}

namespace {

/* ---------------------------------------------------------------------------------------------
 * Dropout of four consecutive counters, and 4-wide loads and stores
 * ------------------------------------------------------------------------------------------- */

template <class Acc> struct DropoutIn {
    int on;
    uint64_t seed, offset;
    float p;            /* compared as float, like cpeft_dropout_keep */
    Acc factor;         /* keep scale (times alpha where the kernel folds it in) */
};

template <class Acc> DropoutIn<Acc> dropout_in(const cpeft_dropout *d, double alpha)
{
    DropoutIn<Acc> in = {0, 0, 0, 0.0f, (Acc)alpha};
    if (d && d->p > 0.0) {
        in.on = 1;
        in.seed = d->seed;
        in.offset = d->offset;
        in.p = (float)d->p;
        in.factor = (Acc)(alpha * cpeft_dropout_keep_scale(d->p));
    }
    return in;
}

__device__ __forceinline__ unsigned keep_bit(uint32_t word, float p, int q)
{
    return ((float)(word >> 8) * (1.0f / 16777216.0f) >= p ? 1u : 0u) << q;
}

/* Bit q set: counter c0 + q (mod 2^64) is kept, for q = 0..3; as cpeft_dropout_keep. */
__device__ __forceinline__ unsigned keep_bits4(uint64_t seed, uint64_t c0, float p)
{
    const uint64_t b0 = c0 >> 2;
    const unsigned lead = (unsigned)(c0 & 3);
    uint32_t u[4] = {(uint32_t)b0, (uint32_t)(b0 >> 32), 0u, 0u};
    cpeft_philox4x32_10(u, (uint32_t)seed, (uint32_t)(seed >> 32));
    uint32_t w0 = u[0], w1 = u[1], w2 = u[2], w3 = u[3];
    if (lead != 0) {
        /* The next block holds the counters past c0's block; (c0 + 4) >> 2 wraps as the
         * counters do. Constant indices only, so u and v stay in registers. */
        const uint64_t b1 = (c0 + 4) >> 2;
        uint32_t v[4] = {(uint32_t)b1, (uint32_t)(b1 >> 32), 0u, 0u};
        cpeft_philox4x32_10(v, (uint32_t)seed, (uint32_t)(seed >> 32));
        if (lead == 1) {
            w0 = u[1]; w1 = u[2]; w2 = u[3]; w3 = v[0];
        } else if (lead == 2) {
            w0 = u[2]; w1 = u[3]; w2 = v[0]; w3 = v[1];
        } else {
            w0 = u[3]; w1 = v[0]; w2 = v[1]; w3 = v[2];
        }
    }
    return keep_bit(w0, p, 0) | keep_bit(w1, p, 1) | keep_bit(w2, p, 2) | keep_bit(w3, p, 3);
}

/* v[q] *= (kept ? factor : 0) for the four elements whose first counter is offset + e0. The
 * factor multiplies a dropped element too (as 0), so inf/NaN inputs give NaN as on the CPU. */
template <class Acc>
__device__ __forceinline__ void apply_dropout4(const DropoutIn<Acc> &d, uint64_t e0, Acc v[4])
{
    const unsigned keep = keep_bits4(d.seed, d.offset + e0, d.p);
#pragma unroll
    for (int q = 0; q < 4; ++q)
        v[q] *= (keep >> q) & 1u ? d.factor : Acc(0);
}

template <class T>
__device__ __forceinline__ bool vector_ok(const T *p, int64_t stride, int64_t i0, int64_t len)
{
    return stride == 1 && i0 + 4 <= len &&
           (reinterpret_cast<uintptr_t>(p + i0) & (4 * sizeof(T) - 1)) == 0;
}

/* v[q] = p[(i0 + q) * stride] for i0 + q < len, else 0; one 4-wide load when unit-stride and
 * aligned. */
template <class T>
__device__ __forceinline__ void load4(const T *p, int64_t stride, int64_t i0, int64_t len,
                                      typename Num<T>::acc v[4])
{
    typedef typename Num<T>::acc Acc;
    if (vector_ok(p, stride, i0, len)) {
        T t[4];
        if constexpr (sizeof(T) == 2) {
            const uint2 raw = *reinterpret_cast<const uint2 *>(p + i0);
            memcpy(t, &raw, sizeof(raw));
        } else if constexpr (sizeof(T) == 4) {
            const float4 raw = *reinterpret_cast<const float4 *>(p + i0);
            memcpy(t, &raw, sizeof(raw));
        } else {
            const double2 lo = reinterpret_cast<const double2 *>(p + i0)[0];
            const double2 hi = reinterpret_cast<const double2 *>(p + i0)[1];
            memcpy(t, &lo, sizeof(lo));
            memcpy(t + 2, &hi, sizeof(hi));
        }
#pragma unroll
        for (int q = 0; q < 4; ++q)
            v[q] = Num<T>::load(t[q]);
        return;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q)
        v[q] = i0 + q < len ? (Acc)Num<T>::load(p[(i0 + q) * stride]) : Acc(0);
}

template <class T>
__device__ __forceinline__ void store4(T *p, int64_t stride, int64_t i0, int64_t len,
                                       const typename Num<T>::acc v[4])
{
    if (vector_ok(p, stride, i0, len)) {
        T t[4];
#pragma unroll
        for (int q = 0; q < 4; ++q)
            t[q] = Num<T>::store(v[q]);
        if constexpr (sizeof(T) == 2) {
            uint2 raw;
            memcpy(&raw, t, sizeof(raw));
            *reinterpret_cast<uint2 *>(p + i0) = raw;
        } else if constexpr (sizeof(T) == 4) {
            float4 raw;
            memcpy(&raw, t, sizeof(raw));
            *reinterpret_cast<float4 *>(p + i0) = raw;
        } else {
            double2 lo, hi;
            memcpy(&lo, t, sizeof(lo));
            memcpy(&hi, t + 2, sizeof(hi));
            reinterpret_cast<double2 *>(p + i0)[0] = lo;
            reinterpret_cast<double2 *>(p + i0)[1] = hi;
        }
        return;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q)
        if (i0 + q < len)
            p[(i0 + q) * stride] = Num<T>::store(v[q]);
}

template <class Acc> __device__ __forceinline__ Acc warp_sum(Acc v)
{
#pragma unroll
    for (int lanes = 16; lanes > 0; lanes >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, lanes);
    return v;
}

/* Ranks handled per launch: the accumulators live in registers, so R is cut into tiles of this
 * many (a larger R reads big once per tile). fp64 keeps its staged tile within 48 KB of shared
 * memory with fewer ranks. */
template <class T> __host__ __device__ constexpr int wide_rank_tile() { return sizeof(T) == 8 ? 16 : 64; }
const int kNarrowRanks = 16;

/* ---------------------------------------------------------------------------------------------
 * project: out (M x R) = d(big) · smallᵀ
 * ------------------------------------------------------------------------------------------- */

const int kProjectWarps = 8;
const int kProjectChunk = 128;      /* columns of L staged per step: 32 lanes x 4 */

template <class T, class TA, int RT, int RPW>
__global__ void __launch_bounds__(kProjectWarps * 32)
    project_kernel(int64_t m, int64_t len, int64_t r, const T *big, int64_t b_rs, int64_t b_cs,
                   const TA *small, int64_t s_rs, int64_t s_cs, T *out, int64_t o_rs,
                   int64_t o_cs, DropoutIn<typename Num<T>::acc> drop)
{
    typedef typename Num<T>::acc Acc;
    __shared__ __align__(16) Acc small_s[RT][kProjectChunk];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t rows_per_block = (int64_t)kProjectWarps * RPW;
    for (int64_t base = (int64_t)blockIdx.x * rows_per_block; base < m;
         base += (int64_t)gridDim.x * rows_per_block) {
        const int64_t row0 = base + (int64_t)warp * RPW;
        Acc acc[RPW][RT];
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr)
#pragma unroll
            for (int k = 0; k < RT; ++k)
                acc[rr][k] = Acc(0);
        for (int64_t c0 = 0; c0 < len; c0 += kProjectChunk) {
            __syncthreads();    /* the previous chunk's reads of small_s are done */
            for (int e = threadIdx.x; e < RT * kProjectChunk; e += blockDim.x) {
                const int k = e / kProjectChunk, j = e - k * kProjectChunk;
                const int64_t i = c0 + j;
                small_s[k][j] = k < r && i < len ? (Acc)Num<TA>::load(small[k * s_rs + i * s_cs])
                                                 : Acc(0);
            }
            __syncthreads();
            const int64_t i0 = c0 + lane * 4;
            Acc v[RPW][4];
#pragma unroll
            for (int rr = 0; rr < RPW; ++rr) {
                const int64_t row = row0 + rr;
                if (row < m && i0 < len) {
                    load4(big + row * b_rs, b_cs, i0, len, v[rr]);
                    if (drop.on)
                        apply_dropout4(drop, (uint64_t)row * (uint64_t)len + (uint64_t)i0, v[rr]);
                } else {
#pragma unroll
                    for (int q = 0; q < 4; ++q)
                        v[rr][q] = Acc(0);
                }
            }
#pragma unroll
            for (int k = 0; k < RT; ++k) {
                const Acc a0 = small_s[k][lane * 4], a1 = small_s[k][lane * 4 + 1];
                const Acc a2 = small_s[k][lane * 4 + 2], a3 = small_s[k][lane * 4 + 3];
#pragma unroll
                for (int rr = 0; rr < RPW; ++rr)
                    acc[rr][k] += v[rr][0] * a0 + v[rr][1] * a1 + v[rr][2] * a2 + v[rr][3] * a3;
            }
        }
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) {
            const int64_t row = row0 + rr;
#pragma unroll
            for (int k = 0; k < RT; ++k) {
                const Acc total = warp_sum(acc[rr][k]);
                if (lane == 0 && row < m && k < r)
                    out[row * o_rs + k * o_cs] = Num<T>::store(total);
            }
        }
    }
}

template <class T, class TA, int RT>
int launch_project(const cpeft_mat &big, const cpeft_mat &small, int64_t r, const cpeft_mat &out,
                   const DropoutIn<typename Num<T>::acc> &drop, cudaStream_t stream,
                   cpeft_status *st)
{
    constexpr int rpw = RT <= kNarrowRanks ? 4 : 1;
    const int64_t rows_per_block = (int64_t)kProjectWarps * rpw;
    int64_t blocks = (big.rows + rows_per_block - 1) / rows_per_block;
    if (blocks > (1 << 20)) blocks = 1 << 20;
    project_kernel<T, TA, RT, rpw><<<(unsigned)blocks, kProjectWarps * 32, 0, stream>>>(
        big.rows, big.cols, r, static_cast<const T *>(big.data), big.row_stride, big.col_stride,
        static_cast<const TA *>(small.data), small.row_stride, small.col_stride,
        static_cast<T *>(out.data), out.row_stride, out.col_stride, drop);
    CPEFT_LAUNCH_CHECK(st, "project_kernel");
    return CPEFT_OK;
}

/* ---------------------------------------------------------------------------------------------
 * reduce: out (R x L) = alpha · smallᵀ · d(big), summed over row slices in a fixed order
 * ------------------------------------------------------------------------------------------- */

const int kReduceThreads = 128;
const int kReduceStage = 32;        /* rows of small staged in shared memory at a time */
const int kReduceTargetBlocks = 256;

template <int RT> __host__ __device__ constexpr int reduce_cols_per_thread() { return RT <= kNarrowRanks ? 4 : 1; }

/* Slices of rows: enough blocks to fill a large GPU, decided by the shape alone so that the
 * summation order (and so every bit of the result) is the same on every device and run. */
int64_t reduce_slices(int64_t m, int64_t len, int cols_per_thread, int64_t *rows_per_slice)
{
    const int64_t cols_per_block = (int64_t)kReduceThreads * cols_per_thread;
    const int64_t col_blocks = (len + cols_per_block - 1) / cols_per_block;
    int64_t slices = (kReduceTargetBlocks + col_blocks - 1) / col_blocks;
    const int64_t by_rows = (m + 63) / 64;  /* at least 64 rows per slice */
    if (slices > by_rows) slices = by_rows;
    if (slices > 64) slices = 64;
    if (slices < 1) slices = 1;
    *rows_per_slice = m > 0 ? (m + slices - 1) / slices : 1;
    return m > 0 ? (m + *rows_per_slice - 1) / *rows_per_slice : 1;
}

template <class T, class TS, class TO, int RT, int CPT>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_rows_kernel(int64_t m, int64_t len, int64_t r, const TS *small, int64_t s_rs,
                       int64_t s_cs, const T *big, int64_t b_rs, int64_t b_cs,
                       int64_t rows_per_slice, DropoutIn<typename Num<T>::acc> drop,
                       typename Num<T>::acc alpha, TO *out, int64_t o_rs, int64_t o_cs,
                       typename Num<T>::acc *partial)
{
    typedef typename Num<T>::acc Acc;
    __shared__ Acc small_s[kReduceStage][RT];
    const int64_t i0 = ((int64_t)blockIdx.x * kReduceThreads + threadIdx.x) * CPT;
    const int64_t m_begin = (int64_t)blockIdx.y * rows_per_slice;
    const int64_t m_end = m_begin + rows_per_slice < m ? m_begin + rows_per_slice : m;
    Acc acc[RT][CPT];
#pragma unroll
    for (int k = 0; k < RT; ++k)
#pragma unroll
        for (int q = 0; q < CPT; ++q)
            acc[k][q] = Acc(0);
    for (int64_t mb = m_begin; mb < m_end; mb += kReduceStage) {
        __syncthreads();
        for (int e = threadIdx.x; e < kReduceStage * RT; e += blockDim.x) {
            const int rr = e / RT, k = e - rr * RT;
            const int64_t row = mb + rr;
            small_s[rr][k] = row < m_end && k < r ? (Acc)Num<TS>::load(small[row * s_rs + k * s_cs])
                                                  : Acc(0);
        }
        __syncthreads();
        const int rows = (int)(m_end - mb < kReduceStage ? m_end - mb : kReduceStage);
        for (int rr = 0; rr < rows; ++rr) {
            const int64_t row = mb + rr;
            Acc v[CPT];
            if constexpr (CPT == 4) {
                if (i0 < len) {
                    load4(big + row * b_rs, b_cs, i0, len, v);
                    if (drop.on)
                        apply_dropout4(drop, (uint64_t)row * (uint64_t)len + (uint64_t)i0, v);
                } else {
                    v[0] = v[1] = v[2] = v[3] = Acc(0);
                }
            } else {
                v[0] = i0 < len ? (Acc)Num<T>::load(big[row * b_rs + i0 * b_cs]) : Acc(0);
                if (drop.on && i0 < len) {
                    const uint64_t c = drop.offset + (uint64_t)row * (uint64_t)len + (uint64_t)i0;
                    v[0] *= cpeft_dropout_uniform(drop.seed, c) >= drop.p ? drop.factor : Acc(0);
                }
            }
#pragma unroll
            for (int k = 0; k < RT; ++k) {
                const Acc s = small_s[rr][k];
#pragma unroll
                for (int q = 0; q < CPT; ++q)
                    acc[k][q] += s * v[q];
            }
        }
    }
    if (i0 >= len)
        return;
    if (gridDim.y == 1) {
#pragma unroll
        for (int k = 0; k < RT; ++k)
#pragma unroll
            for (int q = 0; q < CPT; ++q)
                if (k < r && i0 + q < len)
                    out[k * o_rs + (i0 + q) * o_cs] = Num<TO>::store(alpha * acc[k][q]);
        return;
    }
    Acc *slice = partial + (int64_t)blockIdx.y * r * len;
#pragma unroll
    for (int k = 0; k < RT; ++k)
#pragma unroll
        for (int q = 0; q < CPT; ++q)
            if (k < r && i0 + q < len)
                slice[k * len + i0 + q] = acc[k][q];
}

template <class TO, class Acc>
__global__ void reduce_finalize_kernel(int64_t slices, int64_t r, int64_t len,
                                       const Acc *partial, Acc alpha, TO *out, int64_t o_rs,
                                       int64_t o_cs)
{
    const int64_t n = r * len;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        Acc total = 0;
        for (int64_t s = 0; s < slices; ++s)
            total += partial[s * n + e];
        const int64_t k = e / len, i = e - k * len;
        out[k * o_rs + i * o_cs] = Num<TO>::store(alpha * total);
    }
}

template <class T, class TS, int RT>
int launch_reduce(const cpeft_mat &small, const cpeft_mat &big, int64_t r,
                  const DropoutIn<typename Num<T>::acc> &drop, double alpha,
                  const cpeft_mat &out, void *partial, cudaStream_t stream, cpeft_status *st)
{
    typedef typename Num<T>::acc Acc;
    constexpr int cpt = reduce_cols_per_thread<RT>();
    const int64_t m = big.rows, len = big.cols;
    int64_t rows_per_slice = 1;
    const int64_t slices = reduce_slices(m, len, cpt, &rows_per_slice);
    const int64_t cols_per_block = (int64_t)kReduceThreads * cpt;
    const int64_t col_blocks = (len + cols_per_block - 1) / cols_per_block;
    if (col_blocks > INT_MAX)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, "rank-r reduction over %lld columns",
                          (long long)len);
    if (slices > 1 && !partial)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "rank-r reduction: no partial-sum workspace");
    const dim3 grid((unsigned)col_blocks, (unsigned)slices);
    reduce_rows_kernel<T, TS, T, RT, cpt><<<grid, kReduceThreads, 0, stream>>>(
        m, len, r, static_cast<const TS *>(small.data), small.row_stride, small.col_stride,
        static_cast<const T *>(big.data), big.row_stride, big.col_stride, rows_per_slice, drop,
        (Acc)alpha, static_cast<T *>(out.data), out.row_stride, out.col_stride,
        static_cast<Acc *>(partial));
    CPEFT_LAUNCH_CHECK(st, "reduce_rows_kernel");
    if (slices == 1)
        return CPEFT_OK;
    reduce_finalize_kernel<T, Acc><<<grid_1d(r * len, 256), 256, 0, stream>>>(
        slices, r, len, static_cast<const Acc *>(partial), (Acc)alpha, static_cast<T *>(out.data),
        out.row_stride, out.col_stride);
    CPEFT_LAUNCH_CHECK(st, "reduce_finalize_kernel");
    return CPEFT_OK;
}

/* ---------------------------------------------------------------------------------------------
 * expand with dropout: out (M x L) = alpha · d(small · a)
 * ------------------------------------------------------------------------------------------- */

const int kExpandThreads = 128;
const int kExpandCols = kExpandThreads * 4;
const int kExpandRows = 8;          /* rows per register tile: each staged value of a used 8x */
const int kExpandTargetBlocks = 256;

template <class Acc> __host__ __device__ constexpr int expand_rank_tile() { return sizeof(Acc) == 8 ? 8 : 16; }

template <class T, class TA>
__global__ void __launch_bounds__(kExpandThreads)
    expand_dropout_kernel(int64_t m, int64_t len, int64_t r, const T *small, int64_t s_rs,
                          int64_t s_cs, const TA *a, int64_t a_rs, int64_t a_cs,
                          int64_t rows_per_block, DropoutIn<typename Num<T>::acc> drop, T *out,
                          int64_t o_rs, int64_t o_cs)
{
    typedef typename Num<T>::acc Acc;
    constexpr int KT = expand_rank_tile<Acc>();
    __shared__ __align__(16) Acc a_s[KT][kExpandCols];
    __shared__ Acc small_s[KT][kExpandRows];
    const int64_t c_base = (int64_t)blockIdx.x * kExpandCols;
    const int64_t i0 = c_base + (int64_t)threadIdx.x * 4;
    const int64_t m_begin = (int64_t)blockIdx.y * rows_per_block;
    const int64_t m_end = m_begin + rows_per_block < m ? m_begin + rows_per_block : m;
    const bool one_tile = r <= KT;

    for (int64_t mb = m_begin; mb < m_end; mb += kExpandRows) {
        Acc acc[kExpandRows][4];
#pragma unroll
        for (int rr = 0; rr < kExpandRows; ++rr)
#pragma unroll
            for (int q = 0; q < 4; ++q)
                acc[rr][q] = Acc(0);
        for (int64_t k0 = 0; k0 < r; k0 += KT) {
            __syncthreads();    /* the previous tile's reads are done */
            if (!one_tile || mb == m_begin)
                for (int e = threadIdx.x; e < KT * kExpandCols; e += blockDim.x) {
                    const int k = e / kExpandCols, j = e - k * kExpandCols;
                    const int64_t i = c_base + j;
                    a_s[k][j] = k0 + k < r && i < len
                                    ? (Acc)Num<TA>::load(a[(k0 + k) * a_rs + i * a_cs])
                                    : Acc(0);
                }
            for (int e = threadIdx.x; e < KT * kExpandRows; e += blockDim.x) {
                const int k = e / kExpandRows, rr = e - k * kExpandRows;
                const int64_t row = mb + rr;
                small_s[k][rr] = k0 + k < r && row < m_end
                                     ? (Acc)Num<T>::load(small[row * s_rs + (k0 + k) * s_cs])
                                     : Acc(0);
            }
            __syncthreads();
#pragma unroll
            for (int k = 0; k < KT; ++k) {
                const int j = threadIdx.x * 4;
                const Acc a0 = a_s[k][j], a1 = a_s[k][j + 1], a2 = a_s[k][j + 2],
                          a3 = a_s[k][j + 3];
#pragma unroll
                for (int rr = 0; rr < kExpandRows; ++rr) {
                    const Acc s = small_s[k][rr];
                    acc[rr][0] += s * a0;
                    acc[rr][1] += s * a1;
                    acc[rr][2] += s * a2;
                    acc[rr][3] += s * a3;
                }
            }
        }
        if (i0 < len) {
#pragma unroll
            for (int rr = 0; rr < kExpandRows; ++rr) {
                const int64_t row = mb + rr;
                if (row >= m_end)
                    break;
                apply_dropout4(drop, (uint64_t)row * (uint64_t)len + (uint64_t)i0, acc[rr]);
                store4(out + row * o_rs, o_cs, i0, len, acc[rr]);
            }
        }
    }
}

template <class T, class TA>
int launch_expand(const cpeft_mat &small, const cpeft_mat &a, const DropoutIn<typename Num<T>::acc> &drop,
                  const cpeft_mat &out, cudaStream_t stream, cpeft_status *st)
{
    const int64_t m = out.rows, len = out.cols, r = small.cols;
    const int64_t col_blocks = (len + kExpandCols - 1) / kExpandCols;
    if (col_blocks > INT_MAX)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, "rank-r expansion over %lld columns",
                          (long long)len);
    int64_t row_groups = (kExpandTargetBlocks + col_blocks - 1) / col_blocks;
    const int64_t tiles = (m + kExpandRows - 1) / kExpandRows;
    if (row_groups > tiles) row_groups = tiles;
    if (row_groups < 1) row_groups = 1;
    /* Whole register tiles per block, so only the last block has a partial tile. */
    const int64_t tiles_per_block = (tiles + row_groups - 1) / row_groups;
    const int64_t rows_per_block = tiles_per_block * kExpandRows;
    row_groups = (m + rows_per_block - 1) / rows_per_block;
    const dim3 grid((unsigned)col_blocks, (unsigned)row_groups);
    expand_dropout_kernel<T, TA><<<grid, kExpandThreads, 0, stream>>>(
        m, len, r, static_cast<const T *>(small.data), small.row_stride, small.col_stride,
        static_cast<const TA *>(a.data), a.row_stride, a.col_stride, rows_per_block, drop,
        static_cast<T *>(out.data), out.row_stride, out.col_stride);
    CPEFT_LAUNCH_CHECK(st, "expand_dropout_kernel");
    return CPEFT_OK;
}

int check_shapes(bool ok, const char *what, cpeft_status *st)
{
    return ok ? (int)CPEFT_OK
              : cpeft_fail(st, CPEFT_ERR_INTERNAL, "%s: operand shapes do not chain", what);
}

} /* namespace */

/* ---------------------------------------------------------------------------------------------
 * Launchers
 * ------------------------------------------------------------------------------------------- */

int rank_project(cpeft_dtype dt, const cpeft_mat &big, const cpeft_dropout *drop,
                 const cpeft_mat &small, const cpeft_mat &out, cudaStream_t stream,
                 cpeft_status *st)
{
    CPEFT_TRY(check_shapes(small.cols == big.cols && out.rows == big.rows &&
                               out.cols == small.rows,
                           "rank_project", st));
    if (big.rows == 0 || small.rows == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        const DropoutIn<Acc> d = dropout_in<Acc>(drop, 1.0);
        constexpr int wide = wide_rank_tile<T>();
        const size_t elt = sizeof(T);
        for (int64_t k0 = 0; k0 < small.rows; k0 += wide) {
            const int64_t n = small.rows - k0 < wide ? small.rows - k0 : wide;
            const cpeft_mat s = mat_block(small, k0, n, 0, small.cols, elt);
            const cpeft_mat o = mat_block(out, 0, out.rows, k0, n, elt);
            if (n <= kNarrowRanks)
                CPEFT_TRY((launch_project<T, T, kNarrowRanks>(big, s, n, o, d, stream, st)));
            else
                CPEFT_TRY((launch_project<T, T, wide>(big, s, n, o, d, stream, st)));
        }
        return (int)CPEFT_OK;
    });
}

/* A launch over a rank tile of `tile` ranks writes slices x tile x len partial sums; R above
 * the narrow tile is cut into wide tiles and a narrow remainder, so both sizes are covered. */
static size_t reduce_tile_bytes(cpeft_dtype dt, int64_t m, int64_t len, int64_t tile)
{
    if (tile <= 0 || len <= 0)
        return 0;
    const int cpt = tile <= kNarrowRanks ? reduce_cols_per_thread<kNarrowRanks>()
                                         : reduce_cols_per_thread<64>();
    int64_t rows_per_slice = 1;
    const int64_t slices = reduce_slices(m, len, cpt, &rows_per_slice);
    if (slices <= 1)
        return 0;
    return (size_t)slices * (size_t)tile * (size_t)len * cpeft_dtype_size(acc_dtype(dt));
}

size_t rank_reduce_partial_bytes(cpeft_dtype dt, int64_t m, int64_t len, int64_t r)
{
    const int64_t wide = dt == CPEFT_FLOAT64 ? wide_rank_tile<double>() : wide_rank_tile<float>();
    const size_t narrow = reduce_tile_bytes(dt, m, len, r < kNarrowRanks ? r : kNarrowRanks);
    const size_t widest = reduce_tile_bytes(dt, m, len, r < wide ? r : wide);
    return narrow > widest ? narrow : widest;
}

int rank_reduce(cpeft_dtype dt, const cpeft_mat &small, const cpeft_mat &big,
                const cpeft_dropout *drop, double alpha, const cpeft_mat &out, void *partial,
                cudaStream_t stream, cpeft_status *st)
{
    CPEFT_TRY(check_shapes(small.rows == big.rows && out.rows == small.cols &&
                               out.cols == big.cols,
                           "rank_reduce", st));
    if (out.rows == 0 || out.cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        const DropoutIn<Acc> d = dropout_in<Acc>(drop, 1.0);
        constexpr int wide = wide_rank_tile<T>();
        const size_t elt = sizeof(T);
        for (int64_t k0 = 0; k0 < small.cols; k0 += wide) {
            const int64_t n = small.cols - k0 < wide ? small.cols - k0 : wide;
            const cpeft_mat s = mat_block(small, 0, small.rows, k0, n, elt);
            const cpeft_mat o = mat_block(out, k0, n, 0, out.cols, elt);
            if (n <= kNarrowRanks)
                CPEFT_TRY((launch_reduce<T, T, kNarrowRanks>(s, big, n, d, alpha, o, partial,
                                                             stream, st)));
            else
                CPEFT_TRY((launch_reduce<T, T, wide>(s, big, n, d, alpha, o, partial, stream,
                                                     st)));
        }
        return (int)CPEFT_OK;
    });
}

int rank_expand_dropout(cpeft_dtype dt, const cpeft_mat &small, const cpeft_mat &a,
                        const cpeft_dropout *drop, double alpha, const cpeft_mat &out,
                        cudaStream_t stream, cpeft_status *st)
{
    CPEFT_TRY(check_shapes(small.cols == a.rows && out.rows == small.rows && out.cols == a.cols,
                           "rank_expand_dropout", st));
    if (out.rows == 0 || out.cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        DropoutIn<Acc> d = dropout_in<Acc>(drop, alpha);
        if (!d.on) {
            /* p == 0 reaches here only through a caller's choice; the mask then keeps all. */
            d.on = 1;
            d.p = 0.0f;
        }
        return launch_expand<T, T>(small, a, d, out, stream, st);
    });
}

} /* namespace cpeft_cuda */
