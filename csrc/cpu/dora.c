/* DoRA linear and embedding on the CPU; contract and formulas in cpeft/dora.h. */
#include "cpeft/dora.h"

#include <math.h>
#include <stdlib.h>

#include "cpeft/views.h"
#include "blas.h"
#include "dropout_rows.h"
#include "gather.h"
#include "op_setup.h"
#include "strided.h"

#define T float
#define SUFFIX f32
#include "dora_loops.inc"
#undef T
#undef SUFFIX

#define T double
#define SUFFIX f64
#include "dora_loops.inc"
#undef T
#undef SUFFIX

#define DORA_DISPATCH(dt, name, ...) \
    do {                             \
        if ((dt) == CPEFT_FLOAT32)   \
            name##_f32(__VA_ARGS__); \
        else                         \
            name##_f64(__VA_ARGS__); \
    } while (0)

static void *alloc_doubles(int64_t count, const char *what, cpeft_status *st)
{
    double *p = calloc((size_t)(count > 0 ? count : 1), sizeof(double));
    if (p == NULL)
        cpeft_fail(st, CPEFT_ERR_NOMEM, "could not allocate %s (%lld doubles)", what,
                   (long long)count);
    return p;
}

int cpeft_dora_weight_sq_norm_cpu(cpeft_dtype dtype, cpeft_mat weight, cpeft_vec out,
                                  cpeft_status *st)
{
    int rc = cpeft_op_begin(dtype, "dora_weight_sq_norm", st);
    if (rc != CPEFT_OK)
        return rc;
    double *acc = alloc_doubles(weight.rows, "the squared row norms", st);
    if (acc == NULL)
        return st->code;
    DORA_DISPATCH(dtype, row_sq_norms, weight, acc);
    DORA_DISPATCH(dtype, store, acc, out);
    free(acc);
    return CPEFT_OK;
}

/* n from the identity in dora.h: W·Aᵀ (OUT x R) is the only product that reads W. */
/* A compact copy of m scaled by a power of two that brings its largest magnitude into [0.5, 1);
 * returns the exponent e (m = copy · 2^e; 0 when m is all zeros or holds inf/NaN, which must
 * propagate). Exact apart from elements that fall below the smallest subnormal, whose share of
 * the products is below the data type's resolution anyway. */
static int64_t normalized_copy(cpeft_dtype dt, cpeft_mat m, void *data, cpeft_mat *copy)
{
    double largest = 0.0;
    for (int64_t i = 0; i < m.rows; ++i)
        for (int64_t j = 0; j < m.cols; ++j) {
            int64_t at = i * m.row_stride + j * m.col_stride;
            double v = fabs(dt == CPEFT_FLOAT32 ? (double)((const float *)m.data)[at]
                                                : ((const double *)m.data)[at]);
            largest = v > largest || v != v ? v : largest;
        }
    int e = 0;
    if (largest > 0.0 && isfinite(largest))
        frexp(largest, &e);
    double factor = ldexp(1.0, -e);
    *copy = cpeft_mat_compact(data, m.rows, m.cols);
    for (int64_t i = 0; i < m.rows; ++i)
        for (int64_t j = 0; j < m.cols; ++j) {
            int64_t at = i * m.row_stride + j * m.col_stride, to = i * m.cols + j;
            if (dt == CPEFT_FLOAT32)
                ((float *)data)[to] = (float)((double)((const float *)m.data)[at] * factor);
            else
                ((double *)data)[to] = ((const double *)m.data)[at] * factor;
        }
    return e;
}

