/* LoRA linear (plain and grouped) on the CPU; contract in cpeft/lora_linear.h. */
#include "cpeft/lora_linear.h"

#include <stdlib.h>

#include "cpeft/views.h"
#include "blas.h"
#include "dropout_rows.h"
#include "op_setup.h"
#include "strided.h"

static int has_dropout(const cpeft_lora_linear_args *a) { return a->dropout.p > 0.0; }

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
        cpeft_dropout_rows_cpu(dt, &a->dropout, row0, 1.0,
                               cpeft_mat_sub(dt, a->x, row0, n, 0, a->in), 0, dropped);
        rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, dropped, a->lora_a, 0.0,
                            cpeft_mat_sub(dt, xa, row0, n, 0, xa.cols), st);
    }
    free(buf);
    return rc;
}

/* dst = alpha · src, element by element, for any strides. Indexed directly rather than through
 * cpeft_mat_at: a call per element made these rank-sized copies cost ~20 ns an element, about
 * 0.6 ms for one M x R copy at M = 2048, R = 16. */
static void copy_scaled(cpeft_dtype dt, cpeft_mat src, double alpha, cpeft_mat dst)
{
    if (dt == CPEFT_FLOAT32) {
        const float *s = (const float *)src.data;
        float *d = (float *)dst.data;
        for (int64_t i = 0; i < src.rows; ++i)
            for (int64_t j = 0; j < src.cols; ++j)
                d[i * dst.row_stride + j * dst.col_stride] =
                    (float)(alpha * s[i * src.row_stride + j * src.col_stride]);
    } else {
        const double *s = (const double *)src.data;
        double *d = (double *)dst.data;
        for (int64_t i = 0; i < src.rows; ++i)
            for (int64_t j = 0; j < src.cols; ++j)
                d[i * dst.row_stride + j * dst.col_stride] =
                    alpha * s[i * src.row_stride + j * src.col_stride];
    }
}

/* Whether dst = alpha · src (as copy_scaled wrote it) lost an element: a finite nonzero src
 * element whose scaled value is infinite or at the bottom of the exponent range (zero or
 * subnormal). Exponent bits only (float: 8 bits from bit 23, double: 11 bits from bit 52),
 * without branches, so the check vectorizes. */
static int scaling_lost_range_f32(cpeft_mat src, cpeft_mat dst)
{
    uint32_t lost = 0;
    for (int64_t i = 0; i < src.rows; ++i) {
        const uint32_t *s = (const uint32_t *)((const float *)src.data + i * src.row_stride);
        const uint32_t *d = (const uint32_t *)((const float *)dst.data + i * dst.row_stride);
        for (int64_t j = 0; j < src.cols; ++j) {
            uint32_t sb = s[j * src.col_stride], db = d[j * dst.col_stride];
            uint32_t se = (sb >> 23) & 0xFFu, de = (db >> 23) & 0xFFu;
            lost |= (uint32_t)(se != 0xFFu) & (uint32_t)((sb << 1) != 0) &
                    ((uint32_t)(de == 0xFFu) | (uint32_t)(de == 0));
        }
    }
    return lost != 0;
}

static int scaling_lost_range_f64(cpeft_mat src, cpeft_mat dst)
{
    uint64_t lost = 0;
    for (int64_t i = 0; i < src.rows; ++i) {
        const uint64_t *s = (const uint64_t *)((const double *)src.data + i * src.row_stride);
        const uint64_t *d = (const uint64_t *)((const double *)dst.data + i * dst.row_stride);
        for (int64_t j = 0; j < src.cols; ++j) {
            uint64_t sb = s[j * src.col_stride], db = d[j * dst.col_stride];
            uint64_t se = (sb >> 52) & 0x7FF, de = (db >> 52) & 0x7FF;
            lost |= (uint64_t)(se != 0x7FF) & (uint64_t)((sb << 1) != 0) &
                    ((uint64_t)(de == 0x7FF) | (uint64_t)(de == 0));
        }
    }
    return lost != 0;
}

static int scaling_lost_range(cpeft_dtype dt, cpeft_mat src, cpeft_mat dst)
{
    return dt == CPEFT_FLOAT32 ? scaling_lost_range_f32(src, dst)
                               : scaling_lost_range_f64(src, dst);
}

/* Column `col` of m set to 1: the bias column of an [xa | 1] operand, through which a GEMM also
 * adds a bias (forward) or sums g's columns (backward) without a pass of its own. */
static void fill_ones_column(cpeft_dtype dt, cpeft_mat m, int64_t col)
{
    double one64 = 1.0;
    float one32 = 1.0f;
    cpeft_vec one = {dt == CPEFT_FLOAT32 ? (void *)&one32 : (void *)&one64, 1, 1};
    cpeft_fill_rows_cpu(dt, cpeft_mat_sub(dt, m, 0, m.rows, col, 1), one);
}

