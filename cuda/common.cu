/*
 * Shared CUDA machinery: status translation, per-(device, stream) contexts, the cuBLAS GEMM on
 * cpeft_mat views, and the small kernels several op families use (column reductions, row
 * broadcasts, scaling, and the sorted-run scatter for embedding gradients).
 */
#include "common.cuh"

#include <cub/device/device_radix_sort.cuh>
#include <cublasLt.h>

#include <array>

#include <climits>
#include <cstring>
#include <map>
#include <utility>

namespace cpeft_cuda {

/* ---------------------------------------------------------------------------------------------
 * Status translation
 * ------------------------------------------------------------------------------------------- */

static int call_name_length(const char *call)
{
    const char *paren = strchr(call, '(');
    return paren ? (int)(paren - call) : (int)strlen(call);
}

static const char *file_basename(const char *file)
{
    const char *slash = strrchr(file, '/');
    return slash ? slash + 1 : file;
}

int fail_cuda(cpeft_status *st, cudaError_t err, const char *call, const char *file, int line,
              const char *func)
{
    int code = err == cudaErrorMemoryAllocation ? CPEFT_ERR_NOMEM : CPEFT_ERR_CUDA;
    return cpeft_fail(st, code, "%.*s failed: %s: %s (%s:%d in %s)", call_name_length(call), call,
                      cudaGetErrorName(err), cudaGetErrorString(err), file_basename(file), line,
                      func);
}

int fail_cublas(cpeft_status *st, cublasStatus_t status, const char *call, const char *file,
                int line, const char *func)
{
    return cpeft_fail(st, CPEFT_ERR_CUBLAS, "%.*s failed: %s (%s:%d in %s)",
                      call_name_length(call), call, cublasGetStatusName(status),
                      file_basename(file), line, func);
}

/* ---------------------------------------------------------------------------------------------
 * Per-(device, stream) contexts
 * ------------------------------------------------------------------------------------------- */

/* A cuBLASLt matmul prepared once per problem (dtype, transposes, sizes, leading dimensions,
 * pointer alignments): descriptors, layouts and the heuristic's algorithm, or the finding that
 * there is none (then the caller keeps its cuBLAS path). */
struct LtPlan {
    bool supported = false;
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo;
};
typedef std::array<int64_t, 12> LtKey;

struct StreamContext {
    std::mutex mutex;
    cublasHandle_t blas = nullptr;
    cublasLtHandle_t lt = nullptr;     /* created on first use */
    std::map<LtKey, LtPlan> lt_plans;
    void *workspace = nullptr;
    size_t workspace_bytes = 0;
};

typedef std::pair<int, cudaStream_t> ContextKey;

/* Contexts are never destroyed: destroying cuBLAS handles from a static destructor would race
 * the CUDA runtime's own teardown at process exit. The registry itself is leaked for the same
 * reason. */
static std::mutex &registry_mutex()
{
    static std::mutex *m = new std::mutex;
    return *m;
}

static std::map<ContextKey, StreamContext *> &registry()
{
    static std::map<ContextKey, StreamContext *> *r = new std::map<ContextKey, StreamContext *>;
    return *r;
}

static int create_context(StreamContext **out, cpeft_status *st)
{
    cublasHandle_t handle = nullptr;
    CPEFT_CUBLAS_CHECK(st, cublasCreate(&handle));
    /* fp32 accumulation is part of the contract: forbid split-K reductions in 16 bits. */
    cublasStatus_t mode = cublasSetMathMode(
        handle,
        (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
    if (mode != CUBLAS_STATUS_SUCCESS) {
        cublasDestroy(handle);
        return fail_cublas(st, mode, "cublasSetMathMode", __FILE__, __LINE__, __func__);
    }
    StreamContext *ctx = new (std::nothrow) StreamContext;
    if (!ctx) {
        cublasDestroy(handle);
        return cpeft_fail(st, CPEFT_ERR_NOMEM, "could not allocate a CUDA stream context");
    }
    ctx->blas = handle;
    *out = ctx;
    return CPEFT_OK;
}

Session::~Session() = default;

int Session::open(void *stream_handle, cpeft_status *st)
{
    int device = 0;
    CPEFT_CUDA_CHECK(st, cudaGetDevice(&device));
    cudaStream_t s = static_cast<cudaStream_t>(stream_handle);
    StreamContext *ctx = nullptr;
    {
        std::lock_guard<std::mutex> guard(registry_mutex());
        std::map<ContextKey, StreamContext *> &r = registry();
        auto found = r.find(ContextKey(device, s));
        if (found != r.end()) {
            ctx = found->second;
        } else {
            CPEFT_TRY(create_context(&ctx, st));
            r[ContextKey(device, s)] = ctx;
        }
    }
    lock_ = std::unique_lock<std::mutex>(ctx->mutex);
    ctx_ = ctx;
    stream = s;
    blas = ctx->blas;
    CPEFT_CUBLAS_CHECK(st, cublasSetStream(blas, s));
    return CPEFT_OK;
}

StreamContext *Session::context() const { return ctx_; }

int Session::workspace(size_t bytes, void **out, cpeft_status *st)
{
    if (!ctx_)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "CUDA workspace requested before Session::open");
    if (ctx_->workspace_bytes < bytes) {
        const size_t mib = (size_t)1 << 20;
        size_t grown = (bytes + mib - 1) / mib * mib;
        if (ctx_->workspace) {
            /* Earlier work on this stream may still read the old buffer. */
            CPEFT_CUDA_CHECK(st, cudaStreamSynchronize(stream));
            CPEFT_CUDA_CHECK(st, cudaFree(ctx_->workspace));
            ctx_->workspace = nullptr;
            ctx_->workspace_bytes = 0;
        }
        void *p = nullptr;
        cudaError_t err = cudaMalloc(&p, grown);
        if (err != cudaSuccess) {
            cudaGetLastError(); /* an allocation failure is not sticky; clear it */
            if (err == cudaErrorMemoryAllocation)
                return cpeft_fail(st, CPEFT_ERR_NOMEM,
                                  "cudaMalloc failed: could not allocate a %zu-byte CUDA workspace",
                                  grown);
            return fail_cuda(st, err, "cudaMalloc", __FILE__, __LINE__, __func__);
        }
        ctx_->workspace = p;
        ctx_->workspace_bytes = grown;
    }
    *out = ctx_->workspace;
    return CPEFT_OK;
}

/* ---------------------------------------------------------------------------------------------
 * GEMM
 * ------------------------------------------------------------------------------------------- */

static int cuda_data_type(cpeft_dtype dt, cudaDataType_t *out)
{
    switch (dt) {
    case CPEFT_FLOAT32: *out = CUDA_R_32F; return 1;
    case CPEFT_FLOAT64: *out = CUDA_R_64F; return 1;
    case CPEFT_FLOAT16: *out = CUDA_R_16F; return 1;
    case CPEFT_BFLOAT16: *out = CUDA_R_16BF; return 1;
    default: return 0;
    }
}

static int64_t max1(int64_t v) { return v > 1 ? v : 1; }

static bool is_row_major(const cpeft_mat &m)
{
    return m.col_stride == 1 && m.row_stride >= max1(m.cols);
}

static bool is_col_major(const cpeft_mat &m)
{
    return m.row_stride == 1 && m.col_stride >= max1(m.rows);
}

/* cuBLAS sees column-major storage: a column-major view is used as is, a row-major one is the
 * column-major storage of its transpose. */
static bool blas_operand(const cpeft_mat &m, cublasOperation_t *op, int64_t *ld)
{
    if (is_col_major(m)) {
        *op = CUBLAS_OP_N;
        *ld = m.col_stride;
        return true;
    }
    if (is_row_major(m)) {
        *op = CUBLAS_OP_T;
        *ld = m.row_stride;
        return true;
    }
    return false;
}

int gemm(Session &s, cpeft_dtype ab, cpeft_dtype c, double alpha, const cpeft_mat &a,
         const cpeft_mat &b, double beta, const cpeft_mat &cm, cpeft_status *st)
{
    if (a.rows != cm.rows || b.cols != cm.cols || a.cols != b.rows)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "gemm: shapes (%lld x %lld) * (%lld x %lld) -> (%lld x %lld) "
                          "do not chain",
                          (long long)a.rows, (long long)a.cols, (long long)b.rows,
                          (long long)b.cols, (long long)cm.rows, (long long)cm.cols);
    if (cm.rows == 0 || cm.cols == 0)
        return CPEFT_OK;
    if (a.cols == 0) {
        if (beta == 1.0)
            return CPEFT_OK;
        if (beta == 0.0)
            return zero_fill(cm, cpeft_dtype_size(c), s.stream, st);
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "gemm: k == 0 with beta %g", beta);
    }

