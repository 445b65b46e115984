/* LoRA linear over mixed-adapter batches on the CPU; contract in cpeft/lora_grouped.h.
 *
 * Rows are grouped by adapter with a stable counting sort, then processed a bounded chunk of
 * grouped rows at a time: the chunk's rows are gathered, every adapter present in the chunk gets
 * its products as one problem of a single OpenBLAS batch call (cblas_?gemm_batch, which spreads
 * the problems over OpenBLAS's threads instead of waking them for each small GEMM), and the
 * results are scattered back to the rows' places. */
#include "cpeft/lora_grouped.h"

#include <limits.h>
#include <stdlib.h>

#include <cblas.h>

#include "cpeft/views.h"
#include "blas.h"
#include "dropout_rows.h"
#include "gather.h"
#include "op_setup.h"
#include "strided.h"

/* The rows of adapter g are order[start[g]] .. order[start[g+1] - 1], in batch order. */
typedef struct {
    int64_t *order;
    int64_t *start;
} grouping;

static void grouping_free(grouping *gr)
{
    free(gr->order);
    free(gr->start);
}

/* A stable counting sort of the rows by adapter; rows without adapter (-1) are left out. */
/* Before an op's first write: every adapter index in [-1, G), so that a refused call has written
 * nothing. group_rows checks each index again where it reads it (another thread may rewrite
 * them while the GIL is released). */
static int check_index_range(const cpeft_lora_grouped_args *a, cpeft_status *st)
{
    for (int64_t m = 0; m < a->m; ++m) {
        int64_t g = cpeft_index_at(a->index_dtype, a->index, m);
        if (g < -1 || g >= a->adapters)
            return cpeft_fail(st, CPEFT_ERR_INDEX,
                              "index[%lld] = %lld is not an adapter: expected -1 (no adapter) or "
                              "a value in [0, %lld)",
                              (long long)m, (long long)g, (long long)a->adapters);
    }
    return CPEFT_OK;
}

static int group_rows(const cpeft_lora_grouped_args *a, grouping *gr, cpeft_status *st)
{
    int64_t g_count = a->adapters;
    gr->order = (int64_t *)malloc(sizeof(int64_t) * (size_t)(a->m > 0 ? a->m : 1));
    gr->start = (int64_t *)calloc((size_t)g_count + 1, sizeof(int64_t));
    int64_t *next = (int64_t *)malloc(sizeof(int64_t) * (size_t)g_count);
    if (gr->order == NULL || gr->start == NULL || next == NULL) {
        free(next);
        grouping_free(gr);
        return cpeft_fail(st, CPEFT_ERR_NOMEM, "lora_grouped: cannot allocate the row grouping");
    }
    for (int64_t m = 0; m < a->m; ++m) {
        int64_t g = cpeft_index_at(a->index_dtype, a->index, m);
        if (g < -1 || g >= g_count) {
            free(next);
            grouping_free(gr);
            return cpeft_fail(st, CPEFT_ERR_INDEX,
                              "lora_grouped: adapter index %lld of row %lld "
                              "is outside [-1, %lld)",
                              (long long)g, (long long)m, (long long)g_count);
        }
        if (g >= 0)
            gr->start[g + 1] += 1;
    }
    for (int64_t g = 0; g < g_count; ++g) {
        gr->start[g + 1] += gr->start[g];
        next[g] = gr->start[g];
    }
    /* The index is read again without the GIL: a caller's thread may have rewritten it since the
     * count, so every entry is range-checked again and each group must fill exactly the slots it
     * counted; anything else would leave slots of `order` unwritten or write past them. */
    int changed = 0;
    for (int64_t m = 0; m < a->m && !changed; ++m) {
        int64_t g = cpeft_index_at(a->index_dtype, a->index, m);
        if (g < -1 || g >= g_count || (g >= 0 && next[g] >= gr->start[g + 1])) {
            changed = 1;
        } else if (g >= 0) {
            gr->order[next[g]++] = m;
        }
    }
    for (int64_t g = 0; g < g_count && !changed; ++g) {
        changed = next[g] != gr->start[g + 1];
    }
    free(next);
    if (changed) {
        grouping_free(gr);
        return cpeft_fail(st, CPEFT_ERR_INDEX,
                          "lora_grouped: the adapter index changed while "
                          "the call was reading it");
    }
    return CPEFT_OK;
}

