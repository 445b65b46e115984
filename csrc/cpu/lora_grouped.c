/* LoRA linear over mixed-adapter batches on the CPU; contract in cpeft/lora_grouped.h. */
#include "cpeft/lora_grouped.h"

#include <stdlib.h>

#include "blas.h"

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
            return cpeft_fail(st, CPEFT_ERR_INDEX, "lora_grouped: adapter index %lld of row %lld "
                              "is outside [-1, %lld)", (long long)g, (long long)m,
                              (long long)g_count);
        }
        if (g >= 0)
            gr->start[g + 1] += 1;
    }
    for (int64_t g = 0; g < g_count; ++g) {
        gr->start[g + 1] += gr->start[g];
        next[g] = gr->start[g];
    }
    for (int64_t m = 0; m < a->m; ++m) {
        int64_t g = cpeft_index_at(a->index_dtype, a->index, m);
        if (g >= 0)
            gr->order[next[g]++] = m;
    }
    free(next);
    return CPEFT_OK;
}

static cpeft_mat row_of(cpeft_dtype dt, cpeft_mat m, int64_t row, int64_t cols)
{
    return cpeft_mat_sub(dt, m, row, 1, 0, cols);
}

/* dst (1 x n) = src (1 x n), or dst += src when accumulate. */
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

/* Row m of x (dropped out as in lora_linear) into row i of buf. */
static void gather_input_row(const cpeft_lora_grouped_args *a, int64_t m, cpeft_mat buf, int64_t i)
{
    cpeft_dtype dt = a->dtype;
    cpeft_mat src = row_of(dt, a->x, m, a->in), dst = row_of(dt, buf, i, a->in);
    if (a->dropout.p > 0.0)
        cpeft_dropout_rows_cpu(dt, &a->dropout, m, 1.0, src, 0, dst);
    else
        move_row(dt, src, dst, 0);
}

typedef struct {
    int64_t chunk;                /* rows per chunk */
    void *buffers[4];
} chunk_buffers;

/* Up to four chunk buffers of chunk x cols[k] elements (cols[k] == 0: not needed). */
static int chunk_buffers_alloc(cpeft_dtype dt, int64_t max_cols, const int64_t cols[4],
                               chunk_buffers *cb, cpeft_status *st)
{
    cb->chunk = cpeft_chunk_rows(dt, max_cols);
    for (int k = 0; k < 4; ++k)
        cb->buffers[k] = NULL;
    for (int k = 0; k < 4; ++k) {
        if (cols[k] == 0)
            continue;
        cb->buffers[k] = cpeft_alloc_temp(dt, cb->chunk * cols[k], "lora_grouped chunk", st);
        if (cb->buffers[k] == NULL) {
            for (int j = 0; j < k; ++j)
                free(cb->buffers[j]);
            return st->code;
        }
    }
    return CPEFT_OK;
}

static void chunk_buffers_free(chunk_buffers *cb)
{
    for (int k = 0; k < 4; ++k)
        free(cb->buffers[k]);
}

static int64_t max3(int64_t a, int64_t b, int64_t c)
{
    int64_t m = a > b ? a : b;
    return m > c ? m : c;
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
    if (rc != CPEFT_OK)
        return rc;
    cpeft_dtype dt = a->dtype;
    grouping gr;
    if ((rc = group_rows(a, &gr, st)) != CPEFT_OK)
        return rc;
    const int64_t cols[4] = {a->in, a->r_max, a->out, 0};
    chunk_buffers cb;
    if ((rc = chunk_buffers_alloc(dt, max3(a->in, a->out, a->r_max), cols, &cb, st)) != CPEFT_OK) {
        grouping_free(&gr);
        return rc;
    }
    rc = base_product(a, o->y, st);
    cpeft_fill_zero_cpu(dt, o->xa);
    for (int64_t g = 0, off = 0; g < a->adapters && rc == CPEFT_OK; off += a->ranks[g], ++g) {
        int64_t r = a->ranks[g], first = gr.start[g], rows = gr.start[g + 1] - first;
        cpeft_mat lora_a = cpeft_mat_sub(dt, a->lora_a, off, r, 0, a->in);
        cpeft_mat lora_b = cpeft_mat_sub(dt, a->lora_b, 0, a->out, off, r);
        for (int64_t c0 = 0; c0 < rows && rc == CPEFT_OK; c0 += cb.chunk) {
            int64_t n = rows - c0 < cb.chunk ? rows - c0 : cb.chunk;
            const int64_t *ms = gr.order + first + c0;
            cpeft_mat xs = cpeft_mat_compact(cb.buffers[0], n, a->in);
            cpeft_mat xas = cpeft_mat_compact(cb.buffers[1], n, r);
            cpeft_mat ys = cpeft_mat_compact(cb.buffers[2], n, a->out);
            for (int64_t i = 0; i < n; ++i)
                gather_input_row(a, ms[i], xs, i);
            if ((rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, xs, lora_a, 0.0, xas, st)) != CPEFT_OK ||
                (rc = cpeft_gemm_cpu(dt, 0, 1, a->scales[g], xas, lora_b, 0.0, ys, st)) != CPEFT_OK)
                break;
            for (int64_t i = 0; i < n; ++i) {
                move_row(dt, row_of(dt, xas, i, r), row_of(dt, o->xa, ms[i], r), 0);
                move_row(dt, row_of(dt, ys, i, a->out), row_of(dt, o->y, ms[i], a->out), 1);
            }
        }
    }
    chunk_buffers_free(&cb);
    grouping_free(&gr);
    return rc;
}