    /* C must be column-major for cuBLAS; for a row-major C compute Cᵀ = Bᵀ·Aᵀ instead. */
    cpeft_mat A = a, B = b, C = cm;
    if (!is_col_major(cm)) {
        if (!is_row_major(cm))
            return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                              "gemm: output strides (%lld, %lld) are not BLAS-able",
                              (long long)cm.row_stride, (long long)cm.col_stride);
        C = mat_transpose(cm);
        A = mat_transpose(b);
        B = mat_transpose(a);
    }
    cublasOperation_t op_a, op_b;
    int64_t lda, ldb;
    if (!blas_operand(A, &op_a, &lda) || !blas_operand(B, &op_b, &ldb))
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "gemm: an input view is not BLAS-able");
    const int64_t m = C.rows, n = C.cols, k = A.cols, ldc = C.col_stride;
    if (m > INT_MAX || n > INT_MAX || k > INT_MAX || lda > INT_MAX || ldb > INT_MAX ||
        ldc > INT_MAX)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED,
                          "gemm: dimension or leading dimension above INT_MAX "
                          "(m=%lld n=%lld k=%lld)",
                          (long long)m, (long long)n, (long long)k);
    cudaDataType_t type_ab, type_c;
    if (!cuda_data_type(ab, &type_ab) || !cuda_data_type(c, &type_c))
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "gemm: dtype codes %d/%d are not float types",
                          (int)ab, (int)c);
    if (ab == CPEFT_FLOAT64) {
        const double al = alpha, be = beta;
        CPEFT_CUBLAS_CHECK(st, cublasGemmEx(s.blas, op_a, op_b, (int)m, (int)n, (int)k, &al,
                                            A.data, type_ab, (int)lda, B.data, type_ab, (int)ldb,
                                            &be, C.data, type_c, (int)ldc, CUBLAS_COMPUTE_64F,
                                            CUBLAS_GEMM_DEFAULT));
    } else {
        const float al = (float)alpha, be = (float)beta;
        CPEFT_CUBLAS_CHECK(st, cublasGemmEx(s.blas, op_a, op_b, (int)m, (int)n, (int)k, &al,
                                            A.data, type_ab, (int)lda, B.data, type_ab, (int)ldb,
                                            &be, C.data, type_c, (int)ldc, CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT));
    }
    return CPEFT_OK;
}