/* ---- one batch of independent GEMMs -------------------------------------------------------- */

typedef struct {
    int trans_a, trans_b;
    double alpha, beta;
    cpeft_mat a, b, c;            /* C = alpha · op(A)·op(B) + beta · C */
} gemm_problem;

typedef struct {
    int count;
    enum CBLAS_TRANSPOSE *ta, *tb;
    blasint *m, *n, *k, *lda, *ldb, *ldc, *sizes;
    double *alpha64, *beta64;
    float *alpha32, *beta32;
    const void **pa, **pb;
    void **pc;
} gemm_batch;

static void gemm_batch_free(gemm_batch *b)
{
    free(b->ta);
    free(b->tb);
    free(b->m);
    free(b->alpha64);
    free(b->alpha32);
    free(b->pa);
}

static int gemm_batch_alloc(int64_t capacity, gemm_batch *b, cpeft_status *st)
{
    size_t cap = (size_t)(capacity > 0 ? capacity : 1);
    b->ta = (enum CBLAS_TRANSPOSE *)malloc(cap * sizeof(enum CBLAS_TRANSPOSE));
    b->tb = (enum CBLAS_TRANSPOSE *)malloc(cap * sizeof(enum CBLAS_TRANSPOSE));
    b->m = (blasint *)malloc(7 * cap * sizeof(blasint));
    b->alpha64 = (double *)malloc(2 * cap * sizeof(double));
    b->alpha32 = (float *)malloc(2 * cap * sizeof(float));
    b->pa = (const void **)malloc(3 * cap * sizeof(void *));
    if (!b->ta || !b->tb || !b->m || !b->alpha64 || !b->alpha32 || !b->pa) {
        gemm_batch_free(b);
        return cpeft_fail(st, CPEFT_ERR_NOMEM, "lora_grouped: cannot allocate a GEMM batch");
    }
    b->n = b->m + cap;
    b->k = b->n + cap;
    b->lda = b->k + cap;
    b->ldb = b->lda + cap;
    b->ldc = b->ldb + cap;
    b->sizes = b->ldc + cap;
    b->beta64 = b->alpha64 + cap;
    b->beta32 = b->alpha32 + cap;
    b->pb = b->pa + cap;
    b->pc = (void **)(b->pa + 2 * cap);
    return CPEFT_OK;
}

/* A BLAS operand for row-major CBLAS: its pointer, leading dimension and transpose flag, or 0
 * when the view has no unit stride. */
static int row_major_operand(cpeft_mat m, int trans, enum CBLAS_TRANSPOSE *t, blasint *ld)
{
    int64_t cols = m.cols > 1 ? m.cols : 1, rows = m.rows > 1 ? m.rows : 1;
    if (m.col_stride == 1 && (m.row_stride >= cols || m.rows <= 1)) {
        *t = trans ? CblasTrans : CblasNoTrans;
        *ld = (blasint)(m.row_stride > cols ? m.row_stride : cols);
        return m.row_stride <= INT_MAX;
    }
    if (m.row_stride == 1 && (m.col_stride >= rows || m.cols <= 1)) {
        *t = trans ? CblasNoTrans : CblasTrans;
        *ld = (blasint)(m.col_stride > rows ? m.col_stride : rows);
        return m.col_stride <= INT_MAX;
    }
    return 0;
}

/* Runs the problems as one cblas_?gemm_batch call; views the batch interface cannot take (a
 * column-major C, sizes past 32 bits, K = 0) go through cpeft_gemm_cpu one by one. */
