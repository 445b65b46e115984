/* IA3 linear (output and input scaling) and IA3 embedding on the CPU; contract in cpeft/ia3.h. */
#include "cpeft/ia3.h"

#include <stdlib.h>

#include "cpeft/views.h"
#include "blas.h"
#include "gather.h"
#include "op_setup.h"
#include "strided.h"

static const cpeft_vec no_scale = {NULL, 0, 1};

#define T float
#define SUFFIX f32
#include "ia3_loops.inc"
#undef T
#undef SUFFIX

#define T double
#define SUFFIX f64
#include "ia3_loops.inc"
#undef T
#undef SUFFIX

static int accumulate_products(cpeft_dtype dt, cpeft_mat a, cpeft_mat b, cpeft_dtype index_dtype,
                               cpeft_vec indices, double *acc, cpeft_status *st)
{
    int64_t bad = 0;
    int64_t at = dt == CPEFT_FLOAT32
                     ? accumulate_products_f32(a, b, index_dtype, indices, acc, &bad)
                     : accumulate_products_f64(a, b, index_dtype, indices, acc, &bad);
    return at < 0 ? CPEFT_OK : cpeft_index_error(at, bad, b.rows, st);
}

static void store_accumulator(cpeft_dtype dt, const double *acc, cpeft_vec out)
{
    if (dt == CPEFT_FLOAT32)
        store_f32(acc, out);
    else
        store_f64(acc, out);
}

static double *alloc_accumulator(int64_t len, const char *what, cpeft_status *st)
{
    double *acc = calloc((size_t)(len > 0 ? len : 1), sizeof(double));
    if (acc == NULL)
        cpeft_fail(st, CPEFT_ERR_NOMEM, "could not allocate the %s accumulator (%lld doubles)",
                   what, (long long)len);
    return acc;
}

/* y (or base) = x·Wᵀ + b, the bias written first so the GEMM accumulates onto it. */
static int linear_with_bias(cpeft_dtype dt, cpeft_mat x, cpeft_mat w, cpeft_vec bias, cpeft_mat y,
                            cpeft_status *st)
{
    double beta = 0.0;
    if (bias.data != NULL) {
        cpeft_fill_rows_cpu(dt, y, bias);
        beta = 1.0;
    }
    return cpeft_gemm_cpu(dt, 0, 1, 1.0, x, w, beta, y, st);
}

/* y = (x·Wᵀ + b) ⊙ l. The scale goes into whichever is smaller: y itself (M <= IN) or a scaled
 * copy of W (OUT x IN) with a scaled bias, so the extra pass is over min(M, IN)·OUT elements. */
static int ia3_output_scaling_fwd(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_fwd_out *o,
                                  cpeft_status *st)
{
    cpeft_dtype dt = a->dtype;
    int rc;
    if (o->base.data != NULL) {
        if ((rc = linear_with_bias(dt, a->x, a->weight, a->bias, o->base, st)) != CPEFT_OK)
            return rc;
        cpeft_scaled_copy_cpu(dt, o->base, a->l, 1, o->y);
        return CPEFT_OK;
    }
    if (a->m <= a->in) {
        if ((rc = linear_with_bias(dt, a->x, a->weight, a->bias, o->y, st)) != CPEFT_OK)
            return rc;
        cpeft_scale_mat_cpu(dt, o->y, a->l, 1);
        return CPEFT_OK;
    }
    int64_t bias_len = a->bias.data != NULL ? a->out : 0;
    void *ws_data = cpeft_alloc_temp(dt, a->out * a->in + bias_len, "l-scaled weight", st);
    if (ws_data == NULL)
        return st->code;
    cpeft_mat ws = cpeft_mat_compact(ws_data, a->out, a->in);
    cpeft_scaled_copy_cpu(dt, a->weight, a->l, 0, ws);
    cpeft_vec scaled_bias = no_scale;
    if (a->bias.data != NULL) {
        scaled_bias.data = (char *)ws_data + (size_t)(a->out * a->in) * cpeft_dtype_size(dt);
        scaled_bias.len = a->out;
        cpeft_mat bias_row = {a->bias.data, 1, a->out, a->out, a->out <= 1 ? 1 : a->bias.stride};
        cpeft_scaled_copy_cpu(dt, bias_row, a->l, 1,
                              cpeft_mat_compact(scaled_bias.data, 1, a->out));
    }
    rc = linear_with_bias(dt, a->x, ws, scaled_bias, o->y, st);
    free(ws_data);
    return rc;
}

