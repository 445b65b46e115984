/*
 * The skinny products of the LoRA branch as own kernels (declared in rank_r.cuh).
 *
 * cuBLAS runs x·Aᵀ (M x IN times IN x R), g·B, gbᵀ·x and gᵀ·xa as split-K GEMMs: 5-12 us each
 * at M=4096, 4096², r=16 on an H200, against a memory floor of about 7 us for one read of x
 * (gpu-runs/2026-11-30-18e3f0a/profile.txt). And with dropout cuBLAS needs drop(x) as data: the
 * previous path materialized it a row chunk at a time, six 36-us passes per step. Here:
 *
 *   project: out (M x R) = d(big) (M x L) · smallᵀ (R x L): a warp per two rows, small staged
 *            in shared memory 32 KB of L at a time, big read once, each lane summing groups of 4
 *            consecutive columns, a warp shuffle tree at the end.
 *   reduce:  out (R x L) = alpha · smallᵀ (M x R) · d(big) (M x L): threads own columns of big,
 *            rows cut into slices whose fp32 partial sums are added in slice order by a second
 *            kernel, so the result does not depend on scheduling (no atomics).
 *   expand:  out (M x L) = alpha · d(small (M x R) · a (R x L)): the LoRA part of grad_x with the
 *            dropout mask applied as it is written (without dropout cuBLAS does this product at
 *            memory speed already).
 *   embedding forward: the expansion with gathered rows, y[n] = W[idx[n]] + alpha·A[:, idx[n]]ᵀ·Bᵀ
 *            in one pass (W's rows read once, y written once).
 *
 * d is the dropout of core.h regenerated in the kernel: element (m, i) has counter
 * offset + m*L + i modulo 2^64, and each lane's four consecutive columns cost one Philox call
 * (two when the counters straddle a Philox block). The kernels are templated on the adapter's
 * element type apart from the activations', so fp32 adapters beside fp16/bf16 activations can be
 * instantiated without widening x; today every operand of one call has one dtype.
 */
#include "cpeft/views.h"
#include "kernel_support.cuh"
#include "rank_r.cuh"
#include "status.cuh"

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
 * Dropout of four consecutive counters
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
            w0 = u[1];
            w1 = u[2];
            w2 = u[3];
            w3 = v[0];
        } else if (lead == 2) {
            w0 = u[2];
            w1 = u[3];
            w2 = v[0];
            w3 = v[1];
        } else {
            w0 = u[3];
            w1 = v[0];
            w2 = v[1];
            w3 = v[2];
        }
    }
    return keep_bit(w0, p, 0) | keep_bit(w1, p, 1) | keep_bit(w2, p, 2) | keep_bit(w3, p, 3);
}

/* cpeft_dropout_keep for one counter, with the lane picked by constant indices (core.h's
 * ctr[c & 3] would put the Philox state in local memory). */
