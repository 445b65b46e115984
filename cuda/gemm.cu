/* cuBLAS and cuBLASLt products on cpeft_mat views (see gemm.cuh). */
#include "gemm.cuh"

#include <climits>

#include "cpeft/views.h"
#include "elementwise.cuh"
#include "kernel_support.cuh"
#include "status.cuh"

namespace cpeft_cuda {

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

/* cuBLAS sees column-major storage: a column-major view is used as is, a row-major one is the
 * column-major storage of its transpose. */
static bool blas_operand(const cpeft_mat &m, cublasOperation_t *op, int64_t *ld)
{
    if (cpeft_mat_is_col_major(m)) {
        *op = CUBLAS_OP_N;
        *ld = m.col_stride;
        return true;
    }
    if (cpeft_mat_is_row_major(m)) {
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
    if (!cpeft_mat_is_col_major(cm)) {
        if (!cpeft_mat_is_row_major(cm))
            return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                              "gemm: output strides (%lld, %lld) are not BLAS-able",
                              (long long)cm.row_stride, (long long)cm.col_stride);
        C = cpeft_mat_transpose(cm);
        A = cpeft_mat_transpose(b);
        B = cpeft_mat_transpose(a);
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
        CPEFT_CUBLAS_CHECK(st,
                           cublasGemmEx(s.blas, op_a, op_b, (int)m, (int)n, (int)k, &al, A.data,
                                        type_ab, (int)lda, B.data, type_ab, (int)ldb, &be, C.data,
                                        type_c, (int)ldc, CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT));
    } else {
        const float al = (float)alpha, be = (float)beta;
        CPEFT_CUBLAS_CHECK(st,
                           cublasGemmEx(s.blas, op_a, op_b, (int)m, (int)n, (int)k, &al, A.data,
                                        type_ab, (int)lda, B.data, type_ab, (int)ldb, &be, C.data,
                                        type_c, (int)ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    return CPEFT_OK;
}

/* ---------------------------------------------------------------------------------------------
 * cuBLASLt GEMM with a per-column scale of C (IA3's output scaling inside the GEMM)
 * ------------------------------------------------------------------------------------------- */

#define CPEFT_LT_TRY(call)                   \
    do {                                     \
        if ((call) != CUBLAS_STATUS_SUCCESS) \
            return false;                    \
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
    if (plan.a)
        cublasLtMatrixLayoutDestroy(plan.a);
    if (plan.b)
        cublasLtMatrixLayoutDestroy(plan.b);
    if (plan.c)
        cublasLtMatrixLayoutDestroy(plan.c);
    if (plan.desc)
        cublasLtMatmulDescDestroy(plan.desc);
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
                                             &no_workspace,
                                             sizeof(no_workspace)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                             &reductions,
                                             sizeof(reductions)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                             &align_a, sizeof(align_a)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                             &align_b, sizeof(align_b)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                             &align_c, sizeof(align_c)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                             &align_c, sizeof(align_c)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulAlgoGetHeuristic(lt, plan->desc, plan->a, plan->b, plan->c, plan->c, pref, 1,
                                       &result, &returned) == CUBLAS_STATUS_SUCCESS &&
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
    if (dt == CPEFT_FLOAT64 || !cuda_data_type(dt, &type) || !cpeft_mat_is_row_major(cm) ||
        cm.rows == 0 || cm.cols == 0 || a.cols == 0 || a.rows != cm.rows || b.cols != cm.cols ||
        a.cols != b.rows || col_scale.len != cm.cols)
        return CPEFT_OK;
    /* Row-major C is the column-major Cᵀ = Bᵀ·Aᵀ, whose rows are C's columns: the alpha vector
     * then scales C's columns. */
    const cpeft_mat C = cpeft_mat_transpose(cm), A = cpeft_mat_transpose(b),
                    B = cpeft_mat_transpose(a);
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
    const LtKey key = {(int64_t)dt,
                       (int64_t)op_a,
                       (int64_t)op_b,
                       m,
                       n,
                       k,
                       lda,
                       ldb,
                       ldc,
                       pointer_alignment(A.data),
                       pointer_alignment(B.data),
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
    CPEFT_CUBLAS_CHECK(st, cublasLtMatmul(ctx->lt, plan.desc, alpha, A.data, plan.a, B.data, plan.b,
                                          &be, C.data, plan.c, C.data, plan.c, &plan.algo, nullptr,
                                          0, s.stream));
    *done = true;
    return CPEFT_OK;
}

} /* namespace cpeft_cuda */
