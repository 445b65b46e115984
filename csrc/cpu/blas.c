/* Matrix products through OpenBLAS on strided views for the CPU compute layer (see blas.h). */
#include "blas.h"

#include <limits.h>
#include <stdlib.h>

#include <cblas.h>

#include "cpeft/views.h"
#include "op_setup.h"
#include "strided.h"

/*
 * How a view is handed to row-major CBLAS: the stored matrix is m itself (col_major == 0,
 * leading dimension = row_stride) or mᵀ (col_major == 1, leading dimension = col_stride).
 * The stride of a dimension of extent <= 1 is never used by BLAS but is checked against
 * max(1, extent), so it is replaced by the smallest legal value.
 */
typedef struct {
    int col_major;
    int64_t ld;
} blas_layout;

static int blas_layout_of(cpeft_mat m, blas_layout *out)
{
    int64_t row_major_min_ld = m.cols > 1 ? m.cols : 1;
    int64_t col_major_min_ld = m.rows > 1 ? m.rows : 1;
    if (m.cols <= 1 || m.col_stride == 1) {
        int64_t ld = m.rows <= 1 ? row_major_min_ld : m.row_stride;
        if (ld >= row_major_min_ld) {
            out->col_major = 0;
            out->ld = ld;
            return 1;
        }
    }
    if (m.rows <= 1 || m.row_stride == 1) {
        int64_t ld = m.cols <= 1 ? col_major_min_ld : m.col_stride;
        if (ld >= col_major_min_ld) {
            out->col_major = 1;
            out->ld = ld;
            return 1;
        }
    }
    return 0;
}

static int fits_blasint(int64_t v) { return v >= 0 && v <= INT_MAX; }

/* C = beta * C for the K == 0 product; beta == 0 writes zeros without reading C. */
static void scale_in_place(cpeft_dtype dtype, cpeft_mat c, double beta)
{
    if (beta == 1.0)
        return;
    if (beta == 0.0) {
        cpeft_fill_zero_cpu(dtype, c);
        return;
    }
    for (int64_t i = 0; i < c.rows; ++i)
        for (int64_t j = 0; j < c.cols; ++j) {
            void *p = cpeft_mat_at(dtype, c, i, j);
            if (dtype == CPEFT_FLOAT32)
                *(float *)p = (float)(beta * *(float *)p);
            else
                *(double *)p = beta * *(double *)p;
        }
}

/* OpenBLAS keeps a GEMM on the calling thread up to m·n·k = 65536 × GEMM_MULTITHREAD_THRESHOLD
 * (4 in its default build); cpeft splits GEMMs under 2M multiply-adds into such blocks. */
#define CPEFT_BLAS_ONE_THREAD_MNK ((int64_t)65536 * 4)
#define CPEFT_BLAS_SMALL_MNK (2.0 * 1024 * 1024)

/* The largest M, N or K one BLAS call takes (its integers are 32-bit). The C harness also runs
 * with a tiny value, so the blocking below is checked against its references at small sizes. */
#ifndef CPEFT_BLAS_DIM_LIMIT
#define CPEFT_BLAS_DIM_LIMIT ((int64_t)INT_MAX)
#endif

/* Rows [r0, r0+nr) of op(X) as a view of X, and columns likewise. */
static cpeft_mat op_rows(cpeft_dtype dt, cpeft_mat x, int trans, int64_t r0, int64_t nr)
{
    return trans ? cpeft_mat_sub(dt, x, 0, x.rows, r0, nr)
                 : cpeft_mat_sub(dt, x, r0, nr, 0, x.cols);
}

static cpeft_mat op_cols(cpeft_dtype dt, cpeft_mat x, int trans, int64_t c0, int64_t nc)
{
    return trans ? cpeft_mat_sub(dt, x, c0, nc, 0, x.cols)
                 : cpeft_mat_sub(dt, x, 0, x.rows, c0, nc);
}

/* A product with M, N or K beyond one BLAS call, as products of blocks that fit: M and N split C,
 * K splits the sum (the blocks after the first accumulate with beta = 1). */
