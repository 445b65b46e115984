/*
 * DoRA (weight-decomposed LoRA, Liu et al. 2024) with peft 0.21's semantics; forward and backward
 * of the linear and embedding layers, and the row norms they share.
 *
 * Row norms. For W viewed as (OUT, IN), A (R, IN), B (OUT, R), scale s:
 *   n_j = ‖w_j + s·b_j·A‖ = sqrt(‖w_j‖² + 2s·b_j·(A·w_jᵀ) + s²·b_j·(A·Aᵀ)·b_jᵀ)
 * computed from one read of W (A·Wᵀ, R x OUT, a GEMM), the R x R Gram matrix A·Aᵀ and ‖w_j‖²,
 * which the caller may pass in (it only changes when W does) so that W + s·B·A is never built.
 * The sums are combined in double. n is a constant for backward (peft detaches it). Accuracy:
 * the identity's error is relative to ‖w_j‖² rather than to n_j², so it is as accurate as the
 * dense sum while ‖s·b_j·A‖ is small against ‖w_j‖ (DoRA's regime) and loses digits only when
 * w_j + s·b_j·A nearly cancels.
 *
 * Linear, c = m / n (OUT entries), xd = drop(x), xa = xd·Aᵀ (M x R):
 *   no dropout (p == 0):  y = c ⊙ (x·Wᵀ + s·xa·Bᵀ) + bias
 *   dropout (p > 0):      y = x·Wᵀ + bias + (c - 1) ⊙ (xd·Wᵀ) + c ⊙ s·xa·Bᵀ
 * The second is peft's training-mode formula: the base layer sees x, and the DoRA term
 * recomputes the base product on the dropped input (variants.py, DoraLinearVariant.forward).
 * Both are y = x·Wᵀ - xd·Wᵀ + bias + c ⊙ u with u = xd·Wᵀ + s·xa·Bᵀ (M x OUT); u is what
 * grad_m needs, and the only output-sized tensor kept for backward (`base`, written only when
 * requested; without it and with M > IN, c is folded into copies of W and B instead of a pass
 * over y). Backward, gb = g·(c ⊙ B) (M x R):
 *   grad_m_j  = (1/n_j) · Σ_i g_ij u_ij         grad_b = s · (c ⊙ gᵀ·xa)      grad_bias = Σ_rows g
 *   grad_a    = s · gbᵀ·xd
 *   grad_x    = g·(c ⊙ W) + s·gb·A                                (no dropout)
 *   grad_x    = g·W + drop'(g·((c - 1) ⊙ W) + s·gb·A)             (dropout)
 * where (c ⊙ W) scales the rows of W's (OUT, IN) view and drop' applies the forward's mask.
 *
 * Embedding, peft's DoraEmbeddingLayer: W (V, D) is normed per embedding dimension d over the
 * vocabulary, i.e. the linear row norms of the (D, V) view with A (R, V) and B (D, R):
 *   y[n] = c ⊙ (W[idx[n]] + s · Aᵀ[idx[n]]·Bᵀ)                    (no dropout, no bias)
 * Backward, a_n = Aᵀ[idx[n]] (N x R):
 *   grad_m_d = (1/n_d) · (Σ_n g[n,d]·W[idx[n],d] + s·(gᵀ·a)_d·b_d)     grad_b = s · (c ⊙ gᵀ·a)
 *   grad_a[:, idx[n]] += s · (g[n] ⊙ c)·B      (skipping idx[n] == padding_idx)
 * Nothing output-sized is kept: the base rows are gathered again.
 */
#ifndef CPEFT_DORA_H
#define CPEFT_DORA_H

#include "cpeft/core.h"
#include "cpeft/lora_embedding.h"
#include "cpeft/lora_linear.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Inputs of the row norms: W's (OUT, IN) view, A (R, IN), B (OUT, R), s. */
typedef struct {
    cpeft_dtype dtype;
    int64_t out, in, r;
    cpeft_mat weight;           /* OUT x IN view */
    cpeft_mat lora_a;           /* R x IN */
    cpeft_mat lora_b;           /* OUT x R */
    double scale;
    cpeft_vec weight_sq_norm;   /* OUT: ‖w_j‖², or data == NULL: computed from W */
} cpeft_dora_norm_args;