__device__ __forceinline__ bool keep_one(uint64_t seed, uint64_t c, float p)
{
    const uint64_t b = c >> 2;
    uint32_t u[4] = {(uint32_t)b, (uint32_t)(b >> 32), 0u, 0u};
    cpeft_philox4x32_10(u, (uint32_t)seed, (uint32_t)(seed >> 32));
    const unsigned lane = (unsigned)(c & 3);
    const uint32_t w = lane == 0 ? u[0] : lane == 1 ? u[1] : lane == 2 ? u[2] : u[3];
    return keep_bit(w, p, 0) != 0;
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

template <class Acc> __device__ __forceinline__ Acc warp_sum(Acc v)
{
#pragma unroll
    for (int lanes = 16; lanes > 0; lanes >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, lanes);
    return v;
}

/* dst[k][j] = src[(k0 + k) * s_rs + (c0 + j) * s_cs] where k0 + k < k_end and c0 + j < c_end,
 * else 0, for k < K and j < J, by all threads of a 1-D block. The loop runs along whichever index
 * is contiguous in memory, so that a warp's loads are coalesced (B read as Bᵀ has its rank index
 * contiguous). PITCH = J + 4 keeps rows 16-byte aligned and spreads the rank rows over the banks
 * when they are written rank-fastest. */
template <class TA, class Acc, int K, int J, int PITCH>
__device__ __forceinline__ void stage_tile(Acc (*dst)[PITCH], const TA *src, int64_t s_rs,
                                           int64_t s_cs, int64_t k0, int64_t k_end, int64_t c0,
                                           int64_t c_end)
{
    const bool rank_fastest = s_rs == 1 && s_cs != 1;
    for (int e = threadIdx.x; e < K * J; e += blockDim.x) {
        int k, j;
        if (rank_fastest) {
            j = e / K;
            k = e - j * K;
        } else {
            k = e / J;
            j = e - k * J;
        }
        const int64_t kk = k0 + k, c = c0 + j;
        dst[k][j] = kk < k_end && c < c_end ? (Acc)Num<TA>::load(src[kk * s_rs + c * s_cs])
                                            : Acc(0);
    }
}

/* Ranks handled per launch: the accumulators live in registers, so R is cut into tiles of this
 * many (R above 32 reads big once per tile). fp64 keeps its staged tile within 48 KB of shared
 * memory with fewer ranks. */
template <class T> __host__ __device__ constexpr int wide_rank_tile()
{
    return sizeof(T) == 8 ? 16 : 32;
}
const int kNarrowRanks = 16;

/* ---------------------------------------------------------------------------------------------
 * project: out (M x R) = d(big) · smallᵀ
 * ------------------------------------------------------------------------------------------- */

const int kProjectWarps = 8;
/* Staged columns of small per step: 32 KB of shared memory, so a step's x loads (several 4-wide
 * groups per lane and row) are many bytes in flight for few barriers. */
const int kProjectStageBytes = 32 * 1024;

template <class Acc, int RT> __host__ __device__ constexpr int project_groups()
{
    return kProjectStageBytes / (RT * 128 * (int)sizeof(Acc)) > 4
               ? 4
               : kProjectStageBytes / (RT * 128 * (int)sizeof(Acc));
}

/* RPW rows per warp; each lane owns G groups of 4 consecutive columns in a chunk of 128·G. */
template <class T, class TA, class TO, int RT, int RPW>
__global__ void __launch_bounds__(kProjectWarps * 32)
    project_kernel(int64_t m, int64_t len, int64_t r, const T *big, int64_t b_rs, int64_t b_cs,
                   const TA *small, int64_t s_rs, int64_t s_cs, TO *out, int64_t o_rs, int64_t o_cs,
                   DropoutIn<typename Num<T>::acc> drop)
{
    typedef typename Num<T>::acc Acc;
    constexpr int G = project_groups<Acc, RT>();
    constexpr int CH = 128 * G;
    __shared__ __align__(16) Acc small_s[RT][CH + 4];
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
        for (int64_t c0 = 0; c0 < len; c0 += CH) {
            __syncthreads();    /* the previous chunk's reads of small_s are done */
            stage_tile<TA, Acc, RT, CH, CH + 4>(small_s, small, s_rs, s_cs, 0, r, c0, len);
            /* x's loads are issued before the barrier so that they overlap the staging. */
            Acc v[RPW][G][4];
#pragma unroll
            for (int rr = 0; rr < RPW; ++rr) {
                const int64_t row = row0 + rr;
#pragma unroll
                for (int grp = 0; grp < G; ++grp) {
                    const int64_t i0 = c0 + grp * 128 + lane * 4;
                    if (row < m && i0 < len) {
                        load4(big + row * b_rs, b_cs, i0, len, v[rr][grp]);
                        if (drop.on)
                            apply_dropout4(drop, (uint64_t)row * (uint64_t)len + (uint64_t)i0,
                                           v[rr][grp]);
                    } else {
#pragma unroll
                        for (int q = 0; q < 4; ++q)
                            v[rr][grp][q] = Acc(0);
                    }
                }
            }
            __syncthreads();
#pragma unroll
            for (int grp = 0; grp < G; ++grp) {
                const int j = grp * 128 + lane * 4;
#pragma unroll
                for (int k = 0; k < RT; ++k) {
                    const Acc a0 = small_s[k][j], a1 = small_s[k][j + 1];
                    const Acc a2 = small_s[k][j + 2], a3 = small_s[k][j + 3];
#pragma unroll
                    for (int rr = 0; rr < RPW; ++rr)
                        acc[rr][k] += v[rr][grp][0] * a0 + v[rr][grp][1] * a1 + v[rr][grp][2] * a2 +
                                      v[rr][grp][3] * a3;
                }
            }
        }
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) {
            const int64_t row = row0 + rr;
#pragma unroll
            for (int k = 0; k < RT; ++k) {
                const Acc total = warp_sum(acc[rr][k]);
                if (lane == 0 && row < m && k < r)
                    out[row * o_rs + k * o_cs] = Num<TO>::store(total);
            }
        }
    }
}