int zero_fill(const cpeft_mat &m, size_t elt, cudaStream_t stream, cpeft_status *st)
{
    if (m.rows == 0 || m.cols == 0)
        return CPEFT_OK;
    if (is_row_major(m)) {
        CPEFT_CUDA_CHECK(st, cudaMemset2DAsync(m.data, (size_t)m.row_stride * elt, 0,
                                               (size_t)m.cols * elt, (size_t)m.rows, stream));
    } else if (is_col_major(m)) {
        CPEFT_CUDA_CHECK(st, cudaMemset2DAsync(m.data, (size_t)m.col_stride * elt, 0,
                                               (size_t)m.rows * elt, (size_t)m.cols, stream));
    } else {
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "zero_fill: strides (%lld, %lld) not BLAS-able",
                          (long long)m.row_stride, (long long)m.col_stride);
    }
    return CPEFT_OK;
}

/* ---------------------------------------------------------------------------------------------
 * cuBLASLt GEMM with a per-column scale of C (IA3's output scaling inside the GEMM)
 * ------------------------------------------------------------------------------------------- */

#define CPEFT_LT_TRY(call)                                                                      \
    do {                                                                                        \
        if ((call) != CUBLAS_STATUS_SUCCESS)                                                    \
            return false;                                                                       \
    } while (0)

static int64_t pointer_alignment(const void *p)
{
    int64_t align = 256;
    while (align > 1 && (reinterpret_cast<uintptr_t>(p) & (uintptr_t)(align - 1)) != 0)
        align >>= 1;
    return align;
}

static void destroy_plan(LtPlan &plan)
{
    if (plan.a) cublasLtMatrixLayoutDestroy(plan.a);
    if (plan.b) cublasLtMatrixLayoutDestroy(plan.b);
    if (plan.c) cublasLtMatrixLayoutDestroy(plan.c);
    if (plan.desc) cublasLtMatmulDescDestroy(plan.desc);
    plan = LtPlan();
}

/* Descriptors, layouts and algorithm for D = alpha_vec ⊙rows op(A)·op(B) + beta·C, C = D column-
 * major m x n; false when cuBLASLt has no algorithm (or a call fails: the plan is then unused). */
static bool make_plan(cublasLtHandle_t lt, const LtKey &key, cudaDataType_t type, LtPlan *plan)
{
    const cublasOperation_t op_a = (cublasOperation_t)key[1], op_b = (cublasOperation_t)key[2];
    const int64_t m = key[3], n = key[4], k = key[5];
    CPEFT_LT_TRY(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const int32_t pointer_mode = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST;
    const int32_t ta = op_a, tb = op_b;
    CPEFT_LT_TRY(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_POINTER_MODE,
                                                &pointer_mode, sizeof(pointer_mode)));
    CPEFT_LT_TRY(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta,
                                                sizeof(ta)));
    CPEFT_LT_TRY(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb,
                                                sizeof(tb)));
    CPEFT_LT_TRY(cublasLtMatrixLayoutCreate(&plan->a, type, op_a == CUBLAS_OP_N ? m : k,
                                            op_a == CUBLAS_OP_N ? k : m, key[6]));
    CPEFT_LT_TRY(cublasLtMatrixLayoutCreate(&plan->b, type, op_b == CUBLAS_OP_N ? k : n,
                                            op_b == CUBLAS_OP_N ? n : k, key[7]));
    CPEFT_LT_TRY(cublasLtMatrixLayoutCreate(&plan->c, type, m, n, key[8]));
    cublasLtMatmulPreference_t pref = nullptr;
    CPEFT_LT_TRY(cublasLtMatmulPreferenceCreate(&pref));
    /* No workspace (nothing to grow, nothing allocated per call or under capture) and no split-K
     * reduction in 16 bits: fp32 accumulation is the contract, as for the cuBLAS handle. */
    const uint64_t no_workspace = 0;
    const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_INPLACE |
                                CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    const uint32_t align_a = (uint32_t)key[9], align_b = (uint32_t)key[10],
                   align_c = (uint32_t)key[11];
    cublasLtMatmulHeuristicResult_t result;
    int returned = 0;
    const bool ok =
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &no_workspace, sizeof(no_workspace)) ==
            CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                             &reductions, sizeof(reductions)) ==
            CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                             &align_a, sizeof(align_a)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                             &align_b, sizeof(align_b)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                             &align_c, sizeof(align_c)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                             &align_c, sizeof(align_c)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulAlgoGetHeuristic(lt, plan->desc, plan->a, plan->b, plan->c, plan->c, pref,
                                       1, &result, &returned) == CUBLAS_STATUS_SUCCESS &&
        returned > 0;
    cublasLtMatmulPreferenceDestroy(pref);
    if (!ok)
        return false;
    plan->algo = result.algo;
    return true;
}