/* y = (x ⊙ l)·Wᵀ + b with l folded into the smaller of x (M x IN) and W (OUT x IN). */
static int ia3_input_scaling_fwd(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_fwd_out *o,
                                 cpeft_status *st)
{
    cpeft_dtype dt = a->dtype;
    int scale_x = a->m <= a->out;
    cpeft_mat src = scale_x ? a->x : a->weight;
    void *scaled_data = cpeft_alloc_temp(dt, src.rows * src.cols,
                                         scale_x ? "l-scaled x" : "l-scaled weight", st);
    if (scaled_data == NULL)
        return st->code;
    cpeft_mat scaled = cpeft_mat_compact(scaled_data, src.rows, src.cols);
    cpeft_scaled_copy_cpu(dt, src, a->l, 1, scaled);
    int rc = linear_with_bias(dt, scale_x ? scaled : a->x, scale_x ? a->weight : scaled, a->bias,
                              o->y, st);
    free(scaled_data);
    return rc;
}

int cpeft_ia3_linear_fwd_cpu(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_fwd_out *o,
                             cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "ia3_linear_forward", st);
    if (rc != CPEFT_OK)
        return rc;
    return a->feedforward ? ia3_input_scaling_fwd(a, o, st) : ia3_output_scaling_fwd(a, o, st);
}

/* gl = g ⊙ l;  grad_x = gl·W;  grad_weight = glᵀ·x;  grad_bias = l ⊙ Σ_rows g;
 * grad_l = Σ_rows g ⊙ base. */
static int ia3_output_scaling_bwd(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_bwd_in *in,
                                  const cpeft_ia3_linear_bwd_out *o, cpeft_status *st)
{
    cpeft_dtype dt = a->dtype;
    cpeft_mat g = in->grad_out;
    int rc = CPEFT_OK;
    if (o->grad_l.data != NULL) {
        if (in->base.data == NULL)
            return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                              "ia3_linear_backward: grad_l with output scaling needs the base "
                              "output kept by forward, got none");
        double *acc = alloc_accumulator(a->out, "grad_l", st);
        if (acc == NULL)
            return st->code;
        rc = accumulate_products(dt, g, in->base, CPEFT_INT64, no_scale, acc, st);
        if (rc == CPEFT_OK)
            store_accumulator(dt, acc, o->grad_l);
        free(acc);
        if (rc != CPEFT_OK)
            return rc;
    }
    if (o->grad_bias.data != NULL) {
        if ((rc = cpeft_colsum_cpu(dt, 1.0, g, o->grad_bias, st)) != CPEFT_OK)
            return rc;
        /* l scales the sum, not each term: an empty batch must stay an exact 0 even for an
         * infinite l, as torch's sum of no terms is. */
        if (a->m > 0)
            cpeft_scale_vec_cpu(dt, o->grad_bias, a->l);
    }
    if (o->grad_x.data == NULL && o->grad_weight.data == NULL)
        return CPEFT_OK;

    if (a->m <= a->in) {
        /* gl (M x OUT) is no larger than W: build it once and use it for both products. */
        void *gl_data = cpeft_alloc_temp(dt, a->m * a->out, "g ⊙ l", st);
        if (gl_data == NULL)
            return st->code;
        cpeft_mat gl = cpeft_mat_compact(gl_data, a->m, a->out);
        cpeft_scaled_copy_cpu(dt, g, a->l, 1, gl);
        if (o->grad_x.data != NULL)
            rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, gl, a->weight, 0.0, o->grad_x, st);
        if (o->grad_weight.data != NULL && rc == CPEFT_OK)
            rc = cpeft_gemm_cpu(dt, 1, 0, 1.0, gl, a->x, 0.0, o->grad_weight, st);
        free(gl_data);
        return rc;
    }
    if (o->grad_weight.data != NULL) {
        if ((rc = cpeft_gemm_cpu(dt, 1, 0, 1.0, g, a->x, 0.0, o->grad_weight, st)) != CPEFT_OK)
            return rc;
        cpeft_scale_mat_cpu(dt, o->grad_weight, a->l, 0);
    }
    if (o->grad_x.data != NULL) {
        void *ws_data = cpeft_alloc_temp(dt, a->out * a->in, "l-scaled weight", st);
        if (ws_data == NULL)
            return st->code;
        cpeft_mat ws = cpeft_mat_compact(ws_data, a->out, a->in);
        cpeft_scaled_copy_cpu(dt, a->weight, a->l, 0, ws);
        rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, g, ws, 0.0, o->grad_x, st);
        free(ws_data);
    }
    return rc;
}

/* gw = g·W;  grad_l = Σ_rows x ⊙ gw;  grad_x = gw ⊙ l;  grad_bias = Σ_rows g;
 * grad_weight = gᵀ·(x ⊙ l) = (gᵀ·x) with columns scaled by l. */