static int run_batch(cpeft_dtype dt, const gemm_problem *p, int count, gemm_batch *b,
                     cpeft_status *st)
{
    b->count = 0;
    for (int i = 0; i < count; ++i) {
        int64_t m = p[i].c.rows, n = p[i].c.cols, k = p[i].trans_a ? p[i].a.rows : p[i].a.cols;
        enum CBLAS_TRANSPOSE tc;
        blasint ldc;
        int j = b->count;
        int batchable = m > 0 && n > 0 && k > 0 && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX &&
                        row_major_operand(p[i].a, p[i].trans_a, &b->ta[j], &b->lda[j]) &&
                        row_major_operand(p[i].b, p[i].trans_b, &b->tb[j], &b->ldb[j]) &&
                        row_major_operand(p[i].c, 0, &tc, &ldc) && tc == CblasNoTrans;
        if (!batchable) {
            int rc = cpeft_gemm_cpu(dt, p[i].trans_a, p[i].trans_b, p[i].alpha, p[i].a, p[i].b,
                                    p[i].beta, p[i].c, st);
            if (rc != CPEFT_OK)
                return rc;
            continue;
        }
        b->m[j] = (blasint)m;
        b->n[j] = (blasint)n;
        b->k[j] = (blasint)k;
        b->ldc[j] = ldc;
        b->sizes[j] = 1;
        b->alpha64[j] = p[i].alpha;
        b->beta64[j] = p[i].beta;
        b->alpha32[j] = (float)p[i].alpha;
        b->beta32[j] = (float)p[i].beta;
        b->pa[j] = p[i].a.data;
        b->pb[j] = p[i].b.data;
        b->pc[j] = p[i].c.data;
        b->count++;
    }
    if (b->count == 0)
        return CPEFT_OK;
    if (dt == CPEFT_FLOAT32)
        scipy_cblas_sgemm_batch(CblasRowMajor, b->ta, b->tb, b->m, b->n, b->k, b->alpha32,
                                (const float **)b->pa, b->lda, (const float **)b->pb, b->ldb,
                                b->beta32, (float **)b->pc, b->ldc, (blasint)b->count, b->sizes);
    else
        scipy_cblas_dgemm_batch(CblasRowMajor, b->ta, b->tb, b->m, b->n, b->k, b->alpha64,
                                (const double **)b->pa, b->lda, (const double **)b->pb, b->ldb,
                                b->beta64, (double **)b->pc, b->ldc, (blasint)b->count, b->sizes);
    return CPEFT_OK;
}

/* ---- rows ------------------------------------------------------------------------------------ */

static cpeft_mat row_of(cpeft_dtype dt, cpeft_mat m, int64_t row, int64_t cols)
{
    return cpeft_mat_sub(dt, m, row, 1, 0, cols);
}

/* dst (1 x n) = src, or dst += src when accumulate. */
static void move_row(cpeft_dtype dt, cpeft_mat src, cpeft_mat dst, int accumulate)
{
    if (dt == CPEFT_FLOAT32) {
        const float *s = (const float *)src.data;
        float *d = (float *)dst.data;
        for (int64_t j = 0; j < src.cols; ++j) {
            float v = s[j * src.col_stride];
            d[j * dst.col_stride] = accumulate ? d[j * dst.col_stride] + v : v;
        }
    } else {
        const double *s = (const double *)src.data;
        double *d = (double *)dst.data;
        for (int64_t j = 0; j < src.cols; ++j) {
            double v = s[j * src.col_stride];
            d[j * dst.col_stride] = accumulate ? d[j * dst.col_stride] + v : v;
        }
    }
}

/* Row m of x (dropped out as in lora_linear: counters m*IN + i) into row i of buf. */
static void gather_input_row(const cpeft_lora_grouped_args *a, int64_t m, cpeft_mat buf, int64_t i)
{
    cpeft_dtype dt = a->dtype;
    cpeft_mat src = row_of(dt, a->x, m, a->in), dst = row_of(dt, buf, i, a->in);
    if (a->dropout.p > 0.0)
        cpeft_dropout_rows_cpu(dt, &a->dropout, m, 1.0, src, 0, dst);
    else
        move_row(dt, src, dst, 0);
}

/* ---- the work shared by forward and backward ------------------------------------------------- */

/* One adapter's rows inside the current chunk of grouped rows. */
typedef struct {
    int64_t adapter, rank,
        offset;   /* offset: the adapter's first row in lora_a / column in lora_b */
    int64_t first, rows;              /* rows [first, first + rows) of the chunk buffers */
} chunk_part;

typedef struct {
    grouping gr;
    int64_t chunk;                    /* grouped rows per chunk */
    int64_t *rank_offset;             /* G + 1 */
    chunk_part *parts;                /* G */
    gemm_problem *problems;           /* G */
    gemm_batch batch;
    void *buffers[4];
} grouped_work;

static void grouped_work_free(grouped_work *w)
{
    grouping_free(&w->gr);
    free(w->rank_offset);
    free(w->parts);
    free(w->problems);
    gemm_batch_free(&w->batch);
    for (int k = 0; k < 4; ++k)
        free(w->buffers[k]);
}