static int dora_norm(const cpeft_dora_norm_args *a, cpeft_vec norm, cpeft_status *st)
{
    cpeft_dtype dt = a->dtype;
    double *wsq = alloc_doubles(a->out, "the squared row norms", st);
    void *work = wsq ? cpeft_alloc_temp(
                           dt, 2 * a->out * a->r + a->r * a->r + a->r * a->in + a->out * a->r,
                           "W·Aᵀ, B·A·Aᵀ and normalized A, B", st)
                     : NULL;
    if (work == NULL) {
        free(wsq);
        return st->code;
    }
    size_t elt = cpeft_dtype_size(dt);
    cpeft_mat wa = cpeft_mat_compact(work, a->out, a->r);
    cpeft_mat bg = cpeft_mat_compact((char *)work + (size_t)(a->out * a->r) * elt, a->out, a->r);
    char *after_gram = (char *)work + (size_t)(2 * a->out * a->r + a->r * a->r) * elt;
    cpeft_mat gram = cpeft_mat_compact((char *)work + (size_t)(2 * a->out * a->r) * elt, a->r,
                                       a->r);
    if (a->weight_sq_norm.data != NULL)
        DORA_DISPATCH(dt, load, a->weight_sq_norm, wsq);
    else
        DORA_DISPATCH(dt, row_sq_norms, a->weight, wsq);
    /* A·Aᵀ and B·(A·Aᵀ) square the adapters' magnitudes: in float32, adapters near 1e±19 would
     * overflow or underflow there although n itself is representable. A and B enter normalized
     * to [0.5, 1) by powers of two, and the exponents move into the scale, which
     * finish_norms applies in double. */
    cpeft_mat a_n, b_n;
    int64_t e_a = normalized_copy(dt, a->lora_a, after_gram, &a_n);
    int64_t e_b = normalized_copy(dt, a->lora_b, after_gram + (size_t)(a->r * a->in) * elt, &b_n);
    double scale = ldexp(a->scale, (int)(e_a + e_b));
    int rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, a->weight, a_n, 0.0, wa, st);
    if (rc == CPEFT_OK)
        rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, a_n, a_n, 0.0, gram, st);
    if (rc == CPEFT_OK)
        rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, b_n, gram, 0.0, bg, st);
    if (rc == CPEFT_OK)
        DORA_DISPATCH(dt, finish_norms, wsq, b_n, wa.data, bg.data, scale, norm);
    free(work);
    free(wsq);
    return rc;
}

int cpeft_dora_norm_cpu(const cpeft_dora_norm_args *a, cpeft_vec norm, cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "dora_weight_norm", st);
    if (rc != CPEFT_OK)
        return rc;
    return dora_norm(a, norm, st);
}

static cpeft_dora_norm_args linear_norm_args(const cpeft_dora_linear_args *a)
{
    const cpeft_lora_linear_args *l = &a->lora;
    cpeft_dora_norm_args n = {l->dtype,  l->out,    l->in,
                              l->r,      l->weight, l->lora_a,
                              l->lora_b, l->scale,  a->weight_sq_norm};
    return n;
}

static int check_plain(const cpeft_lora_linear_args *l, const char *op, cpeft_status *st)
{
    int64_t seg, k;
    int rc = cpeft_lora_groups(l, &seg, &k, st);
    if (rc == CPEFT_OK && (l->groups != 1 || k != 1))
        rc = cpeft_fail(st, CPEFT_ERR_INTERNAL,
                        "%s: DoRA takes one ungrouped adapter, got %lld "
                        "groups",
                        op, (long long)l->groups);
    return rc;
}

/* c = m / n and c - 1 (OUT each) in one buffer of the data type. */
static void *magnitude_scales(cpeft_dtype dt, cpeft_vec m, cpeft_vec n, cpeft_vec *c,
                              cpeft_vec *c_minus_one, cpeft_status *st)
{
    void *buf = cpeft_alloc_temp(dt, 2 * m.len, "m / n", st);
    if (buf == NULL)
        return NULL;
    char *second = (char *)buf + (size_t)m.len * cpeft_dtype_size(dt);
    *c = (cpeft_vec){buf, m.len, 1};
    *c_minus_one = (cpeft_vec){second, m.len, 1};
    DORA_DISPATCH(dt, magnitude_scales, m, n, buf, (void *)second);
    return buf;
}

static void combine(cpeft_dtype dt, cpeft_mat u, cpeft_vec l, cpeft_vec bias, cpeft_mat y)
{
    DORA_DISPATCH(dt, combine, u, l.data, bias, y);
}

/* Rows of dropped x per chunk: at least 512, so the chunked products with W (which BLAS
 * repacks on every call) stay large next to the packing. */
