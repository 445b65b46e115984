/*
 * CPU-only builds: the CUDA twins of the compute functions exist so every entry point links, and
 * each reports CPEFT_ERR_UNSUPPORTED. The boundary already refuses CUDA tensors in such a build
 * (csrc/py/tensor.c), so these run only if something bypasses it. Compiled (as C, by setup.py)
 * only when CUDA is not; nothing here sees Python.
 */
#include "cpeft/core.h"
#include "cpeft/dora.h"
#include "cpeft/dropout.h"
#include "cpeft/ia3.h"
#include "cpeft/lora_embedding.h"
#include "cpeft/lora_grouped.h"
#include "cpeft/lora_linear.h"
#include "cpeft/merge.h"
#include "cpeft/workspace.h"

int cpeft_lora_linear_fwd_cuda(const cpeft_lora_linear_args *a, const cpeft_lora_linear_fwd_out *o,
                               void *stream, cpeft_status *st)
{
    (void)a, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_lora_linear_bwd_cuda(const cpeft_lora_linear_args *a, const cpeft_lora_linear_bwd_in *in,
                               const cpeft_lora_linear_bwd_out *o, void *stream, cpeft_status *st)
{
    (void)a, (void)in, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_lora_embedding_fwd_cuda(const cpeft_lora_embedding_args *a, cpeft_mat y, void *stream,
                                  cpeft_status *st)
{
    (void)a, (void)y, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_lora_embedding_bwd_cuda(const cpeft_lora_embedding_args *a,
                                  const cpeft_lora_embedding_bwd_in *in,
                                  const cpeft_lora_embedding_bwd_out *o, void *stream,
                                  cpeft_status *st)
{
    (void)a, (void)in, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_ia3_linear_fwd_cuda(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_fwd_out *o,
                              void *stream, cpeft_status *st)
{
    (void)a, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_ia3_linear_bwd_cuda(const cpeft_ia3_linear_args *a, const cpeft_ia3_linear_bwd_in *in,
                              const cpeft_ia3_linear_bwd_out *o, void *stream, cpeft_status *st)
{
    (void)a, (void)in, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_ia3_embedding_fwd_cuda(const cpeft_ia3_embedding_args *a, cpeft_mat y, void *stream,
                                 cpeft_status *st)
{
    (void)a, (void)y, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_ia3_embedding_bwd_cuda(const cpeft_ia3_embedding_args *a, cpeft_mat grad_out,
                                 const cpeft_ia3_embedding_bwd_out *o, void *stream,
                                 cpeft_status *st)
{
    (void)a, (void)grad_out, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_lora_merge_cuda(const cpeft_lora_linear_args *a, int direction, cpeft_merge_record *rec,
                          void *stream, cpeft_status *st)
{
    (void)a, (void)direction, (void)rec, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_ia3_merge_cuda(cpeft_dtype dtype, cpeft_mat target, cpeft_vec l, int along_cols,
                         int direction, cpeft_merge_record *rec, void *stream, cpeft_status *st)
{
    (void)dtype, (void)target, (void)l, (void)along_cols, (void)direction, (void)rec, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_dropout_mask_cuda(cpeft_dtype dtype, const cpeft_dropout *d, cpeft_mat mask, void *stream,
                            cpeft_status *st)
{
    (void)dtype, (void)d, (void)mask, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_lora_grouped_fwd_cuda(const cpeft_lora_grouped_args *a,
                                const cpeft_lora_grouped_fwd_out *o, void *stream, cpeft_status *st)
{
    (void)a, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_lora_grouped_bwd_cuda(const cpeft_lora_grouped_args *a,
                                const cpeft_lora_grouped_bwd_in *in,
                                const cpeft_lora_grouped_bwd_out *o, void *stream, cpeft_status *st)
{
    (void)a, (void)in, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_dora_weight_sq_norm_cuda(cpeft_dtype dtype, cpeft_mat weight, cpeft_vec out, void *stream,
                                   cpeft_status *st)
{
    (void)dtype, (void)weight, (void)out, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_dora_norm_cuda(const cpeft_dora_norm_args *a, cpeft_vec norm, void *stream,
                         cpeft_status *st)
{
    (void)a, (void)norm, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_dora_linear_fwd_cuda(const cpeft_dora_linear_args *a, const cpeft_dora_linear_fwd_out *o,
                               void *stream, cpeft_status *st)
{
    (void)a, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_dora_linear_bwd_cuda(const cpeft_dora_linear_args *a, const cpeft_dora_linear_bwd_in *in,
                               const cpeft_dora_linear_bwd_out *o, void *stream, cpeft_status *st)
{
    (void)a, (void)in, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_dora_embedding_fwd_cuda(const cpeft_dora_embedding_args *a, cpeft_mat y, cpeft_vec norm,
                                  void *stream, cpeft_status *st)
{
    (void)a, (void)y, (void)norm, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_dora_embedding_bwd_cuda(const cpeft_dora_embedding_args *a, cpeft_mat grad_out,
                                  cpeft_vec norm, const cpeft_dora_embedding_bwd_out *o,
                                  void *stream, cpeft_status *st)
{
    (void)a, (void)grad_out, (void)norm, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}

int cpeft_cuda_reserve_workspace(size_t bytes, void *stream, size_t *reserved, cpeft_status *st)
{
    (void)bytes, (void)stream;
    *reserved = 0;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA_MESSAGE);
}