/* Groups the rows and allocates chunk buffers of chunk x cols[k] elements (0: not needed). */
static int grouped_work_init(const cpeft_lora_grouped_args *a, const int64_t cols[4],
                             grouped_work *w, cpeft_status *st)
{
    cpeft_dtype dt = a->dtype;
    *w = (grouped_work){0};
    int rc = group_rows(a, &w->gr, st);
    if (rc != CPEFT_OK)
        return rc;
    int64_t widest = a->in > a->out ? a->in : a->out;
    w->chunk = cpeft_chunk_rows(dt, widest > a->r_max ? widest : a->r_max);
    w->rank_offset = (int64_t *)malloc(sizeof(int64_t) * (size_t)(a->adapters + 1));
    w->parts = (chunk_part *)malloc(sizeof(chunk_part) * (size_t)a->adapters);
    w->problems = (gemm_problem *)malloc(sizeof(gemm_problem) * (size_t)a->adapters);
    if (w->rank_offset == NULL || w->parts == NULL || w->problems == NULL) {
        w->batch = (gemm_batch){0};
        grouped_work_free(w);
        return cpeft_fail(st, CPEFT_ERR_NOMEM, "lora_grouped: cannot allocate the adapter tables");
    }
    if ((rc = gemm_batch_alloc(a->adapters, &w->batch, st)) != CPEFT_OK) {
        w->batch = (gemm_batch){0};
        grouped_work_free(w);
        return rc;
    }
    w->rank_offset[0] = 0;
    for (int64_t g = 0; g < a->adapters; ++g)
        w->rank_offset[g + 1] = w->rank_offset[g] + a->ranks[g];
    for (int k = 0; k < 4; ++k) {
        if (cols[k] == 0)
            continue;
        w->buffers[k] = cpeft_alloc_temp(dt, w->chunk * cols[k], "lora_grouped chunk", st);
        if (w->buffers[k] == NULL) {
            grouped_work_free(w);
            return st->code;
        }
    }
    return CPEFT_OK;
}

/* The adapters present in grouped rows [p0, p1), as parts relative to p0; returns their count. */
static int chunk_parts(const cpeft_lora_grouped_args *a, const grouped_work *w, int64_t p0,
                       int64_t p1, chunk_part *parts)
{
    int count = 0;
    for (int64_t g = 0; g < a->adapters; ++g) {
        int64_t lo = w->gr.start[g] > p0 ? w->gr.start[g] : p0;
        int64_t hi = w->gr.start[g + 1] < p1 ? w->gr.start[g + 1] : p1;
        if (lo >= hi)
            continue;
        parts[count++] = (chunk_part){g, a->ranks[g], w->rank_offset[g], lo - p0, hi - lo};
    }
    return count;
}

static int64_t grouped_rows(const cpeft_lora_grouped_args *a, const grouped_work *w)
{
    return w->gr.start[a->adapters];
}

/* y = x·Wᵀ + b over all rows. */
static int base_product(const cpeft_lora_grouped_args *a, cpeft_mat y, cpeft_status *st)
{
    if (a->bias.data != NULL) {
        cpeft_fill_rows_cpu(a->dtype, y, a->bias);
        return cpeft_gemm_cpu(a->dtype, 0, 1, 1.0, a->x, a->weight, 1.0, y, st);
    }
    return cpeft_gemm_cpu(a->dtype, 0, 1, 1.0, a->x, a->weight, 0.0, y, st);
}

