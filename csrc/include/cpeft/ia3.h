/*
 * IA3, both of peft's variants, and IA3 embedding; forward and backward.
 *
 *   output scaling:      y = (x·Wᵀ + b) ⊙ l          l has OUT entries
 *   input  scaling (ff): y = (x ⊙ l)·Wᵀ + b          l has IN entries  (peft's feedforward modules)
 *   embedding:           y[n] = W[idx[n]] ⊙ l       l has D entries
 *
 * The scaling is folded into whichever operand is smaller (a scaled copy of W, OUT x IN, or of
 * the activation rows, chunked), so no full-size pass over y is added after the GEMM.
 *
 * Output scaling keeps base = x·Wᵀ + b (M x OUT) for grad_l = Σ_rows g ⊙ base, because
 * recomputing it costs a full GEMM; the caller asks for it only when l needs a gradient.
 * Backward (output):  gl = g ⊙ l;  grad_x = gl·W;  grad_bias = Σ_rows gl;  grad_weight = glᵀ·x
 * Backward (input):   gw = g·W;  grad_l = Σ_rows x ⊙ gw;  grad_x = gw ⊙ l;  grad_bias = Σ_rows g;
 *                     grad_weight = gᵀ·(x ⊙ l)
 * Backward (embedding): grad_l = Σ_n g[n] ⊙ W[idx[n]];  grad_weight[idx[n]] += g[n] ⊙ l
 *                     (rows at padding_idx are skipped for grad_weight only).
 */
#ifndef CPEFT_IA3_H
#define CPEFT_IA3_H

#include "cpeft/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    cpeft_dtype dtype;
    int64_t m, in, out;
    int feedforward;            /* 1: input scaling, 0: output scaling */
    cpeft_mat x;                /* M x IN */
    cpeft_mat weight;           /* OUT x IN view */
    cpeft_vec bias;             /* OUT, or data == NULL */
    cpeft_vec l;                /* OUT (output scaling) or IN (feedforward) */
} cpeft_ia3_linear_args;

typedef struct {
    cpeft_mat y;                /* M x OUT, written */
    cpeft_mat base;             /* M x OUT, written when data != NULL (output scaling only) */
} cpeft_ia3_linear_fwd_out;

typedef struct {
    cpeft_mat grad_out;         /* M x OUT */
    cpeft_mat base;             /* M x OUT; needed for grad_l with output scaling */
} cpeft_ia3_linear_bwd_in;

typedef struct {                /* data == NULL when not requested */
    cpeft_mat grad_x;           /* M x IN */
    cpeft_vec grad_l;           /* len(l) */
    cpeft_vec grad_bias;        /* OUT */
    cpeft_mat grad_weight;      /* OUT x IN view */
} cpeft_ia3_linear_bwd_out;

typedef struct {
    cpeft_dtype dtype;
    cpeft_dtype index_dtype;    /* CPEFT_INT32 or CPEFT_INT64 */
    int64_t n, num_embeddings, dim;
    cpeft_vec indices;          /* N, values in [0, V) */
    cpeft_mat weight;           /* V x D */
    cpeft_vec l;                /* D */
    int64_t padding_idx;        /* or -1 */
} cpeft_ia3_embedding_args;

typedef struct {                /* data == NULL when not requested */
    cpeft_vec grad_l;           /* D */
    cpeft_mat grad_weight;      /* V x D */
} cpeft_ia3_embedding_bwd_out;

int cpeft_ia3_linear_fwd_cpu(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_fwd_out *o,
                             cpeft_status *st);
int cpeft_ia3_linear_bwd_cpu(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_bwd_in *in,
                             const cpeft_ia3_linear_bwd_out *o, cpeft_status *st);
int cpeft_ia3_embedding_fwd_cpu(const cpeft_ia3_embedding_args *a, cpeft_mat y, cpeft_status *st);
int cpeft_ia3_embedding_bwd_cpu(const cpeft_ia3_embedding_args *a, cpeft_mat grad_out,
                                const cpeft_ia3_embedding_bwd_out *o, cpeft_status *st);

int cpeft_ia3_linear_fwd_cuda(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_fwd_out *o,
                              void *stream, cpeft_status *st);
int cpeft_ia3_linear_bwd_cuda(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_bwd_in *in,
                              const cpeft_ia3_linear_bwd_out *o, void *stream, cpeft_status *st);
int cpeft_ia3_embedding_fwd_cuda(const cpeft_ia3_embedding_args *a, cpeft_mat y, void *stream,
                                 cpeft_status *st);
int cpeft_ia3_embedding_bwd_cuda(const cpeft_ia3_embedding_args *a, cpeft_mat grad_out,
                                 const cpeft_ia3_embedding_bwd_out *o, void *stream,
                                 cpeft_status *st);

#ifdef __cplusplus
}
#endif
#endif /* CPEFT_IA3_H */
