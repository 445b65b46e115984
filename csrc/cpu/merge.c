/* Merge / unmerge LoRA and IA3 adapters into a weight, with the exact-unmerge record of
 * cpeft/merge.h. */
#include "cpeft/merge.h"

#include <stdlib.h>
#include <string.h>

#include "cpeft/views.h"
#include "blas.h"
#include "op_setup.h"

/*
 * Per-call merge bookkeeping. Merge (+1) computes merged = round(W + d) and the value unmerge
 * will produce, back = round(merged - d); where back and W differ bit for bit (memcmp, so NaN
 * payloads and signed zeros count), W's original value goes into the record. Without a record
 * (index == NULL) merge only counts and leaves W alone. Unmerge (-1) writes round(W - d).
 */
typedef struct {
    int direction;
    int write;                  /* W is modified: unmerge, or merge with a record */
    cpeft_merge_record *rec;
    int64_t count;
    int overflow;               /* merge needed more entries than rec->capacity */
} merge_pass;

/* The element at target (i, j) is element lin_base + i*lin_row + j*lin_col of the logical view
 * the record indexes; the target may be that view or its transpose, whichever streams memory. */
typedef struct {
    int64_t base, row, col;
} linear_index;

#define T float
#define SUFFIX f32
#include "merge_loops.inc"
#undef T
#undef SUFFIX

#define T double
#define SUFFIX f64
#include "merge_loops.inc"
#undef T
#undef SUFFIX

/* Checks direction and record, and for unmerge every recorded index against the view before
 * anything is written. */
static int begin_pass(const char *op, int direction, cpeft_merge_record *rec, cpeft_mat view,
                      merge_pass *mp, cpeft_status *st)
{
    if (direction != CPEFT_MERGE && direction != CPEFT_UNMERGE)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "%s: direction must be +1 or -1, got %d", op,
                          direction);
    if (rec == NULL)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "%s: a merge record is required, got NULL", op);
    if (direction == CPEFT_UNMERGE && rec->delta != NULL)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "%s: unmerge computes its own ΔW, got a delta "
                          "scratch",
                          op);
    mp->direction = direction;
    mp->rec = rec;
    mp->count = 0;
    mp->overflow = 0;
    mp->write = direction == CPEFT_UNMERGE || rec->index != NULL;
    if (direction == CPEFT_UNMERGE) {
        if (rec->count < 0 || (rec->count > 0 && (rec->index == NULL || rec->value == NULL)))
            return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                              "%s: the record must hold count >= 0 entries with index and value "
                              "arrays, got count %lld",
                              op, (long long)rec->count);
        int64_t size = view.rows * view.cols;
        for (int64_t k = 0; k < rec->count; ++k)
            if (rec->index[k] < 0 || rec->index[k] >= size)
                return cpeft_fail(st, CPEFT_ERR_INDEX,
                                  "%s: record index[%lld] = %lld is outside the %lld x %lld "
                                  "weight view",
                                  op, (long long)k, (long long)rec->index[k], (long long)view.rows,
                                  (long long)view.cols);
    } else if (rec->index != NULL && rec->value == NULL) {
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "%s: record has an index array but no value "
                          "array",
                          op);
    }
    return CPEFT_OK;
}

static int end_pass(const char *op, cpeft_dtype dt, merge_pass *mp, cpeft_mat view,
                    cpeft_status *st)
{
    if (mp->direction == CPEFT_UNMERGE) {
        int64_t bad = dt == CPEFT_FLOAT32 ? restore_f32(mp->rec, view) : restore_f64(mp->rec, view);
        if (bad >= 0)
            return cpeft_fail(st, CPEFT_ERR_INDEX,
                              "%s: record index[%lld] is outside the %lld x %lld weight view "
                              "(it was changed during the call); the weight is partially "
                              "restored",
                              op, (long long)bad, (long long)view.rows, (long long)view.cols);
        return CPEFT_OK;
    }
    if (mp->overflow)
        return cpeft_fail(st, CPEFT_ERR_CHANGED,
                          "%s: the record's capacity %lld (the count pass) is smaller than the "
                          "number of elements to record: the weight changed during the call "
                          "(written by another thread?) and is now partially merged",
                          op, (long long)mp->rec->capacity);
    mp->rec->count = mp->count;
    return CPEFT_OK;
}

/* Is the view stored with its rows contiguous? Otherwise it is handled through its transpose. */
static int rows_contiguous(cpeft_mat m) { return m.col_stride == 1 || m.cols <= 1; }