static int64_t dropout_chunk_rows(cpeft_dtype dt, int64_t m, int64_t in)
{
    int64_t rows = cpeft_chunk_rows(dt, in);
    if (rows < 512)
        rows = 512;
    return rows < m ? rows : (m > 0 ? m : 1);
}

/* With dropout: xa = xd·Aᵀ and d = xd·Wᵀ, building xd one row chunk at a time. */
static int dropped_terms(const cpeft_lora_linear_args *l, cpeft_mat xa, cpeft_mat d,
                         cpeft_status *st)
{
    cpeft_dtype dt = l->dtype;
    int64_t rows = dropout_chunk_rows(dt, l->m, l->in);
    void *buf = cpeft_alloc_temp(dt, rows * l->in, "dropped-x chunk", st);
    if (buf == NULL)
        return st->code;
    int rc = CPEFT_OK;
    for (int64_t row0 = 0; row0 < l->m && rc == CPEFT_OK; row0 += rows) {
        int64_t n = l->m - row0 < rows ? l->m - row0 : rows;
        cpeft_mat xd = cpeft_mat_compact(buf, n, l->in);
        cpeft_mat xa_rows = cpeft_mat_sub(dt, xa, row0, n, 0, l->r);
        cpeft_mat d_rows = cpeft_mat_sub(dt, d, row0, n, 0, l->out);
        cpeft_dropout_rows_cpu(dt, &l->dropout, row0, 1.0,
                               cpeft_mat_sub(dt, l->x, row0, n, 0, l->in), 0, xd);
        rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, xd, l->lora_a, 0.0, xa_rows, st);
        if (rc == CPEFT_OK)
            rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, xd, l->weight, 0.0, d_rows, st);
    }
    free(buf);
    return rc;
}

/*
 * Without dropout and without a kept u, with M > IN: c goes into copies of W (OUT x IN) and of
 * [s·B | b] (OUT x (R+1)) instead of a pass over y, so the GEMMs alone write
 * y = [xa | 1]·[s·(c ⊙ B) | b]ᵀ + x·(c ⊙ W)ᵀ.
 */
static int folded_forward(const cpeft_lora_linear_args *l, cpeft_mat xa, cpeft_vec c, cpeft_mat y,
                          cpeft_status *st)
{
    cpeft_dtype dt = l->dtype;
    size_t elt = cpeft_dtype_size(dt);
    int64_t k = l->r + (l->bias.data != NULL);
    char *buf = cpeft_alloc_temp(dt, l->out * l->in + l->out * k + l->m * k + l->out,
                                 "c-scaled W, [s·c ⊙ B | b], [xa | 1], s·c", st);
    if (buf == NULL)
        return st->code;
    cpeft_mat w_scaled = cpeft_mat_compact(buf, l->out, l->in);
    char *p = buf + (size_t)(l->out * l->in) * elt;
    cpeft_mat b_aug = cpeft_mat_compact(p, l->out, k);
    p += (size_t)(l->out * k) * elt;
    cpeft_mat xa_aug = cpeft_mat_compact(p, l->m, k);
    cpeft_vec s_c = {p + (size_t)(l->m * k) * elt, l->out, 1};
    cpeft_scaled_copy_cpu(dt, l->weight, c, 0, w_scaled);
    DORA_DISPATCH(dt, times_scalar, c, l->scale, s_c);
    cpeft_scaled_copy_cpu(dt, l->lora_b, s_c, 0, cpeft_mat_sub(dt, b_aug, 0, l->out, 0, l->r));
    DORA_DISPATCH(dt, copy, xa, cpeft_mat_sub(dt, xa_aug, 0, l->m, 0, l->r));
    if (l->bias.data != NULL) {
        double one64 = 1.0;
        float one32 = 1.0f;
        cpeft_vec one = {dt == CPEFT_FLOAT32 ? (void *)&one32 : (void *)&one64, 1, 1};
        cpeft_mat bias_col = {l->bias.data, l->out, 1, l->bias.stride, 1};
        cpeft_fill_rows_cpu(dt, cpeft_mat_sub(dt, xa_aug, 0, l->m, l->r, 1), one);
        DORA_DISPATCH(dt, copy, bias_col, cpeft_mat_sub(dt, b_aug, 0, l->out, l->r, 1));
    }
    int rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, xa_aug, b_aug, 0.0, y, st);
    if (rc == CPEFT_OK)
        rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, l->x, w_scaled, 1.0, y, st);
    free(buf);
    return rc;
}