template <class T, class TA, class TO, int RT>
int launch_project(const cpeft_mat &big, const cpeft_mat &small, int64_t r, const cpeft_mat &out,
                   const DropoutIn<typename Num<T>::acc> &drop, cudaStream_t stream,
                   cpeft_status *st)
{
    constexpr int rpw = RT <= kNarrowRanks ? 2 : 1;
    const int64_t rows_per_block = (int64_t)kProjectWarps * rpw;
    int64_t blocks = (big.rows + rows_per_block - 1) / rows_per_block;
    if (blocks > (1 << 20))
        blocks = 1 << 20;
    project_kernel<T, TA, TO, RT, rpw><<<(unsigned)blocks, kProjectWarps * 32, 0, stream>>>(
        big.rows, big.cols, r, static_cast<const T *>(big.data), big.row_stride, big.col_stride,
        static_cast<const TA *>(small.data), small.row_stride, small.col_stride,
        static_cast<TO *>(out.data), out.row_stride, out.col_stride, drop);
    CPEFT_LAUNCH_CHECK(st, "project_kernel");
    return CPEFT_OK;
}

/* ---------------------------------------------------------------------------------------------
 * reduce: out (R x L) = alpha · smallᵀ · d(big), summed over row slices in a fixed order
 * ------------------------------------------------------------------------------------------- */

const int kReduceThreads = 128;
const int kReduceStage = 32;        /* rows of small staged in shared memory at a time */
/* Rows loaded ahead per thread (divides kReduceStage); fp64's wider registers take half. */
template <class Acc> __host__ __device__ constexpr int reduce_unroll()
{
    return sizeof(Acc) == 8 ? 4 : 8;
}
const int kReduceTargetBlocks = 512;

template <int RT> __host__ __device__ constexpr int reduce_cols_per_thread()
{
    return RT <= kNarrowRanks ? 4 : 1;
}

/* Slices of rows: enough blocks to fill a large GPU, decided by the shape alone so that the
 * summation order (and so every bit of the result) is the same on every device and run. */
