/* LoRA linear (plain and grouped) on the CPU; contract in cpeft/lora_linear.h. */
#include "cpeft/lora_linear.h"

#include <stdlib.h>

#include "blas.h"

int cpeft_lora_groups_cpu(const cpeft_lora_linear_args *a, int64_t *seg, int64_t *enabled_count,
                          cpeft_status *st)
{
    if (a->groups < 1 || a->groups > CPEFT_MAX_GROUPS || a->out % a->groups != 0)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "lora_linear: groups must be in [1, %d] and divide out=%lld, got %lld",
                          CPEFT_MAX_GROUPS, (long long)a->out, (long long)a->groups);
    int64_t k = 0;
    for (int64_t g = 0; g < a->groups; ++g)
        k += a->enabled[g] != 0;
    *seg = a->out / a->groups;
    *enabled_count = k;
    if (a->lora_a.rows != a->r * k || a->lora_a.cols != a->in || a->lora_b.rows != *seg * k ||
        a->lora_b.cols != a->r)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "lora_linear: with r=%lld and %lld enabled blocks of %lld rows expected "
                          "lora_a %lld x %lld and lora_b %lld x %lld, got %lld x %lld and "
                          "%lld x %lld",
                          (long long)a->r, (long long)k, (long long)*seg, (long long)(a->r * k),
                          (long long)a->in, (long long)(*seg * k), (long long)a->r,
                          (long long)a->lora_a.rows, (long long)a->lora_a.cols,
                          (long long)a->lora_b.rows, (long long)a->lora_b.cols);
    return CPEFT_OK;
}

static int has_dropout(const cpeft_lora_linear_args *a)
{
    return a->dropout.p > 0.0;
}

/* xa = drop(x)·Aᵀ. Without dropout x feeds the GEMM directly; with it, dropped rows are built
 * a chunk at a time so the temporary stays CPEFT_CHUNK_BYTES whatever M is. */
static int compute_xa(const cpeft_lora_linear_args *a, cpeft_mat xa, cpeft_status *st)
{
    cpeft_dtype dt = a->dtype;
    if (!has_dropout(a))
        return cpeft_gemm_cpu(dt, 0, 1, 1.0, a->x, a->lora_a, 0.0, xa, st);
    if (xa.cols == 0 || a->m == 0)
        return CPEFT_OK;
    int64_t chunk = cpeft_chunk_rows(dt, a->in);
    if (chunk > a->m)
        chunk = a->m;
    void *buf = cpeft_alloc_temp(dt, chunk * a->in, "dropped-x chunk", st);
    if (buf == NULL)
        return st->code;
    int rc = CPEFT_OK;
    for (int64_t row0 = 0; row0 < a->m && rc == CPEFT_OK; row0 += chunk) {
        int64_t n = a->m - row0 < chunk ? a->m - row0 : chunk;
        cpeft_mat dropped = cpeft_mat_compact(buf, n, a->in);
        cpeft_dropout_rows_cpu(dt, &a->dropout, row0, 1.0, cpeft_mat_sub(dt, a->x, row0, n, 0, a->in),
                               0, dropped);
        rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, dropped, a->lora_a, 0.0,
                            cpeft_mat_sub(dt, xa, row0, n, 0, xa.cols), st);
    }
    free(buf);
    return rc;
}

int cpeft_lora_linear_fwd_cpu(const cpeft_lora_linear_args *a, const cpeft_lora_linear_fwd_out *o,
                              cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "lora_linear_forward", st);
    if (rc != CPEFT_OK)
        return rc;
    cpeft_dtype dt = a->dtype;
    int64_t seg, k;
    if ((rc = cpeft_lora_groups_cpu(a, &seg, &k, st)) != CPEFT_OK)
        return rc;

    /* The bias is written first so the base GEMM accumulates onto it (beta = 1) instead of
     * needing a second pass over y. */
    double beta = 0.0;
    if (a->bias.data != NULL) {
        cpeft_fill_rows_cpu(dt, o->y, a->bias);
        beta = 1.0;
    }
    if ((rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, a->x, a->weight, beta, o->y, st)) != CPEFT_OK)
        return rc;

    /* xa is what backward needs; a caller that does not keep it still needs it for y. */
    cpeft_mat xa = o->xa;
    void *xa_temp = NULL;
    if (xa.data == NULL) {
        xa_temp = cpeft_alloc_temp(dt, a->m * a->r * k, "xa", st);
        if (xa_temp == NULL)
            return st->code;
        xa = cpeft_mat_compact(xa_temp, a->m, a->r * k);
    }
    rc = compute_xa(a, xa, st);

    /* y[:, block g] += s · xa_k·B_kᵀ: the scale rides in alpha and the sum in beta, so no
     * temporary of y's size exists. */
    for (int64_t g = 0, kk = 0; g < a->groups && rc == CPEFT_OK; ++g) {
        if (!a->enabled[g])
            continue;
        rc = cpeft_gemm_cpu(dt, 0, 1, a->scale, cpeft_mat_sub(dt, xa, 0, a->m, kk * a->r, a->r),
                            cpeft_mat_sub(dt, a->lora_b, kk * seg, seg, 0, a->r), 1.0,
                            cpeft_mat_sub(dt, o->y, 0, a->m, g * seg, seg), st);
        ++kk;
    }
    free(xa_temp);
    return rc;
}

/* grad_a = s · gbᵀ·drop(x) and grad_x += s · drop'(gb·A), each in row chunks of x sharing one
 * chunk buffer: the mask is regenerated per chunk, never stored. */
