/* LoRA embedding on the CPU; contract in cpeft/lora_embedding.h. */
#include "cpeft/lora_embedding.h"

#include <stdlib.h>

#include "cpeft/views.h"
#include "blas.h"
#include "gather.h"
#include "op_setup.h"
#include "strided.h"

static const cpeft_vec no_scale = {NULL, 0, 1};

/* Aᵀ[idx] (N x R): the rank-sized rows the LoRA term needs, so the product with B is one GEMM
 * instead of N rank-R dot products per output row. */
static void *gather_a_columns(const cpeft_lora_embedding_args *a, cpeft_mat *out, cpeft_status *st)
{
    void *data = cpeft_alloc_temp(a->dtype, a->n * a->r, "Aᵀ[indices]", st);
    if (data == NULL)
        return NULL;
    *out = cpeft_mat_compact(data, a->n, a->r);
    if (cpeft_gather_rows_cpu(a->dtype, a->index_dtype, a->indices, cpeft_mat_transpose(a->lora_a),
                              no_scale, *out, st) != CPEFT_OK) {
        free(data);
        return NULL;
    }
    return data;
}

int cpeft_lora_embedding_fwd_cpu(const cpeft_lora_embedding_args *a, cpeft_mat y, cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "lora_embedding_forward", st);
    if (rc != CPEFT_OK)
        return rc;
    if ((rc = cpeft_check_indices_cpu(a->index_dtype, a->indices, a->num_embeddings,
                                      "lora_embedding_forward", st)) != CPEFT_OK ||
        (rc = cpeft_gather_rows_cpu(a->dtype, a->index_dtype, a->indices, a->weight, no_scale, y,
                                    st)) != CPEFT_OK)
        return rc;
    if (a->r == 0 || a->n == 0)
        return CPEFT_OK;
    cpeft_mat a_rows;
    void *a_rows_data = gather_a_columns(a, &a_rows, st);
    if (a_rows_data == NULL)
        return st->code;
    rc = cpeft_gemm_cpu(a->dtype, 0, 1, a->scale, a_rows, a->lora_b, 1.0, y, st);
    free(a_rows_data);
    return rc;
}

int cpeft_lora_embedding_bwd_cpu(const cpeft_lora_embedding_args *a,
                                 const cpeft_lora_embedding_bwd_in *in,
                                 const cpeft_lora_embedding_bwd_out *o, cpeft_status *st)
{
    int rc = cpeft_op_begin(a->dtype, "lora_embedding_backward", st);
    if (rc != CPEFT_OK)
        return rc;
    if ((rc = cpeft_check_indices_cpu(a->index_dtype, a->indices, a->num_embeddings,
                                      "lora_embedding_backward", st)) != CPEFT_OK)
        return rc;
    cpeft_dtype dt = a->dtype;
    cpeft_mat g = in->grad_out;

    if (o->grad_weight.data != NULL) {
        cpeft_fill_zero_cpu(dt, o->grad_weight);
        if ((rc = cpeft_scatter_add_rows_cpu(dt, a->index_dtype, a->indices, a->padding_idx, g,
                                             no_scale, o->grad_weight, st)) != CPEFT_OK)
            return rc;
    }
    if (o->grad_b.data != NULL) {
        /* grad_b = s · gᵀ·Aᵀ[idx]; with N == 0 the K == 0 GEMM writes zeros. */
        cpeft_mat a_rows = cpeft_mat_compact(NULL, a->n, a->r);
        void *a_rows_data = NULL;
        if (a->n > 0 && a->r > 0) {
            a_rows_data = gather_a_columns(a, &a_rows, st);
            if (a_rows_data == NULL)
                return st->code;
        }
        rc = cpeft_gemm_cpu(dt, 1, 0, a->scale, g, a_rows, 0.0, o->grad_b, st);
        free(a_rows_data);
        if (rc != CPEFT_OK)
            return rc;
    }
    if (o->grad_a.data != NULL) {
        /* grad_a[:, idx[n]] += s · (g[n]·B)ᵀ: the N x R product first (scale in alpha), then a
         * scatter into the columns of grad_a, i.e. the rows of its transposed view. */
        cpeft_fill_zero_cpu(dt, o->grad_a);
        if (a->n == 0 || a->r == 0)
            return CPEFT_OK;
        void *gb_data = cpeft_alloc_temp(dt, a->n * a->r, "g·B", st);
        if (gb_data == NULL)
            return st->code;
        cpeft_mat gb = cpeft_mat_compact(gb_data, a->n, a->r);
        rc = cpeft_gemm_cpu(dt, 0, 0, a->scale, g, a->lora_b, 0.0, gb, st);
        if (rc == CPEFT_OK)
            rc = cpeft_scatter_add_rows_cpu(dt, a->index_dtype, a->indices, a->padding_idx, gb,
                                            no_scale, cpeft_mat_transpose(o->grad_a), st);
        free(gb_data);
    }
    return rc;
}