int64_t reduce_slices(int64_t m, int64_t len, int cols_per_thread, int64_t *rows_per_slice)
{
    const int64_t cols_per_block = (int64_t)kReduceThreads * cols_per_thread;
    const int64_t col_blocks = (len + cols_per_block - 1) / cols_per_block;
    int64_t slices = (kReduceTargetBlocks + col_blocks - 1) / col_blocks;
    const int64_t by_rows = (m + 63) / 64;  /* at least 64 rows per slice */
    if (slices > by_rows)
        slices = by_rows;
    if (slices > 64)
        slices = 64;
    if (slices < 1)
        slices = 1;
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
        /* U rows' loads are issued before any of them is used, so that many bytes are in
         * flight per thread; rows past `rows` load nothing and meet zeros in small_s. */
        constexpr int U = reduce_unroll<Acc>();
        for (int rr0 = 0; rr0 < rows; rr0 += U) {
            Acc v[U][CPT];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int64_t row = mb + rr0 + u;
                const bool live = rr0 + u < rows && i0 < len;
                if constexpr (CPT == 4) {
                    if (live) {
                        load4(big + row * b_rs, b_cs, i0, len, v[u]);
                    } else {
#pragma unroll
                        for (int q = 0; q < 4; ++q)
                            v[u][q] = Acc(0);
                    }
                } else {
                    v[u][0] = live ? (Acc)Num<T>::load(big[row * b_rs + i0 * b_cs]) : Acc(0);
                }
            }
            if (drop.on) {
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const uint64_t e0 = (uint64_t)(mb + rr0 + u) * (uint64_t)len + (uint64_t)i0;
                    if constexpr (CPT == 4) {
                        apply_dropout4(drop, e0, v[u]);
                    } else {
                        v[u][0] *= keep_one(drop.seed, drop.offset + e0, drop.p) ? drop.factor
                                                                                 : Acc(0);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int k = 0; k < RT; ++k) {
                    const Acc sk = small_s[rr0 + u][k];
#pragma unroll
                    for (int q = 0; q < CPT; ++q)
                        acc[k][q] += sk * v[u][q];
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
__global__ void reduce_finalize_kernel(int64_t slices, int64_t r, int64_t len, const Acc *partial,
                                       Acc alpha, TO *out, int64_t o_rs, int64_t o_cs)
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
                  const DropoutIn<typename Num<T>::acc> &drop, double alpha, const cpeft_mat &out,
                  void *partial, cudaStream_t stream, cpeft_status *st)
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
const int kExpandTargetBlocks = 1024;  /* about 8 per multiprocessor: memory-bound */

template <class Acc> __host__ __device__ constexpr int expand_rank_tile()
{
    return sizeof(Acc) == 8 ? 8 : 16;
}

template <class T, class TA>
__global__ void __launch_bounds__(kExpandThreads)
    expand_dropout_kernel(int64_t m, int64_t len, int64_t r, const T *small, int64_t s_rs,
                          int64_t s_cs, const TA *a, int64_t a_rs, int64_t a_cs,
                          int64_t rows_per_block, DropoutIn<typename Num<T>::acc> drop, T *out,
                          int64_t o_rs, int64_t o_cs)
{
    typedef typename Num<T>::acc Acc;
    constexpr int KT = expand_rank_tile<Acc>();
    __shared__ __align__(16) Acc a_s[KT][kExpandCols + 4];
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
                stage_tile<TA, Acc, KT, kExpandCols, kExpandCols + 4>(a_s, a, a_rs, a_cs, k0, r,
                                                                      c_base, len);
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

/* ---------------------------------------------------------------------------------------------
 * LoRA embedding forward in one pass: y[n] = W[idx[n]] + alpha · A[:, idx[n]]ᵀ·Bᵀ
 *
 * The expansion above with its rows gathered: the rank-R rows of A's columns picked by the
 * indices, B staged as Bᵀ tiles, and the gathered row of W added as y is written, so W's rows
 * are read once and y written once (the previous path wrote y, then a GEMM read and wrote it
 * again). An index outside [0, V) gives a NaN row and reads nothing.
 * ------------------------------------------------------------------------------------------- */

template <class T, class I>
__global__ void __launch_bounds__(kExpandThreads)
    embedding_forward_kernel(int64_t n, int64_t dim, int64_t r, int64_t vocab, const I *indices,
                             int64_t idx_stride, const T *w, int64_t w_rs, int64_t w_cs,
                             const T *lora_a, int64_t a_rs, int64_t a_cs, const T *lora_b,
                             int64_t b_rs, int64_t b_cs, int64_t rows_per_block,
                             typename Num<T>::acc alpha, T *y, int64_t y_rs, int64_t y_cs)
{
    typedef typename Num<T>::acc Acc;
    constexpr int KT = expand_rank_tile<Acc>();
    __shared__ __align__(16) Acc b_s[KT][kExpandCols + 4];
    __shared__ Acc a_s[KT][kExpandRows];
    __shared__ int64_t rows_s[kExpandRows];
    const int64_t c_base = (int64_t)blockIdx.x * kExpandCols;
    const int64_t i0 = c_base + (int64_t)threadIdx.x * 4;
    const int64_t m_begin = (int64_t)blockIdx.y * rows_per_block;
    const int64_t m_end = m_begin + rows_per_block < n ? m_begin + rows_per_block : n;
    const bool one_tile = r <= KT;

    for (int64_t mb = m_begin; mb < m_end; mb += kExpandRows) {
        __syncthreads();    /* the previous tile's reads of rows_s are done */
        if (threadIdx.x < kExpandRows) {
            const int64_t p = mb + threadIdx.x;
            int64_t row = -1;
            if (p < m_end) {
                const int64_t idx = (int64_t)indices[p * idx_stride];
                row = idx >= 0 && idx < vocab ? idx : -1;
            }
            rows_s[threadIdx.x] = row;
        }
        __syncthreads();
        Acc acc[kExpandRows][4];
#pragma unroll
        for (int rr = 0; rr < kExpandRows; ++rr)
#pragma unroll
            for (int q = 0; q < 4; ++q)
                acc[rr][q] = Acc(0);
        for (int64_t k0 = 0; k0 < r; k0 += KT) {
            __syncthreads();
            if (!one_tile || mb == m_begin)     /* Bᵀ: rank k of column c is B[c][k] */
                stage_tile<T, Acc, KT, kExpandCols, kExpandCols + 4>(b_s, lora_b, b_cs, b_rs, k0, r,
                                                                     c_base, dim);
            for (int e = threadIdx.x; e < KT * kExpandRows; e += blockDim.x) {
                const int k = e / kExpandRows, rr = e - k * kExpandRows;
                const int64_t row = rows_s[rr];
                a_s[k][rr] = k0 + k < r && row >= 0
                                 ? (Acc)Num<T>::load(lora_a[(k0 + k) * a_rs + row * a_cs])
                                 : Acc(0);
            }
            __syncthreads();
#pragma unroll
            for (int k = 0; k < KT; ++k) {
                const int j = threadIdx.x * 4;
                const Acc b0 = b_s[k][j], b1 = b_s[k][j + 1], b2 = b_s[k][j + 2],
                          b3 = b_s[k][j + 3];
#pragma unroll
                for (int rr = 0; rr < kExpandRows; ++rr) {
                    const Acc s = a_s[k][rr];
                    acc[rr][0] += s * b0;
                    acc[rr][1] += s * b1;
                    acc[rr][2] += s * b2;
                    acc[rr][3] += s * b3;
                }
            }
        }
        if (i0 < dim) {
#pragma unroll
            for (int rr = 0; rr < kExpandRows; ++rr) {
                const int64_t p = mb + rr;
                if (p >= m_end)
                    break;
                const int64_t row = rows_s[rr];
                Acc v[4];
                if (row >= 0) {
                    load4(w + row * w_rs, w_cs, i0, dim, v);
#pragma unroll
                    for (int q = 0; q < 4; ++q)
                        v[q] += alpha * acc[rr][q];
                } else {
#pragma unroll
                    for (int q = 0; q < 4; ++q)
                        v[q] = quiet_nan(Acc());
                }
                store4(y + p * y_rs, y_cs, i0, dim, v);
            }
        }
    }
}

/* Grid of the expansion kernels: column blocks of kExpandCols, row groups of whole register
 * tiles, about kExpandTargetBlocks blocks in all. */
int expand_grid(int64_t m, int64_t len, dim3 *grid, int64_t *rows_per_block, cpeft_status *st)
{
    const int64_t col_blocks = (len + kExpandCols - 1) / kExpandCols;
    if (col_blocks > INT_MAX)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, "rank-r expansion over %lld columns",
                          (long long)len);
    int64_t row_groups = (kExpandTargetBlocks + col_blocks - 1) / col_blocks;
    const int64_t tiles = (m + kExpandRows - 1) / kExpandRows;
    if (row_groups > tiles)
        row_groups = tiles;
    if (row_groups < 1)
        row_groups = 1;
    /* Whole register tiles per block, so only the last block has a partial tile. */
    const int64_t tiles_per_block = (tiles + row_groups - 1) / row_groups;
    *rows_per_block = (tiles_per_block > 0 ? tiles_per_block : 1) * kExpandRows;
    row_groups = (m + *rows_per_block - 1) / *rows_per_block;
    *grid = dim3((unsigned)col_blocks, (unsigned)(row_groups > 0 ? row_groups : 1));
    return CPEFT_OK;
}

template <class T, class TA>
int launch_expand(const cpeft_mat &small, const cpeft_mat &a,
                  const DropoutIn<typename Num<T>::acc> &drop, const cpeft_mat &out,
                  cudaStream_t stream, cpeft_status *st)
{
    dim3 grid;
    int64_t rows_per_block = 0;
    CPEFT_TRY(expand_grid(out.rows, out.cols, &grid, &rows_per_block, st));
    expand_dropout_kernel<T, TA><<<grid, kExpandThreads, 0, stream>>>(
        out.rows, out.cols, small.cols, static_cast<const T *>(small.data), small.row_stride,
        small.col_stride, static_cast<const TA *>(a.data), a.row_stride, a.col_stride,
        rows_per_block, drop, static_cast<T *>(out.data), out.row_stride, out.col_stride);
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
                 cpeft_status *st, bool out_acc)
{
    CPEFT_TRY(check_shapes(small.cols == big.cols && out.rows == big.rows && out.cols == small.rows,
                           "rank_project", st));
    if (big.rows == 0 || small.rows == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        const DropoutIn<Acc> d = dropout_in<Acc>(drop, 1.0);
        constexpr int wide = wide_rank_tile<T>();
        const cpeft_dtype out_dt = out_acc ? cpeft_acc_dtype(dt) : dt;
        for (int64_t k0 = 0; k0 < small.rows; k0 += wide) {
            const int64_t n = small.rows - k0 < wide ? small.rows - k0 : wide;
            const cpeft_mat sm = cpeft_mat_sub(dt, small, k0, n, 0, small.cols);
            const cpeft_mat o = cpeft_mat_sub(out_dt, out, 0, out.rows, k0, n);
            if (out_acc && n <= kNarrowRanks)
                CPEFT_TRY((launch_project<T, T, Acc, kNarrowRanks>(big, sm, n, o, d, stream, st)));
            else if (out_acc)
                CPEFT_TRY((launch_project<T, T, Acc, wide>(big, sm, n, o, d, stream, st)));
            else if (n <= kNarrowRanks)
                CPEFT_TRY((launch_project<T, T, T, kNarrowRanks>(big, sm, n, o, d, stream, st)));
            else
                CPEFT_TRY((launch_project<T, T, T, wide>(big, sm, n, o, d, stream, st)));
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
                                         : reduce_cols_per_thread<32>();
    int64_t rows_per_slice = 1;
    const int64_t slices = reduce_slices(m, len, cpt, &rows_per_slice);
    if (slices <= 1)
        return 0;
    return (size_t)slices * (size_t)tile * (size_t)len * cpeft_dtype_size(cpeft_acc_dtype(dt));
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
    CPEFT_TRY(check_shapes(small.rows == big.rows && out.rows == small.cols && out.cols == big.cols,
                           "rank_reduce", st));
    if (out.rows == 0 || out.cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        const DropoutIn<Acc> d = dropout_in<Acc>(drop, 1.0);
        constexpr int wide = wide_rank_tile<T>();
        for (int64_t k0 = 0; k0 < small.cols; k0 += wide) {
            const int64_t n = small.cols - k0 < wide ? small.cols - k0 : wide;
            const cpeft_mat s = cpeft_mat_sub(dt, small, 0, small.rows, k0, n);
            const cpeft_mat o = cpeft_mat_sub(dt, out, k0, n, 0, out.cols);
            if (n <= kNarrowRanks)
                CPEFT_TRY((launch_reduce<T, T, kNarrowRanks>(s, big, n, d, alpha, o, partial,
                                                             stream, st)));
            else
                CPEFT_TRY((launch_reduce<T, T, wide>(s, big, n, d, alpha, o, partial, stream, st)));
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

int rank_embedding_forward(cpeft_dtype dt, cpeft_dtype index_dt, const cpeft_vec &indices,
                           int64_t vocab, const cpeft_mat &weight, const cpeft_mat &lora_a,
                           const cpeft_mat &lora_b, double alpha, const cpeft_mat &y,
                           cudaStream_t stream, cpeft_status *st)
{
    CPEFT_TRY(check_shapes(lora_a.cols == vocab && lora_b.cols == lora_a.rows &&
                               y.rows == indices.len && y.cols == lora_b.rows,
                           "rank_embedding_forward", st));
    if (y.rows == 0 || y.cols == 0)
        return CPEFT_OK;
    dim3 grid;
    int64_t rows_per_block = 0;
    CPEFT_TRY(expand_grid(y.rows, y.cols, &grid, &rows_per_block, st));
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        return dispatch_index(index_dt, st, [&](auto itag) {
            typedef typename decltype(itag)::type I;
            embedding_forward_kernel<T, I><<<grid, kExpandThreads, 0, stream>>>(
                y.rows, y.cols, lora_a.rows, vocab, static_cast<const I *>(indices.data),
                indices.stride, static_cast<const T *>(weight.data), weight.row_stride,
                weight.col_stride, static_cast<const T *>(lora_a.data), lora_a.row_stride,
                lora_a.col_stride, static_cast<const T *>(lora_b.data), lora_b.row_stride,
                lora_b.col_stride, rows_per_block, (Acc)alpha, static_cast<T *>(y.data),
                y.row_stride, y.col_stride);
            CPEFT_LAUNCH_CHECK(st, "embedding_forward_kernel");
            return (int)CPEFT_OK;
        });
    });
}

} /* namespace cpeft_cuda */