template <class T>
static __global__ void widen_kernel(int64_t n, const T *src, int64_t stride, float *dst)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = (float)Num<T>::load(src[i * stride]);
}

int gemm_scale_cols(Session &s, cpeft_dtype dt, const cpeft_vec &col_scale, void *scale_ws,
                    const cpeft_mat &a, const cpeft_mat &b, double beta, const cpeft_mat &cm,
                    bool *done, cpeft_status *st)
{
    *done = false;
    cudaDataType_t type;
    if (dt == CPEFT_FLOAT64 || !cuda_data_type(dt, &type) || !is_row_major(cm) ||
        cm.rows == 0 || cm.cols == 0 || a.cols == 0 || a.rows != cm.rows ||
        b.cols != cm.cols || a.cols != b.rows || col_scale.len != cm.cols)
        return CPEFT_OK;
    /* Row-major C is the column-major Cᵀ = Bᵀ·Aᵀ, whose rows are C's columns: the alpha vector
     * then scales C's columns. */
    const cpeft_mat C = mat_transpose(cm), A = mat_transpose(b), B = mat_transpose(a);
    cublasOperation_t op_a, op_b;
    int64_t lda, ldb;
    if (!blas_operand(A, &op_a, &lda) || !blas_operand(B, &op_b, &ldb))
        return CPEFT_OK;
    const int64_t m = C.rows, n = C.cols, k = A.cols, ldc = C.col_stride;
    if (m > INT_MAX || n > INT_MAX || k > INT_MAX)
        return CPEFT_OK;
    StreamContext *ctx = s.context();
    if (!ctx)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "gemm_scale_cols before Session::open");
    if (!ctx->lt)
        CPEFT_CUBLAS_CHECK(st, cublasLtCreate(&ctx->lt));
    const LtKey key = {(int64_t)dt, (int64_t)op_a, (int64_t)op_b, m, n, k, lda, ldb, ldc,
                       pointer_alignment(A.data), pointer_alignment(B.data),
                       pointer_alignment(C.data)};
    auto found = ctx->lt_plans.find(key);
    if (found == ctx->lt_plans.end()) {
        LtPlan plan;
        plan.supported = make_plan(ctx->lt, key, type, &plan);
        if (!plan.supported)
            destroy_plan(plan);
        found = ctx->lt_plans.emplace(key, plan).first;
    }
    const LtPlan &plan = found->second;
    if (!plan.supported)
        return CPEFT_OK;
    float *alpha = static_cast<float *>(scale_ws);
    CPEFT_TRY(dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        widen_kernel<T><<<grid_1d(col_scale.len, 256), 256, 0, s.stream>>>(
            col_scale.len, static_cast<const T *>(col_scale.data), col_scale.stride, alpha);
        CPEFT_LAUNCH_CHECK(st, "widen_kernel");
        return (int)CPEFT_OK;
    }));
    const float be = (float)beta;
    CPEFT_CUBLAS_CHECK(st, cublasLtMatmul(ctx->lt, plan.desc, alpha, A.data, plan.a, B.data,
                                          plan.b, &be, C.data, plan.c, C.data, plan.c, &plan.algo,
                                          nullptr, 0, s.stream));
    *done = true;
    return CPEFT_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Elementwise helpers
 * ------------------------------------------------------------------------------------------- */

static const int kElementBlock = 256;

/* Threads run along columns (the unit-stride dimension of the usual row-major activations);
 * blocks stride over rows. */
static dim3 grid_2d(int64_t rows, int64_t cols)
{
    int64_t gx = (cols + kElementBlock - 1) / kElementBlock;
    if (gx < 1) gx = 1;
    if (gx > 65535) gx = 65535;
    int64_t gy = rows < 1 ? 1 : (rows > 65535 ? 65535 : rows);
    return dim3((unsigned)gx, (unsigned)gy);
}

template <class T>
static __global__ void broadcast_rows_kernel(int64_t rows, int64_t cols, T *y, int64_t y_rs,
                                             int64_t y_cs, const T *v, int64_t v_stride,
                                             const T *scale, int64_t scale_stride)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x) {
        Acc value = Num<T>::load(v[j * v_stride]);
        if (scale)
            value *= Num<T>::load(scale[j * scale_stride]);
        const T stored = Num<T>::store(value);
        for (int64_t i = blockIdx.y; i < rows; i += gridDim.y)
            y[i * y_rs + j * y_cs] = stored;
    }
}

int broadcast_rows(cpeft_dtype dt, const cpeft_mat &y, const cpeft_vec &row_vec,
                   const cpeft_vec *row_scale, cudaStream_t stream, cpeft_status *st)
{
    if (y.rows == 0 || y.cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        broadcast_rows_kernel<T><<<grid_2d(y.rows, y.cols), kElementBlock, 0, stream>>>(
            y.rows, y.cols, static_cast<T *>(y.data), y.row_stride, y.col_stride,
            static_cast<const T *>(row_vec.data), row_vec.stride,
            row_scale ? static_cast<const T *>(row_scale->data) : nullptr,
            row_scale ? row_scale->stride : 0);
        CPEFT_LAUNCH_CHECK(st, "broadcast_rows_kernel");
        return (int)CPEFT_OK;
    });
}