int cpeft_dora_linear_fwd_cpu(const cpeft_dora_linear_args *a, const cpeft_dora_linear_fwd_out *o,
                              cpeft_status *st)
{
    const cpeft_lora_linear_args *l = &a->lora;
    int rc = cpeft_op_begin(l->dtype, "dora_linear_forward", st);
    if (rc != CPEFT_OK || (rc = check_plain(l, "dora_linear_forward", st)) != CPEFT_OK)
        return rc;
    cpeft_dtype dt = l->dtype;
    int dropout = l->dropout.p > 0.0;
    cpeft_dora_norm_args na = linear_norm_args(a);
    if ((rc = dora_norm(&na, o->norm, st)) != CPEFT_OK)
        return rc;
    cpeft_vec c, c_minus_one;
    void *scales = magnitude_scales(dt, a->magnitude, o->norm, &c, &c_minus_one, st);
    if (scales == NULL)
        return st->code;

    /* u goes to `base` when the caller keeps it; otherwise without dropout y itself holds u and
     * is scaled in place, and with dropout u needs a temporary (y also needs x·Wᵀ). */
    void *xa_temp = NULL, *u_temp = NULL;
    cpeft_mat xa = o->xa, u = o->base;
    if (xa.data == NULL) {
        xa_temp = cpeft_alloc_temp(dt, l->m * l->r, "xa", st);
        xa = cpeft_mat_compact(xa_temp, l->m, l->r);
    }
    if (u.data == NULL) {
        if (dropout) {
            u_temp = cpeft_alloc_temp(dt, l->m * l->out, "xd·Wᵀ", st);
            u = cpeft_mat_compact(u_temp, l->m, l->out);
        } else {
            u = o->y;
        }
    }
    if (xa.data == NULL || u.data == NULL) {
        rc = st->code;
    } else if (!dropout && o->base.data == NULL && l->m > l->in) {
        rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, l->x, l->lora_a, 0.0, xa, st);
        if (rc == CPEFT_OK)
            rc = folded_forward(l, xa, c, o->y, st);
    } else if (!dropout) {
        /* The rank-r term first, so the compute-bound base GEMM absorbs the read of u. */
        rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, l->x, l->lora_a, 0.0, xa, st);
        if (rc == CPEFT_OK)
            rc = cpeft_gemm_cpu(dt, 0, 1, l->scale, xa, l->lora_b, 0.0, u, st);
        if (rc == CPEFT_OK)
            rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, l->x, l->weight, 1.0, u, st);
        if (rc == CPEFT_OK)
            combine(dt, u, c, l->bias, o->y);
    } else {
        /* y = c ⊙ s·xa·Bᵀ + (c - 1) ⊙ xd·Wᵀ + bias, then x·Wᵀ accumulated by the base GEMM; u's
         * place holds xd·Wᵀ until the combining pass turns it into u. */
        rc = dropped_terms(l, xa, u, st);
        if (rc == CPEFT_OK)
            rc = cpeft_gemm_cpu(dt, 0, 1, l->scale, xa, l->lora_b, 0.0, o->y, st);
        if (rc == CPEFT_OK) {
            DORA_DISPATCH(dt, combine_dropped, u, c.data, c_minus_one.data, l->bias,
                          o->base.data != NULL, o->y);
            rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, l->x, l->weight, 1.0, o->y, st);
        }
    }
    free(u_temp);
    free(xa_temp);
    free(scales);
    return rc;
}

/*
 * g·(l ⊙ W) with l scaling the rows of W's (OUT, IN) view, as one of two operand pairs for the
 * GEMMs that follow: a scaled copy of W (when M >= IN) or of g (when M < IN), whichever is
 * smaller, so the extra pass is over min(M, IN)·OUT elements. *temp owns the copy.
 */