int cpeft_lora_grouped_bwd_cpu(const cpeft_lora_grouped_args *a,
                               const cpeft_lora_grouped_bwd_in *in,
                               const cpeft_lora_grouped_bwd_out *o, cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "lora_grouped_backward", st);
    if (rc != CPEFT_OK)
        return rc;
    cpeft_dtype dt = a->dtype;
    int want_x = o->grad_x.data != NULL, want_a = o->grad_a.data != NULL,
        want_b = o->grad_b.data != NULL;
    if (o->grad_bias.data != NULL &&
        (rc = cpeft_colsum_cpu(dt, 1.0, in->grad_out, o->grad_bias, st)) != CPEFT_OK)
        return rc;
    if (o->grad_weight.data != NULL &&
        (rc = cpeft_gemm_cpu(dt, 1, 0, 1.0, in->grad_out, a->x, 0.0, o->grad_weight, st)) != CPEFT_OK)
        return rc;
    if (want_x && (rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, in->grad_out, a->weight, 0.0, o->grad_x, st))
                      != CPEFT_OK)
        return rc;
    if (want_a)
        cpeft_fill_zero_cpu(dt, o->grad_a);
    if (want_b)
        cpeft_fill_zero_cpu(dt, o->grad_b);
    if (!want_x && !want_a && !want_b)
        return CPEFT_OK;
    grouping gr;
    if ((rc = group_rows(a, &gr, st)) != CPEFT_OK)
        return rc;
    const int64_t cols[4] = {a->out, a->r_max, a->r_max, (want_a || want_x) ? a->in : 0};
    chunk_buffers cb;
    if ((rc = chunk_buffers_alloc(dt, max3(a->in, a->out, a->r_max), cols, &cb, st)) != CPEFT_OK) {
        grouping_free(&gr);
        return rc;
    }
    for (int64_t g = 0, off = 0; g < a->adapters && rc == CPEFT_OK; off += a->ranks[g], ++g) {
        int64_t r = a->ranks[g], first = gr.start[g], rows = gr.start[g + 1] - first;
        double s = a->scales[g];
        cpeft_mat lora_a = cpeft_mat_sub(dt, a->lora_a, off, r, 0, a->in);
        cpeft_mat lora_b = cpeft_mat_sub(dt, a->lora_b, 0, a->out, off, r);
        for (int64_t c0 = 0; c0 < rows && rc == CPEFT_OK; c0 += cb.chunk) {
            int64_t n = rows - c0 < cb.chunk ? rows - c0 : cb.chunk;
            const int64_t *ms = gr.order + first + c0;
            cpeft_mat gs = cpeft_mat_compact(cb.buffers[0], n, a->out);
            cpeft_mat xas = cpeft_mat_compact(cb.buffers[1], n, r);
            cpeft_mat gb = cpeft_mat_compact(cb.buffers[2], n, r);
            cpeft_mat xs = cpeft_mat_compact(cb.buffers[3], n, a->in);
            for (int64_t i = 0; i < n; ++i)
                move_row(dt, row_of(dt, in->grad_out, ms[i], a->out), row_of(dt, gs, i, a->out), 0);
            if (want_b) {
                for (int64_t i = 0; i < n; ++i)
                    move_row(dt, row_of(dt, in->xa, ms[i], r), row_of(dt, xas, i, r), 0);
                cpeft_mat grad_b = cpeft_mat_sub(dt, o->grad_b, 0, a->out, off, r);
                if ((rc = cpeft_gemm_cpu(dt, 1, 0, s, gs, xas, 1.0, grad_b, st)) != CPEFT_OK)
                    break;
            }
            if (!want_a && !want_x)
                continue;
            if ((rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, gs, lora_b, 0.0, gb, st)) != CPEFT_OK)
                break;
            if (want_a) {
                for (int64_t i = 0; i < n; ++i)
                    gather_input_row(a, ms[i], xs, i);
                cpeft_mat grad_a = cpeft_mat_sub(dt, o->grad_a, off, r, 0, a->in);
                if ((rc = cpeft_gemm_cpu(dt, 1, 0, s, gb, xs, 1.0, grad_a, st)) != CPEFT_OK)
                    break;
            }
            if (want_x) {
                if ((rc = cpeft_gemm_cpu(dt, 0, 0, s, gb, lora_a, 0.0, xs, st)) != CPEFT_OK)
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
    }
    chunk_buffers_free(&cb);
    grouping_free(&gr);
    return rc;
}