template <class T>
static __global__ void scale_matrix_kernel(int64_t rows, int64_t cols, const T *src, int64_t s_rs,
                                           int64_t s_cs, const T *l, int64_t l_stride,
                                           int along_cols, T *dst, int64_t d_rs, int64_t d_cs)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x) {
        const Acc col_factor = along_cols ? Num<T>::load(l[j * l_stride]) : Acc(1);
        for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
            const Acc factor = along_cols ? col_factor : Num<T>::load(l[i * l_stride]);
            const Acc v = Num<T>::load(src[i * s_rs + j * s_cs]);
            dst[i * d_rs + j * d_cs] = Num<T>::store(v * factor);
        }
    }
}

/* The unit-stride case of scale_matrix_kernel: each thread scales 4 consecutive elements of a
 * row with one wide load and store (the scalar kernel ran at about 0.9 TB/s on an H200, a fifth
 * of the memory speed: gpu-runs/2026-11-30-18e3f0a/profile.txt, scale_matrix_kernel). */
static const int kVecThreads = 256;
static const int kVecTargetBlocks = 2048;

template <class T>
static __global__ void scale_matrix_vec_kernel(int64_t rows, int64_t cols, const T *src,
                                               int64_t s_rs, const T *l, int64_t l_stride,
                                               int along_cols, T *dst, int64_t d_rs)
{
    typedef typename Num<T>::acc Acc;
    const int64_t i0 = ((int64_t)blockIdx.x * kVecThreads + threadIdx.x) * 4;
    if (i0 >= cols)
        return;
    Acc col_factor[4];
#pragma unroll
    for (int q = 0; q < 4; ++q)
        col_factor[q] = along_cols && i0 + q < cols ? (Acc)Num<T>::load(l[(i0 + q) * l_stride])
                                                    : Acc(1);
    for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
        Acc v[4];
        load4(src + i * s_rs, 1, i0, cols, v);
        const Acc row_factor = along_cols ? Acc(1) : (Acc)Num<T>::load(l[i * l_stride]);
#pragma unroll
        for (int q = 0; q < 4; ++q)
            v[q] *= along_cols ? col_factor[q] : row_factor;
        store4(dst + i * d_rs, 1, i0, cols, v);
    }
}

int scale_matrix(cpeft_dtype dt, const cpeft_mat &src, const cpeft_vec &l, int along_cols,
                 const cpeft_mat &dst, cudaStream_t stream, cpeft_status *st)
{
    if (src.rows == 0 || src.cols == 0)
        return CPEFT_OK;
    /* Threads run along columns, so a column-major pair is walked through its transpose. */
    const bool flip = is_col_major(src) && !is_row_major(src);
    const cpeft_mat from = flip ? mat_transpose(src) : src;
    const cpeft_mat to = flip ? mat_transpose(dst) : dst;
    const int cols_scaled = flip ? !along_cols : along_cols;
    if (from.col_stride == 1 && to.col_stride == 1) {
        const int64_t col_blocks = (from.cols + 4 * kVecThreads - 1) / (4 * kVecThreads);
        if (col_blocks > INT_MAX)
            return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, "scale_matrix: %lld columns",
                              (long long)from.cols);
        int64_t row_blocks = (kVecTargetBlocks + col_blocks - 1) / col_blocks;
        if (row_blocks > from.rows) row_blocks = from.rows;
        if (row_blocks > 65535) row_blocks = 65535;
        if (row_blocks < 1) row_blocks = 1;
        const dim3 grid((unsigned)col_blocks, (unsigned)row_blocks);
        return dispatch_float(dt, st, [&](auto tag) {
            typedef typename decltype(tag)::type T;
            scale_matrix_vec_kernel<T><<<grid, kVecThreads, 0, stream>>>(
                from.rows, from.cols, static_cast<const T *>(from.data), from.row_stride,
                static_cast<const T *>(l.data), l.stride, cols_scaled, static_cast<T *>(to.data),
                to.row_stride);
            CPEFT_LAUNCH_CHECK(st, "scale_matrix_vec_kernel");
            return (int)CPEFT_OK;
        });
    }
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        scale_matrix_kernel<T><<<grid_2d(from.rows, from.cols), kElementBlock, 0, stream>>>(
            from.rows, from.cols, static_cast<const T *>(from.data), from.row_stride,
            from.col_stride, static_cast<const T *>(l.data), l.stride, cols_scaled,
            static_cast<T *>(to.data), to.row_stride, to.col_stride);
        CPEFT_LAUNCH_CHECK(st, "scale_matrix_kernel");
        return (int)CPEFT_OK;
    });
}

/* ---------------------------------------------------------------------------------------------
 * Column reduction
 * ------------------------------------------------------------------------------------------- */

static const int kColTile = 32;     /* columns per block: one warp reads 32 consecutive elements */
static const int kRowThreads = 8;   /* rows per block step */
static const int kSlices = 64;      /* fixed, so chunks fed with accumulate = 1 line up */

