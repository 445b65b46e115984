/*
 * LoRA embedding (loralib Embedding), forward and backward.
 *
 *   y[n] = W[idx[n]] + s · Aᵀ[idx[n]]·Bᵀ
 *
 * Shapes: indices (N) int32 or int64, every value in [0, V) (the boundary checks CPU indices and
 * raises IndexError; reading CUDA indices would need a sync, so there an out-of-range index
 * gives a NaN row of y and no gradient, never an out-of-bounds access); weight (V, D);
 * lora_a (R, V); lora_b (D, R);
 * y (N, D). Nothing of vocabulary size is built per call except the gradients that have that
 * size by definition (grad_a is R x V, grad_weight is V x D); they are zeroed then scatter-added.
 * Rows whose index equals padding_idx contribute nothing to grad_a and grad_weight (torch's
 * padding_idx semantics), though their forward value is computed normally.
 *
 * Backward: grad_b = s · gᵀ·Aᵀ[idx]  (D x R);  grad_a[:, idx[n]] += s · (g[n]·B)ᵀ;
 *           grad_weight[idx[n]] += g[n].
 */
#ifndef CPEFT_LORA_EMBEDDING_H
#define CPEFT_LORA_EMBEDDING_H

#include "cpeft/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    cpeft_dtype dtype;          /* of weight, lora_a, lora_b, y and gradients */
    cpeft_dtype index_dtype;    /* CPEFT_INT32 or CPEFT_INT64 */
    int64_t n, num_embeddings, dim, r;
    cpeft_vec indices;          /* N */
    cpeft_mat weight;           /* V x D (may be absent in backward) */
    cpeft_mat lora_a;           /* R x V */
    cpeft_mat lora_b;           /* D x R */
    double scale;
    int64_t padding_idx;        /* in [0, V), or -1 for none */
} cpeft_lora_embedding_args;

typedef struct {
    cpeft_mat grad_out;         /* N x D */
} cpeft_lora_embedding_bwd_in;

typedef struct {                /* data == NULL when not requested */
    cpeft_mat grad_a;           /* R x V */
    cpeft_mat grad_b;           /* D x R */
    cpeft_mat grad_weight;      /* V x D */
} cpeft_lora_embedding_bwd_out;

int cpeft_lora_embedding_fwd_cpu(const cpeft_lora_embedding_args *a, cpeft_mat y, cpeft_status *st);
int cpeft_lora_embedding_bwd_cpu(const cpeft_lora_embedding_args *a,
                                 const cpeft_lora_embedding_bwd_in *in,
                                 const cpeft_lora_embedding_bwd_out *o, cpeft_status *st);

int cpeft_lora_embedding_fwd_cuda(const cpeft_lora_embedding_args *a, cpeft_mat y, void *stream,
                                  cpeft_status *st);
int cpeft_lora_embedding_bwd_cuda(const cpeft_lora_embedding_args *a,
                                  const cpeft_lora_embedding_bwd_in *in,
                                  const cpeft_lora_embedding_bwd_out *o, void *stream,
                                  cpeft_status *st);

#ifdef __cplusplus
}
#endif
#endif /* CPEFT_LORA_EMBEDDING_H */