/*
 * Writes y's adapter and bias terms (beta = 0) so that the base GEMM can then accumulate onto
 * them. The base GEMM is compute-bound and reads C while it computes, whereas a separate pass
 * over y (a bias fill, or a rank-r GEMM with beta = 1) is pure memory traffic. With a bias, an
 * enabled block is one GEMM over K = r + 1: [xa_k | 1]·[s·B_k | b_k]ᵀ; a disabled block gets
 * the bias (or zeros).
 *
 * s·B_k is an operand of its own there, and may overflow or underflow where s·xa_k·B_kᵀ does not
 * (s = 1e20, B = 1e20, xa = 1e-20 in float32), so its range is checked; where it was lost, the
 * block is the bias written first plus a GEMM with s in alpha and beta = 1. That check reads
 * SEG x R elements to save a pass over M x SEG, so batches of few rows (M < 4(R + 1)) take the
 * second form directly.
 */
static int write_adapter_terms(const cpeft_lora_linear_args *a, cpeft_mat xa, int64_t seg,
                               cpeft_mat y, cpeft_status *st)
{
    cpeft_dtype dt = a->dtype;
    int has_bias = a->bias.data != NULL;
    int fuse_bias = has_bias && a->m >= 4 * (a->r + 1);
    void *xa_aug_data = NULL, *b_aug_data = NULL;
    if (fuse_bias) {
        xa_aug_data = cpeft_alloc_temp(dt, a->m * (a->r + 1), "[xa_k | 1]", st);
        b_aug_data = xa_aug_data ? cpeft_alloc_temp(dt, seg * (a->r + 1), "[s·B_k | b_k]", st)
                                 : NULL;
        if (b_aug_data == NULL) {
            free(xa_aug_data);
            return st->code;
        }
    }
    cpeft_mat xa_aug = cpeft_mat_compact(xa_aug_data, a->m, a->r + 1);
    cpeft_mat b_aug = cpeft_mat_compact(b_aug_data, seg, a->r + 1);
    if (fuse_bias)
        fill_ones_column(dt, xa_aug, a->r);

    int rc = CPEFT_OK;
    for (int64_t g = 0, kk = 0; g < a->groups && rc == CPEFT_OK; ++g) {
        cpeft_mat y_block = cpeft_mat_sub(dt, y, 0, a->m, g * seg, seg);
        cpeft_vec b_block = {NULL, seg, a->bias.stride};
        if (has_bias)
            b_block.data = (char *)a->bias.data + g * seg * a->bias.stride * cpeft_dtype_size(dt);
        if (!a->enabled[g]) {
            if (has_bias)
                cpeft_fill_rows_cpu(dt, y_block, b_block);
            else
                cpeft_fill_zero_cpu(dt, y_block);
            continue;
        }
        cpeft_mat xa_k = cpeft_mat_sub(dt, xa, 0, a->m, kk * a->r, a->r);
        cpeft_mat b_k = cpeft_mat_sub(dt, a->lora_b, kk * seg, seg, 0, a->r);
        ++kk;
        if (fuse_bias) {
            cpeft_mat scaled_b = cpeft_mat_sub(dt, b_aug, 0, seg, 0, a->r);
            copy_scaled(dt, b_k, a->scale, scaled_b);
            if (a->scale == 1.0 || !scaling_lost_range(dt, b_k, scaled_b)) {
                cpeft_mat b_column = {b_block.data, seg, 1, b_block.stride, 1};
                copy_scaled(dt, xa_k, 1.0, cpeft_mat_sub(dt, xa_aug, 0, a->m, 0, a->r));
                copy_scaled(dt, b_column, 1.0, cpeft_mat_sub(dt, b_aug, 0, seg, a->r, 1));
                rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, xa_aug, b_aug, 0.0, y_block, st);
                continue;
            }
        }
        if (has_bias) {
            cpeft_fill_rows_cpu(dt, y_block, b_block);
            rc = cpeft_gemm_cpu(dt, 0, 1, a->scale, xa_k, b_k, 1.0, y_block, st);
        } else {
            rc = cpeft_gemm_cpu(dt, 0, 1, a->scale, xa_k, b_k, 0.0, y_block, st);
        }
    }
    free(xa_aug_data);
    free(b_aug_data);
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
    if ((rc = cpeft_lora_groups(a, &seg, &k, st)) != CPEFT_OK)
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
    if ((rc = compute_xa(a, xa, st)) == CPEFT_OK &&
        (rc = write_adapter_terms(a, xa, seg, o->y, st)) == CPEFT_OK)
        rc = cpeft_gemm_cpu(dt, 0, 1, 1.0, a->x, a->weight, 1.0, o->y, st);
    free(xa_temp);
    return rc;
}

/* grad_a = s · gbᵀ·drop(x) and grad_x = s · drop'(gb·A) (written, not added: the base GEMM adds
 * g·W afterwards), each in row chunks of x sharing one chunk buffer: the mask is regenerated per
 * chunk, never stored. */
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
                cpeft_dropout_rows_cpu(dt, &a->dropout, row0, a->scale, tmp, 0,
                                       cpeft_mat_sub(dt, o->grad_x, row0, n, 0, a->in));
        }
    }
    free(buf);
    return rc;
}