size_t colreduce_partial_bytes(cpeft_dtype dt, int64_t cols)
{
    return (size_t)kSlices * (size_t)(cols > 0 ? cols : 1) * cpeft_dtype_size(acc_dtype(dt));
}

template <class T, class I>
static __global__ void colreduce_kernel(int64_t rows, int64_t cols, const T *a, int64_t a_rs,
                                        int64_t a_cs, const T *b, int64_t b_rs, int64_t b_cs,
                                        const I *b_index, int64_t b_index_stride,
                                        int64_t b_index_limit, const T *col_scale,
                                        int64_t col_scale_stride, T *scaled, int64_t s_rs,
                                        int64_t s_cs, typename Num<T>::acc *partial,
                                        int accumulate)
{
    typedef typename Num<T>::acc Acc;
    __shared__ Acc tile[kRowThreads][kColTile];
    const int64_t j = (int64_t)blockIdx.x * kColTile + threadIdx.x;
    Acc sum = 0;
    if (j < cols) {
        const Acc l = col_scale ? Num<T>::load(col_scale[j * col_scale_stride]) : Acc(1);
        for (int64_t i = (int64_t)blockIdx.y * kRowThreads + threadIdx.y; i < rows;
             i += (int64_t)gridDim.y * kRowThreads) {
            Acc v = Num<T>::load(a[i * a_rs + j * a_cs]);
            if (scaled)
                scaled[i * s_rs + j * s_cs] = Num<T>::store(v * l);
            if (b) {
                int64_t row = i;
                if (b_index) {
                    row = (int64_t)b_index[i * b_index_stride];
                    if (row < 0 || row >= b_index_limit)
                        continue;
                }
                v *= Num<T>::load(b[row * b_rs + j * b_cs]);
            }
            sum += v;
        }
    }
    tile[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && j < cols) {
        Acc total = 0;
        for (int r = 0; r < kRowThreads; ++r)
            total += tile[r][threadIdx.x];
        Acc *slot = partial + (int64_t)blockIdx.y * cols + j;
        *slot = accumulate ? *slot + total : total;
    }
}

/* colreduce_kernel for unit-stride columns and no row index: each thread owns 4 consecutive
 * columns with wide loads (the scalar kernel moved about 1 TB/s on an H200:
 * gpu-runs/2026-11-30-18e3f0a/profile.txt, colreduce_kernel). Rows are assigned to threads
 * exactly as there, so every column is summed in the same order and the result has the same
 * bits. */
template <class T>
static __global__ void colreduce_vec_kernel(int64_t rows, int64_t cols, const T *a, int64_t a_rs,
                                            const T *b, int64_t b_rs, const T *col_scale,
                                            int64_t col_scale_stride, T *scaled, int64_t s_rs,
                                            typename Num<T>::acc *partial, int accumulate)
{
    typedef typename Num<T>::acc Acc;
    __shared__ Acc tile[kRowThreads][kColTile * 4];
    const int64_t j0 = ((int64_t)blockIdx.x * kColTile + threadIdx.x) * 4;
    Acc sum[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    if (j0 < cols) {
        Acc l[4];
#pragma unroll
        for (int q = 0; q < 4; ++q)
            l[q] = col_scale && j0 + q < cols ? (Acc)Num<T>::load(col_scale[(j0 + q) *
                                                                            col_scale_stride])
                                              : Acc(1);
        for (int64_t i = (int64_t)blockIdx.y * kRowThreads + threadIdx.y; i < rows;
             i += (int64_t)gridDim.y * kRowThreads) {
            Acc v[4];
            load4(a + i * a_rs, 1, j0, cols, v);
            if (scaled) {
                Acc w[4];
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    w[q] = v[q] * l[q];
                store4(scaled + i * s_rs, 1, j0, cols, w);
            }
            if (b) {
                Acc u[4];
                load4(b + i * b_rs, 1, j0, cols, u);
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    v[q] *= u[q];
            }
#pragma unroll
            for (int q = 0; q < 4; ++q)
                sum[q] += v[q];
        }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q)
        tile[threadIdx.y][threadIdx.x * 4 + q] = sum[q];
    __syncthreads();
    if (threadIdx.y != 0)
        return;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        if (j0 + q >= cols)
            break;
        Acc total = 0;
        for (int r = 0; r < kRowThreads; ++r)
            total += tile[r][threadIdx.x * 4 + q];
        Acc *slot = partial + (int64_t)blockIdx.y * cols + j0 + q;
        *slot = accumulate ? *slot + total : total;
    }
}

