/*
 * LoRA linear over a batch whose rows use different adapters (peft's mixed-adapter batches), all
 * adapters of the layer in one call, forward and backward.
 *
 *   y[m] = x[m]·Wᵀ + b + s_g · (drop(x[m])·A_gᵀ)·B_gᵀ     g = index[m]; index[m] = -1: no adapter
 *
 * The G adapters may have different ranks R_g. They arrive packed: lora_a (ΣR, IN) stacks the
 * A_g (rows [off_g, off_g + R_g)), lora_b (OUT, ΣR) puts the B_g side by side (columns
 * [off_g, off_g + R_g)), off_g = R_0 + ... + R_{g-1}. Rows are grouped by adapter inside the op
 * (a stable counting sort of index), so each adapter's products are one GEMM pair over its rows,
 * whatever the order of the rows in the batch. The base product is one GEMM over all M rows.
 *
 * xa (M x R_max, R_max = max R_g) is kept for backward: row m holds drop(x[m])·A_gᵀ in columns
 * [0, R_g) (unscaled); the other columns of the row, and every column of a row without adapter,
 * are zero. The dropout mask of element (m, i) is the same counter scheme as lora_linear
 * (offset + m*IN + i), so the same (seed, offset) gives the mask of a plain LoRA linear.
 *
 * Backward, per adapter g over its rows (g_rows of grad_out, gb = g_rows·B_g):
 *   grad_b_g = s_g · g_rowsᵀ·xa_g      grad_a_g = s_g · gbᵀ·drop(x_rows)
 *   grad_x   = g·W + scatter(s_g · drop'(gb·A_g))
 *   grad_bias = Σ_rows g               grad_weight = gᵀ·x  (in W's (OUT, IN) view)
 * The columns of grad_b (rows of grad_a) of an adapter without rows in the batch are zero.
 */
#ifndef CPEFT_LORA_GROUPED_H
#define CPEFT_LORA_GROUPED_H

#include "cpeft/core.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CPEFT_MAX_ADAPTERS 1024

typedef struct {
    cpeft_dtype dtype;            /* of every float tensor below */
    int64_t m, in, out;
    int64_t adapters;             /* G, 1 <= G <= CPEFT_MAX_ADAPTERS */
    const int64_t *ranks;         /* G ranks R_g >= 1 (host memory) */
    const double *scales;         /* G finite scales s_g (host memory) */
    int64_t r_max;                /* max R_g */
    cpeft_dtype index_dtype;      /* CPEFT_INT32 or CPEFT_INT64 */
    cpeft_vec index;              /* M entries in [-1, G) (device memory on CUDA) */
    cpeft_mat x;                  /* M x IN */
    cpeft_mat weight;             /* OUT x IN view */
    cpeft_vec bias;               /* OUT, or data == NULL */
    cpeft_mat lora_a;             /* ΣR x IN */
    cpeft_mat lora_b;             /* OUT x ΣR */
    cpeft_dropout dropout;
} cpeft_lora_grouped_args;

typedef struct {
    cpeft_mat y;                  /* M x OUT, written */
    cpeft_mat xa;                 /* M x R_max, written (kept by the caller for backward) */
} cpeft_lora_grouped_fwd_out;

typedef struct {
    cpeft_mat grad_out;           /* M x OUT */
    cpeft_mat xa;                 /* M x R_max, from forward */
} cpeft_lora_grouped_bwd_in;

typedef struct {                  /* each: data == NULL when not requested */
    cpeft_mat grad_x;             /* M x IN */
    cpeft_mat grad_a;             /* ΣR x IN */
    cpeft_mat grad_b;             /* OUT x ΣR */
    cpeft_vec grad_bias;          /* OUT */
    cpeft_mat grad_weight;        /* OUT x IN view of W's storage */
} cpeft_lora_grouped_bwd_out;

int cpeft_lora_grouped_fwd_cpu(const cpeft_lora_grouped_args *a,
                               const cpeft_lora_grouped_fwd_out *o, cpeft_status *st);
int cpeft_lora_grouped_bwd_cpu(const cpeft_lora_grouped_args *a,
                               const cpeft_lora_grouped_bwd_in *in,
                               const cpeft_lora_grouped_bwd_out *o, cpeft_status *st);

/* CUDA twins: same contract; tensors are device pointers on one device (ranks and scales stay
 * host arrays), work is queued on `stream`. The per-adapter row counts are needed on the host to
 * size the GEMMs, so these copy the index's counts back once per call (one stream sync, as
 * peft's per-adapter loop does). */
int cpeft_lora_grouped_fwd_cuda(const cpeft_lora_grouped_args *a,
                                const cpeft_lora_grouped_fwd_out *o, void *stream,
                                cpeft_status *st);
int cpeft_lora_grouped_bwd_cuda(const cpeft_lora_grouped_args *a,
                                const cpeft_lora_grouped_bwd_in *in,
                                const cpeft_lora_grouped_bwd_out *o, void *stream,
                                cpeft_status *st);

#ifdef __cplusplus
}
#endif
#endif /* CPEFT_LORA_GROUPED_H */