static int ia3_input_scaling_bwd(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_bwd_in *in,
                                 const cpeft_ia3_linear_bwd_out *o, cpeft_status *st)
{
    cpeft_dtype dt = a->dtype;
    cpeft_mat g = in->grad_out;
    int rc;
    if (o->grad_bias.data != NULL &&
        (rc = cpeft_colsum_cpu(dt, 1.0, g, o->grad_bias, st)) != CPEFT_OK)
        return rc;
    if (o->grad_weight.data != NULL) {
        if ((rc = cpeft_gemm_cpu(dt, 1, 0, 1.0, g, a->x, 0.0, o->grad_weight, st)) != CPEFT_OK)
            return rc;
        if (a->m > 0)   /* an empty batch's gradient stays 0 even for an infinite l */
            cpeft_scale_mat_cpu(dt, o->grad_weight, a->l, 1);
    }
    double *acc = NULL;
    if (o->grad_l.data != NULL && (acc = alloc_accumulator(a->in, "grad_l", st)) == NULL)
        return st->code;
    rc = CPEFT_OK;
    if (o->grad_x.data != NULL) {
        /* gw is built in grad_x itself, read for grad_l, then scaled in place. */
        rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, g, a->weight, 0.0, o->grad_x, st);
        if (rc == CPEFT_OK) {
            if (acc != NULL)
                rc = accumulate_products(dt, a->x, o->grad_x, CPEFT_INT64, no_scale, acc, st);
            cpeft_scale_mat_cpu(dt, o->grad_x, a->l, 1);
        }
    } else if (acc != NULL && a->m > 0) {
        /* Only grad_l needs gw: build it a row chunk at a time instead of an x-sized buffer. */
        int64_t chunk = cpeft_chunk_rows(dt, a->in);
        if (chunk > a->m)
            chunk = a->m;
        void *gw_data = cpeft_alloc_temp(dt, chunk * a->in, "g·W chunk", st);
        if (gw_data == NULL) {
            free(acc);
            return st->code;
        }
        for (int64_t row0 = 0; row0 < a->m && rc == CPEFT_OK; row0 += chunk) {
            int64_t n = a->m - row0 < chunk ? a->m - row0 : chunk;
            cpeft_mat gw = cpeft_mat_compact(gw_data, n, a->in);
            rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, cpeft_mat_sub(dt, g, row0, n, 0, a->out), a->weight,
                                0.0, gw, st);
            if (rc == CPEFT_OK)
                rc = accumulate_products(dt, cpeft_mat_sub(dt, a->x, row0, n, 0, a->in), gw,
                                         CPEFT_INT64, no_scale, acc, st);
        }
        free(gw_data);
    }
    if (acc != NULL) {
        if (rc == CPEFT_OK)
            store_accumulator(dt, acc, o->grad_l);
        free(acc);
    }
    return rc;
}

int cpeft_ia3_linear_bwd_cpu(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_bwd_in *in,
                             const cpeft_ia3_linear_bwd_out *o, cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "ia3_linear_backward", st);
    if (rc != CPEFT_OK)
        return rc;
    return a->feedforward ? ia3_input_scaling_bwd(a, in, o, st)
                          : ia3_output_scaling_bwd(a, in, o, st);
}

int cpeft_ia3_embedding_fwd_cpu(const cpeft_ia3_embedding_args *a, cpeft_mat y, cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "ia3_embedding_forward", st);
    if (rc != CPEFT_OK)
        return rc;
    if ((rc = cpeft_check_indices_cpu(a->index_dtype, a->indices, a->num_embeddings,
                                      "ia3_embedding_forward", st)) != CPEFT_OK)
        return rc;
    return cpeft_gather_rows_cpu(a->dtype, a->index_dtype, a->indices, a->weight, a->l, y, st);
}

int cpeft_ia3_embedding_bwd_cpu(const cpeft_ia3_embedding_args *a, cpeft_mat grad_out,
                                const cpeft_ia3_embedding_bwd_out *o, cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "ia3_embedding_backward", st);
    if (rc != CPEFT_OK)
        return rc;
    if ((rc = cpeft_check_indices_cpu(a->index_dtype, a->indices, a->num_embeddings,
                                      "ia3_embedding_backward", st)) != CPEFT_OK)
        return rc;
    cpeft_dtype dt = a->dtype;
    if (o->grad_l.data != NULL) {
        double *acc = alloc_accumulator(a->dim, "grad_l", st);
        if (acc == NULL)
            return st->code;
        rc = accumulate_products(dt, grad_out, a->weight, a->index_dtype, a->indices, acc, st);
        if (rc == CPEFT_OK)
            store_accumulator(dt, acc, o->grad_l);
        free(acc);
        if (rc != CPEFT_OK)
            return rc;
    }
    if (o->grad_weight.data != NULL) {
        cpeft_fill_zero_cpu(dt, o->grad_weight);
        return cpeft_scatter_add_rows_cpu(dt, a->index_dtype, a->indices, a->padding_idx, grad_out,
                                          a->l, o->grad_weight, st);
    }
    return CPEFT_OK;
}
