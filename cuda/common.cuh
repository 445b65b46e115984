/*
 * Shared CUDA machinery for the cpeft compute layer: status translation, the per-(device, stream)
 * context (cuBLAS handle and cached workspace), a cuBLAS GEMM on cpeft_mat views, and the numeric
 * traits the kernels use to load and store fp32/fp64/fp16/bf16 with fp32 (fp64) accumulation.
 *
 * Nothing here sees Python; errors become a cpeft_status that the boundary turns into
 * cpeft.CudaError. Nothing here exits, aborts or asserts.
 */
#ifndef CPEFT_CUDA_COMMON_CUH
#define CPEFT_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>

#include "cpeft/core.h"

namespace cpeft_cuda {

/* ---------------------------------------------------------------------------------------------
 * Status translation
 * ------------------------------------------------------------------------------------------- */

int fail_cuda(cpeft_status *st, cudaError_t err, const char *call, const char *file, int line,
              const char *func);
int fail_cublas(cpeft_status *st, cublasStatus_t status, const char *call, const char *file,
                int line, const char *func);

/* The whole call expression is stringized; fail_cuda prints it up to its '(' so the message names
 * the function that failed without its (possibly long) argument list. */
#define CPEFT_CUDA_CHECK(st, call)                                                              \
    do {                                                                                        \
        cudaError_t cpeft_err_ = (call);                                                        \
        if (cpeft_err_ != cudaSuccess)                                                          \
            return cpeft_cuda::fail_cuda((st), cpeft_err_, #call, __FILE__, __LINE__, __func__); \
    } while (0)

#define CPEFT_CUBLAS_CHECK(st, call)                                                            \
    do {                                                                                        \
        cublasStatus_t cpeft_blas_ = (call);                                                    \
        if (cpeft_blas_ != CUBLAS_STATUS_SUCCESS)                                               \
            return cpeft_cuda::fail_cublas((st), cpeft_blas_, #call, __FILE__, __LINE__,        \
                                           __func__);                                           \
    } while (0)

/* A launch reports configuration errors only through cudaGetLastError. */
#define CPEFT_LAUNCH_CHECK(st, kernel_name)                                                     \
    do {                                                                                        \
        cudaError_t cpeft_err_ = cudaGetLastError();                                            \
        if (cpeft_err_ != cudaSuccess)                                                          \
            return cpeft_cuda::fail_cuda((st), cpeft_err_, "launch of " kernel_name, __FILE__,  \
                                         __LINE__, __func__);                                   \
    } while (0)

/* Propagates a failed helper's status unchanged. */
#define CPEFT_TRY(expr)                                                                         \
    do {                                                                                        \
        int cpeft_rc_ = (expr);                                                                 \
        if (cpeft_rc_ != CPEFT_OK)                                                              \
            return cpeft_rc_;                                                                   \
    } while (0)

/* ---------------------------------------------------------------------------------------------
 * Per-(device, stream) context
 *
 * One cuBLAS handle and one workspace per (device, stream) pair, created on first use and kept
 * for the life of the process. Keying by stream (not only by device) is what makes two
 * concurrent streams safe: each has its own workspace, so work queued on one stream never
 * overwrites scratch data that work on the other is still reading, and cuBLAS's own per-handle
 * workspace is never shared across streams either. A Session holds the context's mutex for the
 * whole op, so two host threads on the same stream cannot interleave their use of the workspace.
 * ------------------------------------------------------------------------------------------- */

struct StreamContext;

class Session {
public:
    Session() = default;
    Session(const Session &) = delete;
    Session &operator=(const Session &) = delete;
    ~Session();

    /* Finds (or lazily creates) the context of the current device and `stream`, locks it and
     * binds its cuBLAS handle to the stream. */
    int open(void *stream, cpeft_status *st);

    /* Scratch memory of at least `bytes`, valid until the Session ends; grows the cached buffer
     * only when a larger size is first needed (that growth is the only cudaMalloc, and it waits
     * for this stream's earlier work before freeing the old buffer). */
    int workspace(size_t bytes, void **out, cpeft_status *st);

    /* The locked context (for the cuBLASLt plans it caches); null before open. */
    StreamContext *context() const;

    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;

private:
    StreamContext *ctx_ = nullptr;
    std::unique_lock<std::mutex> lock_;
};

/* Sequential carving of one workspace into aligned pieces: plan the sizes, then take them. */
inline size_t ws_align(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

class Carver {
public:
    explicit Carver(void *base) : base_(static_cast<char *>(base)) {}
    void *take(size_t bytes)
    {
        char *p = base_ + used_;
        used_ += ws_align(bytes);
        return p;
    }

private:
    char *base_;
    size_t used_ = 0;
};

/* ---------------------------------------------------------------------------------------------
 * Matrix views and GEMM
 * ------------------------------------------------------------------------------------------- */

inline cpeft_mat mat_transpose(const cpeft_mat &m)
{
    cpeft_mat t = {m.data, m.cols, m.rows, m.col_stride, m.row_stride};
    return t;
}

/* Rows [r0, r0 + nr) and columns [c0, c0 + nc) of m; elt is the element size in bytes. */
inline cpeft_mat mat_block(const cpeft_mat &m, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                           size_t elt)
{
    cpeft_mat b = m;
    b.data = static_cast<char *>(m.data) + (size_t)(r0 * m.row_stride + c0 * m.col_stride) * elt;
    b.rows = nr;
    b.cols = nc;
    return b;
}

/* A compact row-major rows x cols matrix at data. */
inline cpeft_mat mat_dense(void *data, int64_t rows, int64_t cols)
{
    cpeft_mat m = {data, rows, cols, cols > 1 ? cols : 1, 1};
    return m;
}

/* A compact matrix of like's shape at data, column-major when like is, so that an elementwise
 * pass from like into it streams through both. */
inline cpeft_mat mat_dense_like(const cpeft_mat &like, void *data)
{
    if (like.row_stride == 1 && like.col_stride != 1)
        return mat_transpose(mat_dense(data, like.cols, like.rows));
    return mat_dense(data, like.rows, like.cols);
}

/* The dtype partial results are accumulated in: fp32 for every float type except fp64. */
inline cpeft_dtype acc_dtype(cpeft_dtype dt)
{
    return dt == CPEFT_FLOAT64 ? CPEFT_FLOAT64 : CPEFT_FLOAT32;
}

/* C (m x n) = alpha * A (m x k) * B (k x n) + beta * C, on the Session's stream.
 * A and B are of dtype ab; C is of dtype c, which is ab or acc_dtype(ab) (fp16/bf16 inputs with an
 * fp32 C accumulate partial sums across calls without rounding to 16 bits in between).
 * Every view may be row- or column-major (core.h's BLAS-able rule); the transposes are chosen
 * here. Always CUBLAS_COMPUTE_32F (64F for fp64): exact fp32 products, no TF32, and the handle
 * disallows reduced-precision split-K reductions. k == 0 gives C = beta * C. */
int gemm(Session &s, cpeft_dtype ab, cpeft_dtype c, double alpha, const cpeft_mat &a,
         const cpeft_mat &b, double beta, const cpeft_mat &cm, cpeft_status *st);

/* C (m x n) = (A·B)·diag(col_scale) + beta · C through cuBLASLt's per-row alpha vector
 * (CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST) on C's column-major transpose, so the
 * scale costs nothing beyond the GEMM. Needs scale_ws of col_scale.len floats (the vector widened
 * to fp32, the type cuBLASLt reads it in). Descriptors, layouts and the algorithm are found once
 * per problem and kept in the stream's context; no workspace, no split-K in 16 bits. *done is
 * false, with nothing queued, where this does not apply (fp64, C not row-major, no algorithm):
 * the caller then scales another way. */
int gemm_scale_cols(Session &s, cpeft_dtype dt, const cpeft_vec &col_scale, void *scale_ws,
                    const cpeft_mat &a, const cpeft_mat &b, double beta, const cpeft_mat &c,
                    bool *done, cpeft_status *st);

/* Writes zero bits (0.0 in every float type) to every element of m. */
int zero_fill(const cpeft_mat &m, size_t elt, cudaStream_t stream, cpeft_status *st);

/* ---------------------------------------------------------------------------------------------
 * Numeric traits and dtype dispatch
 * ------------------------------------------------------------------------------------------- */

template <class T> struct Num;

template <> struct Num<float> {
    typedef float acc;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Num<double> {
    typedef double acc;
    static __device__ __forceinline__ double load(double v) { return v; }
    static __device__ __forceinline__ double store(double v) { return v; }
};
template <> struct Num<__half> {
    typedef float acc;
    static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
    typedef float acc;
    static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 store(float v)
    {
        return __float2bfloat16_rn(v);
    }
};

__device__ __forceinline__ float quiet_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double quiet_nan(double)
{
    return __longlong_as_double(0x7ff8000000000000LL);
}

template <class T> struct TypeTag { typedef T type; };

/* Calls f(TypeTag<T>()) with T the C++ type of a float cpeft_dtype. */
template <class F> int dispatch_float(cpeft_dtype dt, cpeft_status *st, F &&f)
{
    switch (dt) {
    case CPEFT_FLOAT32: return f(TypeTag<float>());
    case CPEFT_FLOAT64: return f(TypeTag<double>());
    case CPEFT_FLOAT16: return f(TypeTag<__half>());
    case CPEFT_BFLOAT16: return f(TypeTag<__nv_bfloat16>());
    default:
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "CUDA kernels: dtype code %d is not a float type",
                          (int)dt);
    }
}

/* Calls f(TypeTag<I>()) with I the C++ type of an index cpeft_dtype. */
template <class F> int dispatch_index(cpeft_dtype dt, cpeft_status *st, F &&f)
{
    switch (dt) {
    case CPEFT_INT32: return f(TypeTag<int32_t>());
    case CPEFT_INT64: return f(TypeTag<int64_t>());
    default:
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "CUDA kernels: index dtype code %d is not int32 or int64", (int)dt);
    }
}

/* 4-wide access to 4 consecutive elements p[(i0 + q) * stride], q = 0..3, of which those at
 * i0 + q >= len are absent (loaded as 0, not stored): one 8/16/32-byte access when unit-stride
 * and aligned, else one per element. */
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

/* Grid sizes for grid-stride loops: enough blocks to fill the GPU, never above the launch limit. */
inline unsigned grid_1d(int64_t work, int block)
{
    int64_t g = (work + block - 1) / block;
    if (g < 1) g = 1;
    if (g > 65535) g = 65535;
    return (unsigned)g;
}

/* ---------------------------------------------------------------------------------------------
 * Column reduction (shared by LoRA's grad_bias and IA3's grad_l / grad_bias)
 *
 *   out[j] = post[j] * Σ_i a[i, j] * b[row(i), j]      (b and post optional; row(i) = idx[i] when
 *                                                       an index vector is given, rows whose index
 *                                                       is out of range are skipped)
 *
 * Deterministic: each thread owns one (row-slice, column) partial sum in a workspace of
 * colreduce_partial_bytes(); the finalize pass adds the slices in a fixed order. No atomics, so
 * the same input gives the same bits on every run. Rows may be fed in several chunks (accumulate
 * = 1 after the first) without rounding in between.
 * ------------------------------------------------------------------------------------------- */

struct ColReduceOperand {
    const void *data;       /* NULL: absent (treated as 1) */
    int64_t row_stride, col_stride;
    const void *index;      /* optional row index vector for b (gathered rows) */
    cpeft_dtype index_dtype;
    int64_t index_stride;
    int64_t index_limit;    /* valid indices are [0, index_limit) */
};

size_t colreduce_partial_bytes(cpeft_dtype dt, int64_t cols);

/* Adds rows [0, rows) of a (and b) into the partial sums; when scaled_out is given, also writes
 * scaled_out[i, j] = a[i, j] * col_scale[j] (used to turn g·W into grad_x in the same pass). */
int colreduce_accumulate(cpeft_dtype dt, int64_t rows, int64_t cols, const cpeft_mat &a,
                         const ColReduceOperand &b, const cpeft_vec *col_scale,
                         const cpeft_mat *scaled_out, void *partial, int accumulate,
                         cudaStream_t stream, cpeft_status *st);

/* out[j] = post[j] (if given) * Σ partial slices. */
int colreduce_finalize(cpeft_dtype dt, int64_t cols, const void *partial, const cpeft_vec *post,
                       const cpeft_vec &out, cudaStream_t stream, cpeft_status *st);

/* y[i, j] = (row_vec[j] * row_scale[j]) for every row (row_scale optional): the bias pre-fill
 * that lets the following GEMM accumulate with beta = 1 instead of a separate pass over y. */
int broadcast_rows(cpeft_dtype dt, const cpeft_mat &y, const cpeft_vec &row_vec,
                   const cpeft_vec *row_scale, cudaStream_t stream, cpeft_status *st);

/* dst[i, j] = src[i, j] * (l[j] if along_cols else l[i]); dst may be src (in place). */
int scale_matrix(cpeft_dtype dt, const cpeft_mat &src, const cpeft_vec &l, int along_cols,
                 const cpeft_mat &dst, cudaStream_t stream, cpeft_status *st);

/* ---------------------------------------------------------------------------------------------
 * Embedding gradients without anything of vocabulary size: sort the N indices (radix sort over
 * only the bits V needs), then one pass writes each distinct index's row once with its rows summed
 * in fp32 (fp64). No atomics: deterministic, exact to one rounding for fp16/bf16, and no
 * V-sized fp32 accumulator. Indices equal to padding_idx or outside [0, V) map to a sentinel key
 * and are skipped, so a bad index never causes an out-of-bounds access.
 * ------------------------------------------------------------------------------------------- */

struct IndexRuns {
    uint32_t *keys;     /* N sorted keys: index value, or `sentinel` (skipped) */
    int32_t *order;     /* N source positions in key order */
    int64_t n;
    uint32_t sentinel;
};

/* Workspace bytes index_runs_build needs for n indices and vocabulary size v. */
int index_runs_bytes(int64_t n, int64_t v, size_t *bytes, cpeft_status *st);
int index_runs_build(const cpeft_vec &indices, cpeft_dtype index_dtype, int64_t v,
                     int64_t padding_idx, void *ws, size_t ws_bytes, IndexRuns *runs,
                     cudaStream_t stream, cpeft_status *st);

/* For every distinct key k: dst[k * key_stride + c * col_stride] =
 *   scale * col_scale[c] * Σ_{positions p with key k} src[order[p], c]    for c in [0, cols).
 * src is of dtype dt (src_is_acc = 0) or of acc_dtype(dt) (src_is_acc = 1); dst is of dtype dt.
 * Keys that never occur are left untouched (the caller zero-fills dst first). */
int scatter_runs(cpeft_dtype dt, const IndexRuns &runs, const void *src, int src_is_acc,
                 int64_t src_row_stride, int64_t src_col_stride, int64_t cols, double scale,
                 const cpeft_vec *col_scale, void *dst, int64_t dst_key_stride,
                 int64_t dst_col_stride, cudaStream_t stream, cpeft_status *st);

/* ---------------------------------------------------------------------------------------------
 * Dropout launchers shared with lora_linear.cu (defined in dropout.cu). Element (m, i) of the
 * logical M x IN input has counter m * IN + i (see core.h); `in` is IN.
 * ------------------------------------------------------------------------------------------- */

/* out (rows x in, dense) = drop(x) for rows [row0, row0 + rows) of x. */
int dropout_rows(cpeft_dtype dt, const cpeft_dropout *d, const cpeft_mat &x, int64_t row0,
                 int64_t rows, void *out, cudaStream_t stream, cpeft_status *st);

/* dst rows [row0, row0 + rows) = alpha * mask ⊙ t, with t (rows x in, dense) of acc_dtype(dt):
 * the LoRA part of grad_x, written before the base GEMM accumulates onto it with beta = 1. */
int dropout_scale_rows(cpeft_dtype dt, const cpeft_dropout *d, const void *t, double alpha,
                       int64_t row0, int64_t rows, const cpeft_mat &dst, cudaStream_t stream,
                       cpeft_status *st);

/* ---------------------------------------------------------------------------------------------
 * Rank-r products (rank_r.cu): the skinny products of the LoRA branch, each reading its large
 * operand once, with the dropout mask of core.h regenerated inside (d below; drop NULL or p == 0:
 * no dropout). The counters of element (m, i) of the large operand are m * L + i (L its columns),
 * so d applies to x only. fp32 (fp64) accumulation; every operand of one call has dtype dt.
 * ------------------------------------------------------------------------------------------- */

/* false when the environment says CPEFT_CUDA_RANK_R=cublas: the dropout-free products then go
 * through cuBLAS and dropout through the materialized row chunks, the path these kernels
 * replace (kept so that a GPU session can compare the two and fall back). */
bool rank_r_kernels_enabled();

/* out (M x R) = d(big) (M x L) · smallᵀ, small R x L (x·Aᵀ; g·B with small = Bᵀ). out is of
 * dtype dt, or of acc_dtype(dt) when out_acc (sums kept unrounded for a later reduction). */
int rank_project(cpeft_dtype dt, const cpeft_mat &big, const cpeft_dropout *drop,
                 const cpeft_mat &small, const cpeft_mat &out, cudaStream_t stream,
                 cpeft_status *st, bool out_acc = false);

/* Workspace rank_reduce needs for partial sums (0: none). */
size_t rank_reduce_partial_bytes(cpeft_dtype dt, int64_t m, int64_t len, int64_t r);

/* out (R x L) = alpha · smallᵀ · d(big), small M x R, big M x L (grad_a = s·gbᵀ·drop(x);
 * grad_bᵀ = s·xaᵀ·g). Rows are summed in slices fixed by the shape, then the slices in order:
 * deterministic. partial: rank_reduce_partial_bytes() of workspace. */
int rank_reduce(cpeft_dtype dt, const cpeft_mat &small, const cpeft_mat &big,
                const cpeft_dropout *drop, double alpha, const cpeft_mat &out, void *partial,
                cudaStream_t stream, cpeft_status *st);

/* out (M x L) = alpha · d(small · a), small M x R, a R x L: the LoRA part of grad_x with the
 * mask applied as it is written (out is overwritten). */
int rank_expand_dropout(cpeft_dtype dt, const cpeft_mat &small, const cpeft_mat &a,
                        const cpeft_dropout *drop, double alpha, const cpeft_mat &out,
                        cudaStream_t stream, cpeft_status *st);

/* LoRA embedding forward in one pass: y[n] = W[idx[n]] + alpha · A[:, idx[n]]ᵀ·Bᵀ, with
 * weight V x D, lora_a R x V, lora_b D x R, y N x D; an index outside [0, V) gives a NaN row. */
int rank_embedding_forward(cpeft_dtype dt, cpeft_dtype index_dt, const cpeft_vec &indices,
                           int64_t vocab, const cpeft_mat &weight, const cpeft_mat &lora_a,
                           const cpeft_mat &lora_b, double alpha, const cpeft_mat &y,
                           cudaStream_t stream, cpeft_status *st);

} /* namespace cpeft_cuda */

#endif /* CPEFT_CUDA_COMMON_CUH */