int cpeft_lora_merge_cpu(const cpeft_lora_linear_args *a, int direction, cpeft_merge_record *rec,
                         cpeft_status *st)
{
    static const char op[] = "lora_merge";
    int rc = cpeft_op_begin(a->dtype, op, st);
    if (rc != CPEFT_OK)
        return rc;
    cpeft_dtype dt = a->dtype;
    int64_t seg, k;
    if ((rc = cpeft_lora_groups(a, &seg, &k, st)) != CPEFT_OK)
        return rc;
    merge_pass mp;
    if ((rc = begin_pass(op, direction, rec, a->weight, &mp, st)) != CPEFT_OK)
        return rc;

    /*
     * Δ_k = s·B_k·A_k is built a row chunk at a time (never OUT x IN at once). For a weight whose
     * (OUT, IN) view is column-major (fan_in_fan_out, embeddings) the chunks are rows of the
     * transposed problem Δ_kᵀ = s·A_kᵀ·B_kᵀ, so the elementwise pass streams through W. Merge
     * and unmerge run this same sequence of GEMMs, so d is bit-identical in both directions.
     * With the caller's ΔW scratch (rec->delta) every chunk has its own place there (output
     * group g's Δ (or Δᵀ) compact from g·seg·IN on), and a pass with delta_ready reads it back
     * instead of running the GEMMs.
     */
    int transpose = !rows_contiguous(a->weight);
    int64_t target_rows = transpose ? a->in : seg;
    int64_t target_cols = transpose ? seg : a->in;
    int64_t chunk = cpeft_chunk_rows(dt, target_cols);
    if (chunk > target_rows)
        chunk = target_rows > 0 ? target_rows : 1;
    size_t elt = cpeft_dtype_size(dt);
    int run_gemms = rec->delta == NULL || !rec->delta_ready;
    void *d_data = NULL;
    if (rec->delta == NULL &&
        (d_data = cpeft_alloc_temp(dt, chunk * target_cols, "merge delta chunk", st)) == NULL)
        return st->code;

    for (int64_t grp = 0, kk = 0; grp < a->groups && rc == CPEFT_OK && !mp.overflow; ++grp) {
        if (!a->enabled[grp])
            continue;
        cpeft_mat a_k = cpeft_mat_sub(dt, a->lora_a, kk * a->r, a->r, 0, a->in);
        cpeft_mat b_k = cpeft_mat_sub(dt, a->lora_b, kk * seg, seg, 0, a->r);
        cpeft_mat w_k = cpeft_mat_sub(dt, a->weight, grp * seg, seg, 0, a->in);
        cpeft_mat left = transpose ? cpeft_mat_transpose(a_k) : b_k;
        cpeft_mat right = transpose ? cpeft_mat_transpose(b_k) : a_k;
        cpeft_mat target = transpose ? cpeft_mat_transpose(w_k) : w_k;
        ++kk;
        for (int64_t row0 = 0; row0 < target_rows && rc == CPEFT_OK && !mp.overflow;
             row0 += chunk) {
            int64_t n = target_rows - row0 < chunk ? target_rows - row0 : chunk;
            void *d_place = rec->delta == NULL
                                ? d_data
                                : (char *)rec->delta +
                                      (size_t)(grp * seg * a->in + row0 * target_cols) * elt;
            cpeft_mat d = cpeft_mat_compact(d_place, n, target_cols);
            if (run_gemms) {
                rc = cpeft_gemm_cpu(dt, 0, 0, a->scale, cpeft_mat_sub(dt, left, row0, n, 0, a->r),
                                    right, 0.0, d, st);
                if (rc != CPEFT_OK)
                    break;
            }
            cpeft_mat part = cpeft_mat_sub(dt, target, row0, n, 0, target_cols);
            linear_index li = transpose ? (linear_index){grp * seg * a->in + row0, 1, a->in}
                                        : (linear_index){(grp * seg + row0) * a->in, a->in, 1};
            if (dt == CPEFT_FLOAT32)
                apply_delta_f32(&mp, part, (const float *)d.data, li);
            else
                apply_delta_f64(&mp, part, (const double *)d.data, li);
        }
    }
    free(d_data);
    if (rc != CPEFT_OK)
        return rc;
    return end_pass(op, dt, &mp, a->weight, st);
}

int cpeft_ia3_merge_cpu(cpeft_dtype dtype, cpeft_mat target, cpeft_vec l, int along_cols,
                        int direction, cpeft_merge_record *rec, cpeft_status *st)
{
    static const char op[] = "ia3_merge";
    int rc = cpeft_op_begin(dtype, op, st);
    if (rc != CPEFT_OK)
        return rc;
    merge_pass mp;
    if ((rc = begin_pass(op, direction, rec, target, &mp, st)) != CPEFT_OK)
        return rc;
    cpeft_mat walk = target;
    linear_index li = {0, target.cols, 1};
    if (!rows_contiguous(target)) {
        walk = cpeft_mat_transpose(target);
        along_cols = !along_cols;
        li = (linear_index){0, 1, target.cols};
    }
    if (dtype == CPEFT_FLOAT32)
        apply_scale_f32(&mp, walk, l, along_cols, li);
    else
        apply_scale_f64(&mp, walk, l, along_cols, li);
    return end_pass(op, dtype, &mp, target, st);
}