int cpeft_lora_grouped_fwd_cpu(const cpeft_lora_grouped_args *a,
                               const cpeft_lora_grouped_fwd_out *o, cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "lora_grouped_forward", st);
    if (rc != CPEFT_OK || (rc = check_index_range(a, st)) != CPEFT_OK)
        return rc;
    cpeft_dtype dt = a->dtype;
    grouped_work w;
    const int64_t cols[4] = {a->in, a->r_max, a->out, 0};
    if ((rc = grouped_work_init(a, cols, &w, st)) != CPEFT_OK)
        return rc;
    rc = base_product(a, o->y, st);
    cpeft_fill_zero_cpu(dt, o->xa);
    int64_t total = grouped_rows(a, &w);
    for (int64_t p0 = 0; p0 < total && rc == CPEFT_OK; p0 += w.chunk) {
        int64_t n = total - p0 < w.chunk ? total - p0 : w.chunk;
        const int64_t *ms = w.gr.order + p0;
        cpeft_mat xs = cpeft_mat_compact(w.buffers[0], n, a->in);
        cpeft_mat xas = cpeft_mat_compact(w.buffers[1], n, a->r_max);
        cpeft_mat ys = cpeft_mat_compact(w.buffers[2], n, a->out);
        for (int64_t i = 0; i < n; ++i)
            gather_input_row(a, ms[i], xs, i);
        int parts = chunk_parts(a, &w, p0, p0 + n, w.parts);
        for (int q = 0; q < parts; ++q) {   /* xa_g = drop(x_g)·A_gᵀ */
            chunk_part c = w.parts[q];
            w.problems[q] = (gemm_problem){0,
                                           1,
                                           1.0,
                                           0.0,
                                           cpeft_mat_sub(dt, xs, c.first, c.rows, 0, a->in),
                                           cpeft_mat_sub(dt, a->lora_a, c.offset, c.rank, 0, a->in),
                                           cpeft_mat_sub(dt, xas, c.first, c.rows, 0, c.rank)};
        }
        if ((rc = run_batch(dt, w.problems, parts, &w.batch, st)) != CPEFT_OK)
            break;
        for (int q = 0; q < parts; ++q) {   /* d_g = s_g · xa_g·B_gᵀ */
            chunk_part c = w.parts[q];
            w.problems[q] = (gemm_problem){
                0,
                1,
                a->scales[c.adapter],
                0.0,
                cpeft_mat_sub(dt, xas, c.first, c.rows, 0, c.rank),
                cpeft_mat_sub(dt, a->lora_b, 0, a->out, c.offset, c.rank),
                cpeft_mat_sub(dt, ys, c.first, c.rows, 0, a->out)};
        }
        if ((rc = run_batch(dt, w.problems, parts, &w.batch, st)) != CPEFT_OK)
            break;
        for (int q = 0; q < parts; ++q) {
            chunk_part c = w.parts[q];
            for (int64_t i = c.first; i < c.first + c.rows; ++i) {
                move_row(dt, row_of(dt, xas, i, c.rank), row_of(dt, o->xa, ms[i], c.rank), 0);
                move_row(dt, row_of(dt, ys, i, a->out), row_of(dt, o->y, ms[i], a->out), 1);
            }
        }
    }
    grouped_work_free(&w);
    return rc;
}