int colreduce_accumulate(cpeft_dtype dt, int64_t rows, int64_t cols, const cpeft_mat &a,
                         const ColReduceOperand &b, const cpeft_vec *col_scale,
                         const cpeft_mat *scaled_out, void *partial, int accumulate,
                         cudaStream_t stream, cpeft_status *st)
{
    if (cols == 0)
        return CPEFT_OK;
    int64_t gx = (cols + kColTile - 1) / kColTile;
    if (gx > INT_MAX)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, "column reduction over %lld columns",
                          (long long)cols);
    const dim3 grid((unsigned)gx, kSlices), block(kColTile, kRowThreads);
    const bool unit_stride = a.col_stride == 1 && !b.index && (!b.data || b.col_stride == 1) &&
                             (!scaled_out || scaled_out->col_stride == 1);
    if (unit_stride) {
        const dim3 vec_grid((unsigned)((cols + 4 * kColTile - 1) / (4 * kColTile)), kSlices);
        return dispatch_float(dt, st, [&](auto tag) {
            typedef typename decltype(tag)::type T;
            typedef typename Num<T>::acc Acc;
            colreduce_vec_kernel<T><<<vec_grid, block, 0, stream>>>(
                rows, cols, static_cast<const T *>(a.data), a.row_stride,
                static_cast<const T *>(b.data), b.row_stride,
                col_scale ? static_cast<const T *>(col_scale->data) : nullptr,
                col_scale ? col_scale->stride : 0,
                scaled_out ? static_cast<T *>(scaled_out->data) : nullptr,
                scaled_out ? scaled_out->row_stride : 0, static_cast<Acc *>(partial), accumulate);
            CPEFT_LAUNCH_CHECK(st, "colreduce_vec_kernel");
            return (int)CPEFT_OK;
        });
    }
    cpeft_dtype index_dt = b.index ? b.index_dtype : CPEFT_INT32;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        return dispatch_index(index_dt, st, [&](auto itag) {
            typedef typename decltype(itag)::type I;
            colreduce_kernel<T, I><<<grid, block, 0, stream>>>(
                rows, cols, static_cast<const T *>(a.data), a.row_stride, a.col_stride,
                static_cast<const T *>(b.data), b.row_stride, b.col_stride,
                static_cast<const I *>(b.index), b.index_stride, b.index_limit,
                col_scale ? static_cast<const T *>(col_scale->data) : nullptr,
                col_scale ? col_scale->stride : 0,
                scaled_out ? static_cast<T *>(scaled_out->data) : nullptr,
                scaled_out ? scaled_out->row_stride : 0, scaled_out ? scaled_out->col_stride : 0,
                static_cast<Acc *>(partial), accumulate);
            CPEFT_LAUNCH_CHECK(st, "colreduce_kernel");
            return (int)CPEFT_OK;
        });
    });
}

template <class T>
static __global__ void colreduce_finalize_kernel(int64_t cols, const typename Num<T>::acc *partial,
                                                 const T *post, int64_t post_stride, T *out,
                                                 int64_t out_stride)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x) {
        Acc total = 0;
        for (int p = 0; p < kSlices; ++p)
            total += partial[(int64_t)p * cols + j];
        if (post)
            total *= Num<T>::load(post[j * post_stride]);
        out[j * out_stride] = Num<T>::store(total);
    }
}

int colreduce_finalize(cpeft_dtype dt, int64_t cols, const void *partial, const cpeft_vec *post,
                       const cpeft_vec &out, cudaStream_t stream, cpeft_status *st)
{
    if (cols == 0)
        return CPEFT_OK;
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        colreduce_finalize_kernel<T><<<grid_1d(cols, kElementBlock), kElementBlock, 0, stream>>>(
            cols, static_cast<const Acc *>(partial),
            post ? static_cast<const T *>(post->data) : nullptr, post ? post->stride : 0,
            static_cast<T *>(out.data), out.stride);
        CPEFT_LAUNCH_CHECK(st, "colreduce_finalize_kernel");
        return (int)CPEFT_OK;
    });
}

/* ---------------------------------------------------------------------------------------------
 * Sorted-run scatter for embedding gradients
 * ------------------------------------------------------------------------------------------- */

static int key_bits(int64_t v)
{
    int bits = 1;
    while (bits < 32 && ((uint64_t)v >> bits) != 0)
        ++bits;
    return bits;
}

static int sort_temp_bytes(int64_t n, int64_t v, size_t *bytes, cpeft_status *st)
{
    *bytes = 0;
    CPEFT_CUDA_CHECK(st, cub::DeviceRadixSort::SortPairs(
                             nullptr, *bytes, (const uint32_t *)nullptr, (uint32_t *)nullptr,
                             (const int32_t *)nullptr, (int32_t *)nullptr, (int)n, 0, key_bits(v)));
    return CPEFT_OK;
}

static int check_runs_limits(int64_t n, int64_t v, cpeft_status *st)
{
    if (n > INT_MAX)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED,
                          "CUDA embedding backward: %lld indices (at most %d supported)",
                          (long long)n, INT_MAX);
    if (v >= (int64_t)UINT32_MAX)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED,
                          "CUDA embedding backward: vocabulary of %lld rows (below 2^32 supported)",
                          (long long)v);
    return CPEFT_OK;
}

int index_runs_bytes(int64_t n, int64_t v, size_t *bytes, cpeft_status *st)
{
    CPEFT_TRY(check_runs_limits(n, v, st));
    size_t sort_bytes = 0;
    CPEFT_TRY(sort_temp_bytes(n, v, &sort_bytes, st));
    const size_t vec = (size_t)(n > 0 ? n : 1) * 4;
    *bytes = 4 * ws_align(vec) + ws_align(sort_bytes);
    return CPEFT_OK;
}

template <class I>
static __global__ void make_keys_kernel(const I *indices, int64_t stride, int64_t n, int64_t v,
                                        int64_t padding_idx, uint32_t sentinel, uint32_t *keys,
                                        int32_t *order)
{
    for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < n;
         p += (int64_t)gridDim.x * blockDim.x) {
        const int64_t k = (int64_t)indices[p * stride];
        keys[p] = (k < 0 || k >= v || k == padding_idx) ? sentinel : (uint32_t)k;
        order[p] = (int32_t)p;
    }
}