static int scaled_pair(cpeft_dtype dt, cpeft_mat g, cpeft_mat w, cpeft_vec l, cpeft_mat *g_use,
                       cpeft_mat *w_use, void **temp, cpeft_status *st)
{
    *g_use = g;
    *w_use = w;
    if (g.rows >= w.cols) {
        *temp = cpeft_alloc_temp(dt, w.rows * w.cols, "row-scaled W", st);
        if (*temp == NULL)
            return st->code;
        *w_use = cpeft_mat_compact(*temp, w.rows, w.cols);
        cpeft_scaled_copy_cpu(dt, w, l, 0, *w_use);
    } else {
        *temp = cpeft_alloc_temp(dt, g.rows * g.cols, "column-scaled g", st);
        if (*temp == NULL)
            return st->code;
        *g_use = cpeft_mat_compact(*temp, g.rows, g.cols);
        cpeft_scaled_copy_cpu(dt, g, l, 1, *g_use);
    }
    return CPEFT_OK;
}

/* grad_m (and grad_bias in the same pass over g) and grad_b. */
static int magnitude_b_bias_grads(const cpeft_dora_linear_args *a,
                                  const cpeft_dora_linear_bwd_in *in, cpeft_vec c,
                                  const cpeft_dora_linear_bwd_out *o, cpeft_status *st)
{
    const cpeft_lora_linear_args *l = &a->lora;
    cpeft_dtype dt = l->dtype;
    int want_m = o->grad_m.data != NULL, want_bias = o->grad_bias.data != NULL;
    int rc = CPEFT_OK;
    if (want_m) {
        double *acc = alloc_doubles(3 * l->out, "the grad_m and grad_bias sums", st);
        if (acc == NULL)
            return st->code;
        double *bias_sum = want_bias ? acc + l->out : NULL;
        double *norm = acc + 2 * l->out;
        DORA_DISPATCH(dt, column_dots, in->grad_out, in->base, acc, bias_sum);
        if (want_bias)
            DORA_DISPATCH(dt, store, bias_sum, o->grad_bias);
        DORA_DISPATCH(dt, load, in->norm, norm);
        for (int64_t j = 0; j < l->out; ++j)
            acc[j] /= norm[j];
        DORA_DISPATCH(dt, store, acc, o->grad_m);
        free(acc);
    } else if (want_bias) {
        rc = cpeft_colsum_cpu(dt, 1.0, in->grad_out, o->grad_bias, st);
    }
    if (rc == CPEFT_OK && o->grad_b.data != NULL) {
        rc = cpeft_gemm_cpu(dt, 1, 0, l->scale, in->grad_out, in->xa, 0.0, o->grad_b, st);
        /* An empty batch's gradient is an empty sum, 0 whatever c holds (0·inf = NaN). */
        if (rc == CPEFT_OK && l->m > 0)
            cpeft_scale_mat_cpu(dt, o->grad_b, c, 0);
    }
    return rc;
}

/* With dropout: grad_a = s·gbᵀ·xd and the dropped part of grad_x,
 * drop'(g·((c - 1) ⊙ W) + s·gb·A), a row chunk at a time (the mask is regenerated). */