int cpeft_lora_grouped_bwd_cpu(const cpeft_lora_grouped_args *a,
                               const cpeft_lora_grouped_bwd_in *in,
                               const cpeft_lora_grouped_bwd_out *o, cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "lora_grouped_backward", st);
    if (rc != CPEFT_OK || (rc = check_index_range(a, st)) != CPEFT_OK)
        return rc;
    cpeft_dtype dt = a->dtype;
    int want_x = o->grad_x.data != NULL, want_a = o->grad_a.data != NULL,
        want_b = o->grad_b.data != NULL;
    if (o->grad_bias.data != NULL &&
        (rc = cpeft_colsum_cpu(dt, 1.0, in->grad_out, o->grad_bias, st)) != CPEFT_OK)
        return rc;
    if (o->grad_weight.data != NULL && (rc = cpeft_gemm_cpu(dt, 1, 0, 1.0, in->grad_out, a->x, 0.0,
                                                            o->grad_weight, st)) != CPEFT_OK)
        return rc;
    if (want_x && (rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, in->grad_out, a->weight, 0.0, o->grad_x,
                                       st)) != CPEFT_OK)
        return rc;
    if (want_a)
        cpeft_fill_zero_cpu(dt, o->grad_a);
    if (want_b)
        cpeft_fill_zero_cpu(dt, o->grad_b);
    if (!want_x && !want_a && !want_b)
        return CPEFT_OK;
    grouped_work w;
    const int64_t cols[4] = {a->out, a->r_max, a->r_max, (want_a || want_x) ? a->in : 0};
    if ((rc = grouped_work_init(a, cols, &w, st)) != CPEFT_OK)
        return rc;
    int64_t total = grouped_rows(a, &w);
    for (int64_t p0 = 0; p0 < total && rc == CPEFT_OK; p0 += w.chunk) {
        int64_t n = total - p0 < w.chunk ? total - p0 : w.chunk;
        const int64_t *ms = w.gr.order + p0;
        cpeft_mat gs = cpeft_mat_compact(w.buffers[0], n, a->out);
        cpeft_mat xas = cpeft_mat_compact(w.buffers[1], n, a->r_max);
        cpeft_mat gb = cpeft_mat_compact(w.buffers[2], n, a->r_max);
        cpeft_mat xs = cpeft_mat_compact(w.buffers[3], n, a->in);
        int parts = chunk_parts(a, &w, p0, p0 + n, w.parts);
        for (int64_t i = 0; i < n; ++i)
            move_row(dt, row_of(dt, in->grad_out, ms[i], a->out), row_of(dt, gs, i, a->out), 0);
        if (want_b) {   /* grad_b_g += s_g · g_gᵀ·xa_g (one part per adapter in a chunk) */
            for (int64_t i = 0; i < n; ++i)
                move_row(dt, row_of(dt, in->xa, ms[i], a->r_max), row_of(dt, xas, i, a->r_max), 0);
            for (int q = 0; q < parts; ++q) {
                chunk_part c = w.parts[q];
                w.problems[q] = (gemm_problem){
                    1,
                    0,
                    a->scales[c.adapter],
                    1.0,
                    cpeft_mat_sub(dt, gs, c.first, c.rows, 0, a->out),
                    cpeft_mat_sub(dt, xas, c.first, c.rows, 0, c.rank),
                    cpeft_mat_sub(dt, o->grad_b, 0, a->out, c.offset, c.rank)};
            }
            if ((rc = run_batch(dt, w.problems, parts, &w.batch, st)) != CPEFT_OK)
                break;
        }
        if (!want_a && !want_x)
            continue;
        for (int q = 0; q < parts; ++q) {   /* gb_g = g_g·B_g */
            chunk_part c = w.parts[q];
            w.problems[q] = (gemm_problem){
                0,
                0,
                1.0,
                0.0,
                cpeft_mat_sub(dt, gs, c.first, c.rows, 0, a->out),
                cpeft_mat_sub(dt, a->lora_b, 0, a->out, c.offset, c.rank),
                cpeft_mat_sub(dt, gb, c.first, c.rows, 0, c.rank)};
        }
        if ((rc = run_batch(dt, w.problems, parts, &w.batch, st)) != CPEFT_OK)
            break;
        if (want_a) {   /* grad_a_g += s_g · gb_gᵀ·drop(x_g) */
            for (int64_t i = 0; i < n; ++i)
                gather_input_row(a, ms[i], xs, i);
            for (int q = 0; q < parts; ++q) {
                chunk_part c = w.parts[q];
                w.problems[q] = (gemm_problem){
                    1,
                    0,
                    a->scales[c.adapter],
                    1.0,
                    cpeft_mat_sub(dt, gb, c.first, c.rows, 0, c.rank),
                    cpeft_mat_sub(dt, xs, c.first, c.rows, 0, a->in),
                    cpeft_mat_sub(dt, o->grad_a, c.offset, c.rank, 0, a->in)};
            }
            if ((rc = run_batch(dt, w.problems, parts, &w.batch, st)) != CPEFT_OK)
                break;
        }
        if (want_x) {   /* grad_x[rows] += drop'(s_g · gb_g·A_g), xs reused once grad_a is done */
            for (int q = 0; q < parts; ++q) {
                chunk_part c = w.parts[q];
                w.problems[q] = (gemm_problem){
                    0,
                    0,
                    a->scales[c.adapter],
                    0.0,
                    cpeft_mat_sub(dt, gb, c.first, c.rows, 0, c.rank),
                    cpeft_mat_sub(dt, a->lora_a, c.offset, c.rank, 0, a->in),
                    cpeft_mat_sub(dt, xs, c.first, c.rows, 0, a->in)};
            }
            if ((rc = run_batch(dt, w.problems, parts, &w.batch, st)) != CPEFT_OK)
                break;
            for (int64_t i = 0; i < n; ++i) {
                cpeft_mat src = row_of(dt, xs, i, a->in);
                cpeft_mat dst = row_of(dt, o->grad_x, ms[i], a->in);
                if (a->dropout.p > 0.0)
                    cpeft_dropout_rows_cpu(dt, &a->dropout, ms[i], 1.0, src, 1, dst);
                else
                    move_row(dt, src, dst, 1);
            }
        }
    }
    grouped_work_free(&w);
    return rc;
}
