/*
 * Merge and unmerge adapters into the frozen weight, in place, with an exact unmerge.
 *
 *   LoRA:  W_view ± s·B_k·A_k on each enabled block (W_view is W's (OUT, IN) view; an embedding
 *          weight (V, D) is merged as the (D, V) view with B (D, R) and A (R, V))
 *   IA3:   W ⊙ l along rows or columns; unmerge divides.
 *
 * Why a record: rounding makes W + Δ - Δ differ from W in the last bit for some elements, and
 * loralib and peft drift for that reason (100 bf16 eval/train cycles moved loralib's W by 4.9e-4).
 * Merge computes, for every element, merged = round(W + d) and the value unmerge will produce,
 * back = round(merged - d) (for IA3: round(W*l) and round(merged/l)), with d computed exactly as
 * unmerge will recompute it. Where back differs from W bit for bit, the element's linear index
 * (i*cols + j in the view) and its original value go into the record; unmerge writes them back
 * after the arithmetic. The record is empty for most elements (only where the merged value lost
 * low bits of W), so it is far smaller than a copy of W; its size is reported to the caller.
 * Exactness needs A, B (or l) unchanged between merge and unmerge; the layers unmerge before
 * they load new adapter weights.
 */
#ifndef CPEFT_MERGE_H
#define CPEFT_MERGE_H

#include "cpeft/core.h"
#include "cpeft/lora_linear.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t *index;     /* capacity entries; NULL with direction +1: count only, W untouched */
    void *value;        /* capacity entries of W's dtype */
    int64_t capacity;
    int64_t count;      /* merge: set to the number of exceptions; unmerge: entries to restore */
    /*
     * LoRA merges only (NULL otherwise): the caller's scratch for ΔW, OUT*IN elements of the
     * accumulation dtype (the weight's; float32 for float16 and bfloat16 on CUDA), laid out as
     * the merge chooses. A caller that allocates the record itself runs a count pass first; with
     * delta, that pass (delta_ready 0) keeps the ΔW its GEMMs produce and the passes that follow
     * (delta_ready 1) read it instead of running the GEMMs again. Merges are not a hot path, so
     * one W-sized temporary is accepted to run the GEMMs once. They are the GEMMs unmerge runs,
     * so the record stays exact as long as delta is left alone between the passes; it is the
     * caller's memory, and a changed delta still never makes a pass write outside the weight or
     * past the record's capacity.
     */
    void *delta;
    int delta_ready;
} cpeft_merge_record;

#define CPEFT_MERGE (+1)
#define CPEFT_UNMERGE (-1)

/* Uses a->dtype, in, out, r, groups, enabled, weight, lora_a, lora_b, scale; x is ignored. */
int cpeft_lora_merge_cpu(const cpeft_lora_linear_args *a, int direction, cpeft_merge_record *rec,
                         cpeft_status *st);
/* target (rows x cols) scaled by l along its columns (l has cols entries) when along_cols,
 * else along its rows (l has rows entries). A bias merges as a 1 x OUT target, along_cols. */
int cpeft_ia3_merge_cpu(cpeft_dtype dtype, cpeft_mat target, cpeft_vec l, int along_cols,
                        int direction, cpeft_merge_record *rec, cpeft_status *st);

/* CUDA twins. rec->index/value are device pointers; rec->count is read back to the host (merge
 * is not a per-call path, so this one device-to-host copy is accepted). */
int cpeft_lora_merge_cuda(const cpeft_lora_linear_args *a, int direction, cpeft_merge_record *rec,
                          void *stream, cpeft_status *st);
int cpeft_ia3_merge_cuda(cpeft_dtype dtype, cpeft_mat target, cpeft_vec l, int along_cols,
                         int direction, cpeft_merge_record *rec, void *stream, cpeft_status *st);

#ifdef __cplusplus
}
#endif
#endif /* CPEFT_MERGE_H */