static int dropped_input_grads(const cpeft_lora_linear_args *l, cpeft_mat g, cpeft_mat gb,
                               cpeft_vec c_minus_one, const cpeft_dora_linear_bwd_out *o,
                               cpeft_status *st)
{
    cpeft_dtype dt = l->dtype;
    int64_t rows = dropout_chunk_rows(dt, l->m, l->in);
    void *pair_temp = NULL;
    cpeft_mat g_use = g, w_use = l->weight;
    int rc = CPEFT_OK;
    if (o->grad_x.data != NULL)
        rc = scaled_pair(dt, g, l->weight, c_minus_one, &g_use, &w_use, &pair_temp, st);
    void *buf = rc == CPEFT_OK ? cpeft_alloc_temp(dt, rows * l->in, "dropout chunk", st) : NULL;
    if (buf == NULL) {
        free(pair_temp);
        return st->code;
    }
    /* One pass even when M == 0, so grad_a is still written (zeros) by the K == 0 GEMM. */
    for (int64_t row0 = 0; (row0 < l->m || row0 == 0) && rc == CPEFT_OK; row0 += rows) {
        int64_t n = l->m - row0 < rows ? l->m - row0 : rows;
        cpeft_mat gb_rows = cpeft_mat_sub(dt, gb, row0, n, 0, l->r);
        cpeft_mat tmp = cpeft_mat_compact(buf, n, l->in);
        if (o->grad_a.data != NULL) {
            cpeft_dropout_rows_cpu(dt, &l->dropout, row0, 1.0,
                                   cpeft_mat_sub(dt, l->x, row0, n, 0, l->in), 0, tmp);
            rc = cpeft_gemm_cpu(dt, 1, 0, l->scale, gb_rows, tmp, row0 == 0 ? 0.0 : 1.0, o->grad_a,
                                st);
        }
        if (o->grad_x.data != NULL && rc == CPEFT_OK && n > 0) {
            rc = cpeft_gemm_cpu(dt, 0, 0, l->scale, gb_rows, l->lora_a, 0.0, tmp, st);
            if (rc == CPEFT_OK)
                rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, cpeft_mat_sub(dt, g_use, row0, n, 0, l->out),
                                    w_use, 1.0, tmp, st);
            if (rc == CPEFT_OK)
                cpeft_dropout_rows_cpu(dt, &l->dropout, row0, 1.0, tmp, 0,
                                       cpeft_mat_sub(dt, o->grad_x, row0, n, 0, l->in));
        }
    }
    free(buf);
    free(pair_temp);
    return rc;
}

int cpeft_dora_linear_bwd_cpu(const cpeft_dora_linear_args *a, const cpeft_dora_linear_bwd_in *in,
                              const cpeft_dora_linear_bwd_out *o, cpeft_status *st)
{
    const cpeft_lora_linear_args *l = &a->lora;
    int rc = cpeft_op_begin(l->dtype, "dora_linear_backward", st);
    if (rc != CPEFT_OK || (rc = check_plain(l, "dora_linear_backward", st)) != CPEFT_OK)
        return rc;
    cpeft_dtype dt = l->dtype;
    cpeft_mat g = in->grad_out;
    cpeft_vec c, c_minus_one;
    void *scales = magnitude_scales(dt, a->magnitude, in->norm, &c, &c_minus_one, st);
    if (scales == NULL)
        return st->code;
    if ((rc = magnitude_b_bias_grads(a, in, c, o, st)) != CPEFT_OK ||
        (o->grad_x.data == NULL && o->grad_a.data == NULL)) {
        free(scales);
        return rc;
    }

    /* gb = g·(c ⊙ B) (M x R): B's rows scaled (OUT x R), not g. */
    void *gb_data = cpeft_alloc_temp(dt, l->m * l->r + l->out * l->r, "g·(c ⊙ B)", st);
    if (gb_data == NULL) {
        free(scales);
        return st->code;
    }
    cpeft_mat gb = cpeft_mat_compact(gb_data, l->m, l->r);
    cpeft_mat b_scaled = cpeft_mat_compact(
        (char *)gb_data + (size_t)(l->m * l->r) * cpeft_dtype_size(dt), l->out, l->r);
    cpeft_scaled_copy_cpu(dt, l->lora_b, c, 0, b_scaled);
    rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, g, b_scaled, 0.0, gb, st);

    if (rc == CPEFT_OK && l->dropout.p > 0.0) {
        rc = dropped_input_grads(l, g, gb, c_minus_one, o, st);
        if (rc == CPEFT_OK && o->grad_x.data != NULL)
            rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, g, l->weight, 1.0, o->grad_x, st);
    } else if (rc == CPEFT_OK) {
        if (o->grad_a.data != NULL)
            rc = cpeft_gemm_cpu(dt, 1, 0, l->scale, gb, l->x, 0.0, o->grad_a, st);
        if (rc == CPEFT_OK && o->grad_x.data != NULL) {
            /* The rank-r term first; the base GEMM g·(c ⊙ W) accumulates onto it. */
            void *pair_temp = NULL;
            cpeft_mat g_use, w_use;
            rc = cpeft_gemm_cpu(dt, 0, 0, l->scale, gb, l->lora_a, 0.0, o->grad_x, st);
            if (rc == CPEFT_OK)
                rc = scaled_pair(dt, g, l->weight, c, &g_use, &w_use, &pair_temp, st);
            if (rc == CPEFT_OK)
                rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, g_use, w_use, 1.0, o->grad_x, st);
            free(pair_temp);
        }
    }
    free(gb_data);
    free(scales);
    return rc;
}