typedef struct {
    cpeft_lora_linear_args lora; /* groups == 1, enabled[0] == 1 (DoRA has no grouped form) */
    cpeft_vec magnitude;         /* OUT */
    cpeft_vec weight_sq_norm;    /* OUT, or data == NULL */
} cpeft_dora_linear_args;

typedef struct {
    cpeft_mat y;                /* M x OUT, written */
    cpeft_mat xa;               /* M x R, written */
    cpeft_mat base;             /* M x OUT: u, written when data != NULL (needed for grad_m) */
    cpeft_vec norm;             /* OUT: n, written */
} cpeft_dora_linear_fwd_out;

typedef struct {
    cpeft_mat grad_out;         /* M x OUT */
    cpeft_mat xa;               /* M x R, from forward */
    cpeft_mat base;             /* M x OUT, from forward; read only for grad_m */
    cpeft_vec norm;             /* OUT, from forward */
} cpeft_dora_linear_bwd_in;

typedef struct {                /* data == NULL when not requested */
    cpeft_mat grad_x;           /* M x IN */
    cpeft_mat grad_a;           /* R x IN */
    cpeft_mat grad_b;           /* OUT x R */
    cpeft_vec grad_m;           /* OUT */
    cpeft_vec grad_bias;        /* OUT */
} cpeft_dora_linear_bwd_out;

typedef struct {
    cpeft_lora_embedding_args lora; /* weight present */
    cpeft_vec magnitude;        /* D */
    cpeft_vec weight_sq_norm;   /* D: Σ_v W[v,d]², or data == NULL */
} cpeft_dora_embedding_args;

typedef struct {                /* data == NULL when not requested */
    cpeft_mat grad_a;           /* R x V */
    cpeft_mat grad_b;           /* D x R */
    cpeft_vec grad_m;           /* D */
} cpeft_dora_embedding_bwd_out;

/* out_j = ‖w_j‖² of the (OUT, IN) view, accumulated in double. */
int cpeft_dora_weight_sq_norm_cpu(cpeft_dtype dtype, cpeft_mat weight, cpeft_vec out,
                                  cpeft_status *st);
int cpeft_dora_norm_cpu(const cpeft_dora_norm_args *a, cpeft_vec norm, cpeft_status *st);
int cpeft_dora_linear_fwd_cpu(const cpeft_dora_linear_args *a, const cpeft_dora_linear_fwd_out *o,
                              cpeft_status *st);
int cpeft_dora_linear_bwd_cpu(const cpeft_dora_linear_args *a, const cpeft_dora_linear_bwd_in *in,
                              const cpeft_dora_linear_bwd_out *o, cpeft_status *st);
/* y (N x D) and norm (D) written. */
int cpeft_dora_embedding_fwd_cpu(const cpeft_dora_embedding_args *a, cpeft_mat y, cpeft_vec norm,
                                 cpeft_status *st);
int cpeft_dora_embedding_bwd_cpu(const cpeft_dora_embedding_args *a, cpeft_mat grad_out,
                                 cpeft_vec norm, const cpeft_dora_embedding_bwd_out *o,
                                 cpeft_status *st);

/* CUDA twins: same contract, device pointers, work queued on `stream`, nothing synchronizes. */
int cpeft_dora_weight_sq_norm_cuda(cpeft_dtype dtype, cpeft_mat weight, cpeft_vec out, void *stream,
                                   cpeft_status *st);
int cpeft_dora_norm_cuda(const cpeft_dora_norm_args *a, cpeft_vec norm, void *stream,
                         cpeft_status *st);
int cpeft_dora_linear_fwd_cuda(const cpeft_dora_linear_args *a, const cpeft_dora_linear_fwd_out *o,
                               void *stream, cpeft_status *st);
int cpeft_dora_linear_bwd_cuda(const cpeft_dora_linear_args *a, const cpeft_dora_linear_bwd_in *in,
                               const cpeft_dora_linear_bwd_out *o, void *stream, cpeft_status *st);
int cpeft_dora_embedding_fwd_cuda(const cpeft_dora_embedding_args *a, cpeft_mat y, cpeft_vec norm,
                                  void *stream, cpeft_status *st);
int cpeft_dora_embedding_bwd_cuda(const cpeft_dora_embedding_args *a, cpeft_mat grad_out,
                                  cpeft_vec norm, const cpeft_dora_embedding_bwd_out *o,
                                  void *stream, cpeft_status *st);

#ifdef __cplusplus
}
#endif
#endif /* CPEFT_DORA_H */