static int gemm_blocked(cpeft_dtype dt, int trans_a, int trans_b, double alpha, cpeft_mat a,
                        cpeft_mat b, double beta, cpeft_mat c, int64_t m, int64_t n, int64_t k,
                        cpeft_status *st)
{
    const int64_t lim = CPEFT_BLAS_DIM_LIMIT;
    for (int64_t i0 = 0; i0 < m; i0 += lim) {
        int64_t mi = m - i0 < lim ? m - i0 : lim;
        for (int64_t j0 = 0; j0 < n; j0 += lim) {
            int64_t nj = n - j0 < lim ? n - j0 : lim;
            cpeft_mat c_block = cpeft_mat_sub(dt, c, i0, mi, j0, nj);
            for (int64_t k0 = 0; k0 < k; k0 += lim) {
                int64_t kk = k - k0 < lim ? k - k0 : lim;
                cpeft_mat a_block = op_cols(dt, op_rows(dt, a, trans_a, i0, mi), trans_a, k0, kk);
                cpeft_mat b_block = op_cols(dt, op_rows(dt, b, trans_b, k0, kk), trans_b, j0, nj);
                int rc = cpeft_gemm_cpu(dt, trans_a, trans_b, alpha, a_block, b_block,
                                        k0 == 0 ? beta : 1.0, c_block, st);
                if (rc != CPEFT_OK)
                    return rc;
            }
        }
    }
    return CPEFT_OK;
}