/* ---- embedding ------------------------------------------------------------------------------ */

static const cpeft_vec no_scale = {NULL, 0, 1};

static cpeft_dora_norm_args embedding_norm_args(const cpeft_dora_embedding_args *a)
{
    const cpeft_lora_embedding_args *l = &a->lora;
    cpeft_dora_norm_args n = {
        l->dtype,  l->dim,   l->num_embeddings, l->r, cpeft_mat_transpose(l->weight), l->lora_a,
        l->lora_b, l->scale, a->weight_sq_norm};
    return n;
}

/* Aᵀ[idx] (N x R) into a new temporary. */
static void *gather_a_rows(const cpeft_lora_embedding_args *l, cpeft_mat *rows, cpeft_status *st)
{
    void *data = cpeft_alloc_temp(l->dtype, l->n * l->r, "Aᵀ[indices]", st);
    if (data == NULL)
        return NULL;
    *rows = cpeft_mat_compact(data, l->n, l->r);
    if (cpeft_gather_rows_cpu(l->dtype, l->index_dtype, l->indices, cpeft_mat_transpose(l->lora_a),
                              no_scale, *rows, st) != CPEFT_OK) {
        free(data);
        return NULL;
    }
    return data;
}

int cpeft_dora_embedding_fwd_cpu(const cpeft_dora_embedding_args *a, cpeft_mat y, cpeft_vec norm,
                                 cpeft_status *st)
{
    const cpeft_lora_embedding_args *l = &a->lora;
    int rc = cpeft_op_begin(l->dtype, "dora_embedding_forward", st);
    if (rc != CPEFT_OK ||
        (rc = cpeft_check_indices_cpu(l->index_dtype, l->indices, l->num_embeddings,
                                      "dora_embedding_forward", st)) != CPEFT_OK)
        return rc;
    cpeft_dtype dt = l->dtype;
    cpeft_dora_norm_args na = embedding_norm_args(a);
    if ((rc = dora_norm(&na, norm, st)) != CPEFT_OK)
        return rc;
    cpeft_vec c, c_minus_one;
    void *scales = magnitude_scales(dt, a->magnitude, norm, &c, &c_minus_one, st);
    if (scales == NULL)
        return st->code;
    /* y = W[idx] ⊙ c, then the rank-r term with B's rows scaled by s·c. */
    if ((rc = cpeft_gather_rows_cpu(dt, l->index_dtype, l->indices, l->weight, c, y, st)) !=
        CPEFT_OK) {
        free(scales);
        return rc;
    }
    cpeft_mat a_rows;
    void *a_rows_data = l->n > 0 ? gather_a_rows(l, &a_rows, st) : NULL;
    void *b_scaled_data = a_rows_data ? cpeft_alloc_temp(dt, l->dim * l->r, "c ⊙ B", st) : NULL;
    if (b_scaled_data != NULL) {
        cpeft_mat b_scaled = cpeft_mat_compact(b_scaled_data, l->dim, l->r);
        cpeft_scaled_copy_cpu(dt, l->lora_b, c, 0, b_scaled);
        rc = cpeft_gemm_cpu(dt, 0, 1, l->scale, a_rows, b_scaled, 1.0, y, st);
    } else if (l->n > 0) {
        rc = st->code;
    }
    free(b_scaled_data);
    free(a_rows_data);
    free(scales);
    return rc;
}