static int lora_input_grads_with_dropout(const cpeft_lora_linear_args *a, cpeft_mat gb,
                                         const cpeft_lora_linear_bwd_out *o, cpeft_status *st)
{
    cpeft_dtype dt = a->dtype;
    int64_t rk = gb.cols;
    int64_t chunk = cpeft_chunk_rows(dt, a->in);
    if (chunk > a->m)
        chunk = a->m > 0 ? a->m : 1;
    void *buf = cpeft_alloc_temp(dt, chunk * a->in, "dropout chunk", st);
    if (buf == NULL)
        return st->code;
    int rc = CPEFT_OK;
    /* One pass even when M == 0, so grad_a is still written (zeros) by the K == 0 GEMM. */
    for (int64_t row0 = 0; (row0 < a->m || row0 == 0) && rc == CPEFT_OK; row0 += chunk) {
        int64_t n = a->m - row0 < chunk ? a->m - row0 : chunk;
        cpeft_mat gb_rows = cpeft_mat_sub(dt, gb, row0, n, 0, rk);
        cpeft_mat tmp = cpeft_mat_compact(buf, n, a->in);
        if (o->grad_a.data != NULL) {
            cpeft_dropout_rows_cpu(dt, &a->dropout, row0, 1.0,
                                   cpeft_mat_sub(dt, a->x, row0, n, 0, a->in), 0, tmp);
            rc = cpeft_gemm_cpu(dt, 1, 0, a->scale, gb_rows, tmp, row0 == 0 ? 0.0 : 1.0, o->grad_a,
                                st);
        }
        if (o->grad_x.data != NULL && rc == CPEFT_OK && n > 0) {
            rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, gb_rows, a->lora_a, 0.0, tmp, st);
            if (rc == CPEFT_OK)
                cpeft_dropout_rows_cpu(dt, &a->dropout, row0, a->scale, tmp, 1,
                                       cpeft_mat_sub(dt, o->grad_x, row0, n, 0, a->in));
        }
    }
    free(buf);
    return rc;
}

int cpeft_lora_linear_bwd_cpu(const cpeft_lora_linear_args *a, const cpeft_lora_linear_bwd_in *in,
                              const cpeft_lora_linear_bwd_out *o, cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "lora_linear_backward", st);
    if (rc != CPEFT_OK)
        return rc;
    cpeft_dtype dt = a->dtype;
    int64_t seg, k;
    if ((rc = cpeft_lora_groups_cpu(a, &seg, &k, st)) != CPEFT_OK)
        return rc;
    cpeft_mat g = in->grad_out;
    int64_t rk = a->r * k;

    if (o->grad_b.data != NULL) {
        for (int64_t grp = 0, kk = 0; grp < a->groups && rc == CPEFT_OK; ++grp) {
            if (!a->enabled[grp])
                continue;
            rc = cpeft_gemm_cpu(dt, 1, 0, a->scale, cpeft_mat_sub(dt, g, 0, a->m, grp * seg, seg),
                                cpeft_mat_sub(dt, in->xa, 0, a->m, kk * a->r, a->r), 0.0,
                                cpeft_mat_sub(dt, o->grad_b, kk * seg, seg, 0, a->r), st);
            ++kk;
        }
        if (rc != CPEFT_OK)
            return rc;
    }
    if (o->grad_bias.data != NULL &&
        (rc = cpeft_colsum_cpu(dt, 1.0, g, o->grad_bias, st)) != CPEFT_OK)
        return rc;
    if (o->grad_weight.data != NULL &&
        (rc = cpeft_gemm_cpu(dt, 1, 0, 1.0, g, a->x, 0.0, o->grad_weight, st)) != CPEFT_OK)
        return rc;
    if (o->grad_x.data != NULL &&
        (rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, g, a->weight, 0.0, o->grad_x, st)) != CPEFT_OK)
        return rc;
    /* With no enabled block grad_a has no rows and grad_x is already complete. */
    if ((o->grad_x.data == NULL && o->grad_a.data == NULL) || rk == 0)
        return CPEFT_OK;

    /* gb = g_blocks·B (M x R*K) is the only temporary; it is rank-sized. */
    void *gb_data = cpeft_alloc_temp(dt, a->m * rk, "g·B", st);
    if (gb_data == NULL)
        return st->code;
    cpeft_mat gb = cpeft_mat_compact(gb_data, a->m, rk);
    for (int64_t grp = 0, kk = 0; grp < a->groups && rc == CPEFT_OK; ++grp) {
        if (!a->enabled[grp])
            continue;
        rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, cpeft_mat_sub(dt, g, 0, a->m, grp * seg, seg),
                            cpeft_mat_sub(dt, a->lora_b, kk * seg, seg, 0, a->r), 0.0,
                            cpeft_mat_sub(dt, gb, 0, a->m, kk * a->r, a->r), st);
        ++kk;
    }
    if (rc == CPEFT_OK) {
        if (has_dropout(a)) {
            rc = lora_input_grads_with_dropout(a, gb, o, st);
        } else {
            if (o->grad_a.data != NULL)
                rc = cpeft_gemm_cpu(dt, 1, 0, a->scale, gb, a->x, 0.0, o->grad_a, st);
            if (o->grad_x.data != NULL && rc == CPEFT_OK)
                rc = cpeft_gemm_cpu(dt, 0, 0, a->scale, gb, a->lora_a, 1.0, o->grad_x, st);
        }
    }
    free(gb_data);
    return rc;
}