/*
 * grad_b_k = s · g_kᵀ·xa_k, and grad_bias from the same pass over g: per enabled block one GEMM
 * t = [xa_k | 1]ᵀ·g_k ((R + 1) x SEG), whose first R rows are grad_b_kᵀ / s and whose last row
 * is the column sum of g_k, so g is read once for both instead of once more by a column sum.
 * The product is taken in this transposed (R + 1) x SEG shape and copied out, because OpenBLAS
 * runs it faster than the SEG x R shape of grad_b: at M = 2048, 1024 -> 1024, R = 16 on two
 * cores, 1.2 ms against 1.9 ms for the SEG x R GEMM plus the column sum. Disabled blocks get
 * their column sums directly.
 */
static int lora_b_and_bias_grads(const cpeft_lora_linear_args *a,
                                 const cpeft_lora_linear_bwd_in *in, int64_t seg,
                                 const cpeft_lora_linear_bwd_out *o, cpeft_status *st)
{
    cpeft_dtype dt = a->dtype;
    int has_bias = o->grad_bias.data != NULL;
    int64_t kb = a->r + has_bias;
    void *xa_aug_data = cpeft_alloc_temp(dt, a->m * kb, "[xa_k | 1]", st);
    void *t_data = xa_aug_data ? cpeft_alloc_temp(dt, kb * seg, "[xa_k | 1]ᵀ·g_k", st) : NULL;
    if (t_data == NULL) {
        free(xa_aug_data);
        return st->code;
    }
    cpeft_mat xa_aug = cpeft_mat_compact(xa_aug_data, a->m, kb);
    cpeft_mat t = cpeft_mat_compact(t_data, kb, seg);
    /* t's first R rows read as SEG x R, the layout of grad_b_k. */
    cpeft_mat t_lora = {t_data, seg, a->r, 1, seg};
    if (has_bias)
        fill_ones_column(dt, xa_aug, a->r);

    int rc = CPEFT_OK;
    for (int64_t grp = 0, kk = 0; grp < a->groups && rc == CPEFT_OK; ++grp) {
        cpeft_mat g_block = cpeft_mat_sub(dt, in->grad_out, 0, a->m, grp * seg, seg);
        /* grad_bias's block as a 1 x SEG row. */
        cpeft_mat bias_row = {NULL, 1, seg, seg, o->grad_bias.stride};
        if (has_bias)
            bias_row.data = (char *)o->grad_bias.data +
                            grp * seg * o->grad_bias.stride * cpeft_dtype_size(dt);
        if (!a->enabled[grp]) {
            if (has_bias) {
                cpeft_vec bias_block = {bias_row.data, seg, o->grad_bias.stride};
                rc = cpeft_colsum_cpu(dt, 1.0, g_block, bias_block, st);
            }
            continue;
        }
        copy_scaled(dt, cpeft_mat_sub(dt, in->xa, 0, a->m, kk * a->r, a->r), 1.0,
                    cpeft_mat_sub(dt, xa_aug, 0, a->m, 0, a->r));
        rc = cpeft_gemm_cpu(dt, 1, 0, 1.0, xa_aug, g_block, 0.0, t, st);
        if (rc == CPEFT_OK) {
            copy_scaled(dt, t_lora, a->scale, cpeft_mat_sub(dt, o->grad_b, kk * seg, seg, 0, a->r));
            if (has_bias)
                copy_scaled(dt, cpeft_mat_sub(dt, t, a->r, 1, 0, seg), 1.0, bias_row);
        }
        ++kk;
    }
    free(xa_aug_data);
    free(t_data);
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
    if ((rc = cpeft_lora_groups(a, &seg, &k, st)) != CPEFT_OK)
        return rc;
    cpeft_mat g = in->grad_out;
    int64_t rk = a->r * k;

    if (o->grad_b.data != NULL)
        rc = lora_b_and_bias_grads(a, in, seg, o, st);
    else if (o->grad_bias.data != NULL)
        rc = cpeft_colsum_cpu(dt, 1.0, g, o->grad_bias, st);
    if (rc != CPEFT_OK)
        return rc;
    if (o->grad_weight.data != NULL &&
        (rc = cpeft_gemm_cpu(dt, 1, 0, 1.0, g, a->x, 0.0, o->grad_weight, st)) != CPEFT_OK)
        return rc;

    /* grad_x's LoRA term is written first and the base GEMM g·W accumulates onto it (beta = 1),
     * for the same reason as in forward: the compute-bound GEMM absorbs the read of grad_x. */
    double grad_x_beta = 0.0;
    if ((o->grad_x.data != NULL || o->grad_a.data != NULL) && rk > 0) {
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
                    rc = cpeft_gemm_cpu(dt, 0, 0, a->scale, gb, a->lora_a, 0.0, o->grad_x, st);
            }
        }
        free(gb_data);
        grad_x_beta = 1.0;
    }
    if (o->grad_x.data != NULL && rc == CPEFT_OK)
        rc = cpeft_gemm_cpu(dt, 0, 0, 1.0, g, a->weight, grad_x_beta, o->grad_x, st);
    return rc;
}
