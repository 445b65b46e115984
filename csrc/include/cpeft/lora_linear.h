/*
 * LoRA linear, plain (loralib Linear) and grouped (loralib MergedLinear), forward and backward.
 *
 *   y  = x·Wᵀ + b + s · scatter_K( xa_k · B_kᵀ )        xa = drop(x)·Aᵀ   (M x R*K)
 *
 * Shapes: x (M, IN); weight viewed as (OUT, IN) whatever its storage (fan_in_fan_out stores it as
 * (IN, OUT): the boundary swaps the strides, nothing is copied); bias (OUT) or absent;
 * lora_a (R*K, IN); lora_b (SEG*K, R) where SEG = OUT/G. The output is cut into G contiguous
 * blocks of SEG rows; block g carries an adapter when enabled[g], and the k-th enabled block uses
 * rows [k*R, (k+1)*R) of lora_a and rows [k*SEG, (k+1)*SEG) of lora_b. A plain LoRA linear is
 * G = 1, enabled = {1}. No dense ΔW is ever built: every LoRA product is rank R.
 *
 * xa (M x R*K, unscaled) is the only activation the op keeps for backward besides x itself, which
 * the caller keeps by reference; the dropout mask is regenerated from (seed, offset).
 *
 * Backward, with gb = g_blocks·B (M x R*K):
 *   grad_b_k = s · g_kᵀ·xa_k        grad_a = s · gbᵀ·drop(x)
 *   grad_x   = g·W + s · drop'(gb·A)  (drop' applies the same mask and 1/(1-p))
 *   grad_bias = Σ_rows g            grad_weight = gᵀ·x  (in W's (OUT, IN) view)
 */
#ifndef CPEFT_LORA_LINEAR_H
#define CPEFT_LORA_LINEAR_H

#include "cpeft/core.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CPEFT_MAX_GROUPS 64

typedef struct {
    cpeft_dtype dtype;          /* of every float tensor below */
    int64_t m, in, out, r;
    int64_t groups;             /* G >= 1, divides OUT */
    uint8_t enabled[CPEFT_MAX_GROUPS]; /* enabled[g] != 0: block g has an adapter; K = count */
    cpeft_mat x;                /* M x IN */
    cpeft_mat weight;           /* OUT x IN view */
    cpeft_vec bias;             /* OUT, or data == NULL */
    cpeft_mat lora_a;           /* R*K x IN */
    cpeft_mat lora_b;           /* SEG*K x R */
    double scale;               /* s = lora_alpha / r (finite) */
    cpeft_dropout dropout;
    /* 0: lora_a, lora_b, grad_a and grad_b have `dtype`. 1 (CUDA only, dtype float16 or
     * bfloat16): they are float32 (peft's autocast_adapter_dtype master weights). The products
     * then read copies of A and B rounded to `dtype` (R*K x IN and SEG*K x R elements, never
     * anything of x's size), accumulate in fp32, and write grad_a / grad_b in fp32 straight from
     * the accumulators; x and g are never widened. xa keeps `dtype`. */
    int fp32_adapters;
} cpeft_lora_linear_args;

typedef struct {
    cpeft_mat y;                /* M x OUT, written */
    cpeft_mat xa;               /* M x R*K, written (kept by the caller for backward) */
} cpeft_lora_linear_fwd_out;

typedef struct {
    cpeft_mat grad_out;         /* M x OUT */
    cpeft_mat xa;               /* M x R*K, from forward */
} cpeft_lora_linear_bwd_in;

typedef struct {                /* each: data == NULL when not requested */
    cpeft_mat grad_x;           /* M x IN */
    cpeft_mat grad_a;           /* R*K x IN */
    cpeft_mat grad_b;           /* SEG*K x R */
    cpeft_vec grad_bias;        /* OUT */
    cpeft_mat grad_weight;      /* OUT x IN view of W's storage */
} cpeft_lora_linear_bwd_out;

/* The grouping rule, checked by every op that takes these args on either backend: 1 <= groups <=
 * CPEFT_MAX_GROUPS dividing OUT, and lora_a / lora_b sized for the K enabled blocks. Sets
 * *seg = OUT / groups and *enabled_count = K; CPEFT_ERR_INTERNAL otherwise (the boundary has
 * already refused such input). */
int cpeft_lora_groups(const cpeft_lora_linear_args *a, int64_t *seg, int64_t *enabled_count,
                      cpeft_status *st);

int cpeft_lora_linear_fwd_cpu(const cpeft_lora_linear_args *a, const cpeft_lora_linear_fwd_out *o,
                              cpeft_status *st);
int cpeft_lora_linear_bwd_cpu(const cpeft_lora_linear_args *a, const cpeft_lora_linear_bwd_in *in,
                              const cpeft_lora_linear_bwd_out *o, cpeft_status *st);

/* CUDA twins: same contract; all pointers are device pointers on one device, work is queued on
 * `stream` (a cudaStream_t) and nothing synchronizes. */
int cpeft_lora_linear_fwd_cuda(const cpeft_lora_linear_args *a, const cpeft_lora_linear_fwd_out *o,
                               void *stream, cpeft_status *st);
int cpeft_lora_linear_bwd_cuda(const cpeft_lora_linear_args *a, const cpeft_lora_linear_bwd_in *in,
                               const cpeft_lora_linear_bwd_out *o, void *stream, cpeft_status *st);

#ifdef __cplusplus
}
#endif
#endif /* CPEFT_LORA_LINEAR_H */