int cpeft_gemm_cpu(cpeft_dtype dtype, int trans_a, int trans_b, double alpha, cpeft_mat a,
                   cpeft_mat b, double beta, cpeft_mat c, cpeft_status *st)
{
    int64_t m = trans_a ? a.cols : a.rows;
    int64_t k = trans_a ? a.rows : a.cols;
    int64_t kb = trans_b ? b.cols : b.rows;
    int64_t n = trans_b ? b.rows : b.cols;
    if (kb != k || c.rows != m || c.cols != n)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "gemm: shapes do not chain: op(A) %lld x %lld, op(B) %lld x %lld, "
                          "C %lld x %lld (%s:%d)",
                          (long long)m, (long long)k, (long long)kb, (long long)n,
                          (long long)c.rows, (long long)c.cols, __FILE__, __LINE__);
    if (m == 0 || n == 0)
        return CPEFT_OK;
    if (k == 0) {
        scale_in_place(dtype, c, beta);
        return CPEFT_OK;
    }
    if (m > CPEFT_BLAS_DIM_LIMIT || n > CPEFT_BLAS_DIM_LIMIT || k > CPEFT_BLAS_DIM_LIMIT)
        return gemm_blocked(dtype, trans_a, trans_b, alpha, a, b, beta, c, m, n, k, st);

    blas_layout la, lb, lc;
    if (!blas_layout_of(a, &la) || !blas_layout_of(b, &lb) || !blas_layout_of(c, &lc))
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "gemm: an operand is not a BLAS-able view (strides A %lld,%lld "
                          "B %lld,%lld C %lld,%lld) (%s:%d)",
                          (long long)a.row_stride, (long long)a.col_stride, (long long)b.row_stride,
                          (long long)b.col_stride, (long long)c.row_stride, (long long)c.col_stride,
                          __FILE__, __LINE__);

    /* Row-major CBLAS transposes an operand when the requested op and its storage disagree. */
    int ta = trans_a ^ la.col_major;
    int tb = trans_b ^ lb.col_major;
    const void *pa = a.data, *pb = b.data;
    int64_t lda = la.ld, ldb = lb.ld;
    if (lc.col_major) {
        /* A column-major C is Cᵀ row-major: Cᵀ = op(B)ᵀ·op(A)ᵀ, so swap operands and sizes. */
        const void *pt = pa;
        pa = pb;
        pb = pt;
        int64_t lt = lda;
        lda = ldb;
        ldb = lt;
        int tt = ta;
        ta = !tb;
        tb = !tt;
        int64_t mt = m;
        m = n;
        n = mt;
    }
    if (!fits_blasint(m) || !fits_blasint(n) || !fits_blasint(k) || !fits_blasint(lda) ||
        !fits_blasint(ldb) || !fits_blasint(lc.ld))
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "gemm: a size or leading dimension exceeds the 32-bit BLAS range "
                          "(M %lld, N %lld, K %lld) (%s:%d)",
                          (long long)m, (long long)n, (long long)k, __FILE__, __LINE__);

    enum CBLAS_TRANSPOSE cta = ta ? CblasTrans : CblasNoTrans;
    enum CBLAS_TRANSPOSE ctb = tb ? CblasTrans : CblasNoTrans;
    if (dtype != CPEFT_FLOAT32 && dtype != CPEFT_FLOAT64)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "gemm: unsupported dtype code %d", (int)dtype);

    /* OpenBLAS spreads a GEMM over all its threads once m·n·k exceeds CPEFT_BLAS_ONE_THREAD_MNK,
     * and its workers sleep between calls (cpeft sets OPENBLAS_THREAD_TIMEOUT so they do not spin
     * beside torch's threads), so every such call pays a wake-up of tens of microseconds. A GEMM
     * under CPEFT_BLAS_SMALL_MNK finishes on one core in about that time, so it is issued as
     * column blocks OpenBLAS keeps on the calling thread: a layer step at M=16, 256->256, r=8
     * measured 650 us on 2 threads and 420 us on one. */
    int64_t block = n;
    if ((double)m * (double)n * (double)k < CPEFT_BLAS_SMALL_MNK && m * k > 0)
        block = CPEFT_BLAS_ONE_THREAD_MNK / (m * k) > 0 ? CPEFT_BLAS_ONE_THREAD_MNK / (m * k) : n;
    size_t esize = cpeft_dtype_size(dtype);
    for (int64_t j0 = 0; j0 < n; j0 += block) {
        int64_t nb = n - j0 < block ? n - j0 : block;
        /* Columns j0.. of op(B): stored rows when B is transposed, stored columns otherwise. */
        const char *pb_block = (const char *)pb + (size_t)(tb ? j0 * ldb : j0) * esize;
        char *pc_block = (char *)c.data + (size_t)j0 * esize;
        if (dtype == CPEFT_FLOAT32)
            scipy_cblas_sgemm(CblasRowMajor, cta, ctb, (blasint)m, (blasint)nb, (blasint)k,
                              (float)alpha, (const float *)pa, (blasint)lda,
                              (const float *)pb_block, (blasint)ldb, (float)beta, (float *)pc_block,
                              (blasint)lc.ld);
        else
            scipy_cblas_dgemm(CblasRowMajor, cta, ctb, (blasint)m, (blasint)nb, (blasint)k, alpha,
                              (const double *)pa, (blasint)lda, (const double *)pb_block,
                              (blasint)ldb, beta, (double *)pc_block, (blasint)lc.ld);
    }
    return CPEFT_OK;
}

int cpeft_colsum_cpu(cpeft_dtype dtype, double alpha, cpeft_mat a, cpeft_vec out, cpeft_status *st)
{
    if (a.cols == 0)
        return CPEFT_OK;
    /* out viewed as 1 x cols: a strided out becomes a column-major view with ld = stride. */
    cpeft_mat out_row = {out.data, 1, a.cols, a.cols, out.len <= 1 ? 1 : out.stride};
    if (a.rows == 0) {
        cpeft_fill_zero_cpu(dtype, out_row);
        return CPEFT_OK;
    }
    void *ones = cpeft_alloc_temp(dtype, a.rows, "column-sum ones vector", st);
    if (ones == NULL)
        return st->code;
    for (int64_t i = 0; i < a.rows; ++i) {
        if (dtype == CPEFT_FLOAT32)
            ((float *)ones)[i] = 1.0f;
        else
            ((double *)ones)[i] = 1.0;
    }
    /* out (1 x cols) = alpha * ones (1 x rows) · A: a GEMM with M = 1 is a GEMV, and the GEMM
     * wrapper already handles every storage order of A and of out. */
    int rc = cpeft_gemm_cpu(dtype, 0, 0, alpha, cpeft_mat_compact(ones, 1, a.rows), a, 0.0, out_row,
                            st);
    free(ones);
    return rc;
}