int index_runs_build(const cpeft_vec &indices, cpeft_dtype index_dtype, int64_t v,
                     int64_t padding_idx, void *ws, size_t ws_bytes, IndexRuns *runs,
                     cudaStream_t stream, cpeft_status *st)
{
    const int64_t n = indices.len;
    CPEFT_TRY(check_runs_limits(n, v, st));
    size_t sort_bytes = 0;
    CPEFT_TRY(sort_temp_bytes(n, v, &sort_bytes, st));
    const size_t vec = (size_t)(n > 0 ? n : 1) * 4;
    if (ws_bytes < 4 * ws_align(vec) + ws_align(sort_bytes))
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "index_runs_build: workspace too small");
    Carver carve(ws);
    uint32_t *keys_in = static_cast<uint32_t *>(carve.take(vec));
    uint32_t *keys_out = static_cast<uint32_t *>(carve.take(vec));
    int32_t *order_in = static_cast<int32_t *>(carve.take(vec));
    int32_t *order_out = static_cast<int32_t *>(carve.take(vec));
    void *sort_temp = carve.take(sort_bytes);
    runs->keys = keys_out;
    runs->order = order_out;
    runs->n = n;
    runs->sentinel = (uint32_t)v;
    if (n == 0)
        return CPEFT_OK;
    CPEFT_TRY(dispatch_index(index_dtype, st, [&](auto itag) {
        typedef typename decltype(itag)::type I;
        make_keys_kernel<I><<<grid_1d(n, kElementBlock), kElementBlock, 0, stream>>>(
            static_cast<const I *>(indices.data), indices.stride, n, v, padding_idx, (uint32_t)v,
            keys_in, order_in);
        CPEFT_LAUNCH_CHECK(st, "make_keys_kernel");
        return (int)CPEFT_OK;
    }));
    CPEFT_CUDA_CHECK(st, cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, keys_in, keys_out,
                                                         order_in, order_out, (int)n, 0,
                                                         key_bits(v), stream));
    return CPEFT_OK;
}

/* One block per sorted position; only the first position of each run does work, so every
 * destination row is written by exactly one block and no atomics are needed. */
template <class S, class T>
static __global__ void scatter_runs_kernel(const uint32_t *keys, const int32_t *order, int64_t n,
                                           uint32_t sentinel, const S *src, int64_t src_rs,
                                           int64_t src_cs, int64_t cols,
                                           typename Num<T>::acc scale, const T *col_scale,
                                           int64_t col_scale_stride, T *dst, int64_t dst_ks,
                                           int64_t dst_cs)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t p = blockIdx.x; p < n; p += gridDim.x) {
        const uint32_t key = keys[p];
        if (key == sentinel || (p > 0 && keys[p - 1] == key))
            continue;
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
            Acc sum = 0;
            for (int64_t q = p; q < n && keys[q] == key; ++q)
                sum += (Acc)Num<S>::load(src[(int64_t)order[q] * src_rs + c * src_cs]);
            sum *= scale;
            if (col_scale)
                sum *= Num<T>::load(col_scale[c * col_scale_stride]);
            dst[(int64_t)key * dst_ks + c * dst_cs] = Num<T>::store(sum);
        }
    }
}

int scatter_runs(cpeft_dtype dt, const IndexRuns &runs, const void *src, int src_is_acc,
                 int64_t src_row_stride, int64_t src_col_stride, int64_t cols, double scale,
                 const cpeft_vec *col_scale, void *dst, int64_t dst_key_stride,
                 int64_t dst_col_stride, cudaStream_t stream, cpeft_status *st)
{
    if (runs.n == 0 || cols == 0)
        return CPEFT_OK;
    const int block = cols >= 256 ? 256 : (int)((cols + 31) / 32 * 32);
    const unsigned grid = (unsigned)(runs.n < 65535 ? runs.n : 65535);
    return dispatch_float(dt, st, [&](auto tag) {
        typedef typename decltype(tag)::type T;
        typedef typename Num<T>::acc Acc;
        const T *cs = col_scale ? static_cast<const T *>(col_scale->data) : nullptr;
        const int64_t css = col_scale ? col_scale->stride : 0;
        if (src_is_acc)
            scatter_runs_kernel<Acc, T><<<grid, block, 0, stream>>>(
                runs.keys, runs.order, runs.n, runs.sentinel, static_cast<const Acc *>(src),
                src_row_stride, src_col_stride, cols, (Acc)scale, cs, css, static_cast<T *>(dst),
                dst_key_stride, dst_col_stride);
        else
            scatter_runs_kernel<T, T><<<grid, block, 0, stream>>>(
                runs.keys, runs.order, runs.n, runs.sentinel, static_cast<const T *>(src),
                src_row_stride, src_col_stride, cols, (Acc)scale, cs, css, static_cast<T *>(dst),
                dst_key_stride, dst_col_stride);
        CPEFT_LAUNCH_CHECK(st, "scatter_runs_kernel");
        return (int)CPEFT_OK;
    });
}

} /* namespace cpeft_cuda */