int cpeft_dora_embedding_bwd_cpu(const cpeft_dora_embedding_args *a, cpeft_mat grad_out,
                                 cpeft_vec norm, const cpeft_dora_embedding_bwd_out *o,
                                 cpeft_status *st)
{
    const cpeft_lora_embedding_args *l = &a->lora;
    int rc = cpeft_op_begin(l->dtype, "dora_embedding_backward", st);
    if (rc != CPEFT_OK ||
        (rc = cpeft_check_indices_cpu(l->index_dtype, l->indices, l->num_embeddings,
                                      "dora_embedding_backward", st)) != CPEFT_OK)
        return rc;
    cpeft_dtype dt = l->dtype;
    size_t elt = cpeft_dtype_size(dt);
    cpeft_mat g = grad_out;
    cpeft_vec c, c_minus_one;
    void *scales = magnitude_scales(dt, a->magnitude, norm, &c, &c_minus_one, st);
    /* One buffer: Aᵀ[idx] (N x R), t = gᵀ·Aᵀ[idx] (D x R), c ⊙ B (D x R), gb (N x R). */
    void *work = scales ? cpeft_alloc_temp(dt, 2 * l->n * l->r + 2 * l->dim * l->r,
                                           "DoRA embedding temporaries", st)
                        : NULL;
    double *acc = work ? alloc_doubles(l->dim, "the grad_m sums", st) : NULL;
    if (acc == NULL) {
        free(work);
        free(scales);
        return st->code;
    }
    char *p = work;
    cpeft_mat a_rows = cpeft_mat_compact(p, l->n, l->r);
    cpeft_mat t = cpeft_mat_compact(p += (size_t)(l->n * l->r) * elt, l->dim, l->r);
    cpeft_mat b_scaled = cpeft_mat_compact(p += (size_t)(l->dim * l->r) * elt, l->dim, l->r);
    cpeft_mat gb = cpeft_mat_compact(p + (size_t)(l->dim * l->r) * elt, l->n, l->r);
    rc = cpeft_gather_rows_cpu(dt, l->index_dtype, l->indices, cpeft_mat_transpose(l->lora_a),
                               no_scale, a_rows, st);

    if (rc == CPEFT_OK && (o->grad_m.data != NULL || o->grad_b.data != NULL))
        rc = cpeft_gemm_cpu(dt, 1, 0, 1.0, g, a_rows, 0.0, t, st);
    if (rc == CPEFT_OK && o->grad_m.data != NULL) {
        if (dt == CPEFT_FLOAT32) {
            rc = gather_dots_f32(g, l->index_dtype, l->indices, l->weight, acc, st);
            if (rc == CPEFT_OK)
                finish_magnitude_grad_f32(acc, t.data, l->lora_b, l->scale, norm, l->n);
        } else {
            rc = gather_dots_f64(g, l->index_dtype, l->indices, l->weight, acc, st);
            if (rc == CPEFT_OK)
                finish_magnitude_grad_f64(acc, t.data, l->lora_b, l->scale, norm, l->n);
        }
        if (rc == CPEFT_OK)
            DORA_DISPATCH(dt, store, acc, o->grad_m);
    }
    if (rc == CPEFT_OK && o->grad_b.data != NULL) {
        /* grad_b = (s·c) ⊙ t, the rows of t scaled by s·c (kept in c_minus_one's place, which
         * the embedding does not use). */
        DORA_DISPATCH(dt, times_scalar, c, l->scale, c_minus_one);
        if (l->n > 0)
            cpeft_scaled_copy_cpu(dt, t, c_minus_one, 0, o->grad_b);
        else /* an empty sum, 0 whatever c holds (0·inf = NaN) */
            cpeft_fill_zero_cpu(dt, o->grad_b);
    }
    if (rc == CPEFT_OK && o->grad_a.data != NULL) {
        cpeft_fill_zero_cpu(dt, o->grad_a);
        if (l->n > 0) {
            cpeft_scaled_copy_cpu(dt, l->lora_b, c, 0, b_scaled);
            rc = cpeft_gemm_cpu(dt, 0, 0, l->scale, g, b_scaled, 0.0, gb, st);
            if (rc == CPEFT_OK)
                rc = cpeft_scatter_add_rows_cpu(dt, l->index_dtype, l->indices, l->padding_idx, gb,
                                                no_scale, cpeft_mat_transpose(o->grad_a), st);
        }
    }
    free(acc);
    free(work);
    free(scales);
    return rc;
}
