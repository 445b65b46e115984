/*
 * CPU-only builds: the CUDA twins of the DoRA compute functions, each reporting
 * CPEFT_ERR_UNSUPPORTED (as cuda_stubs.c does for the other op families; kept apart so the DoRA
 * files stay self-contained). The boundary refuses CUDA tensors in such a build first.
 */
#ifndef CPEFT_WITH_CUDA
#include "cpeft/dora.h"

#define CPEFT_NO_CUDA \
    "cpeft was built without CUDA; reinstall with CPEFT_CUDA=1 on a machine with the CUDA toolkit"

int cpeft_dora_weight_sq_norm_cuda(cpeft_dtype dtype, cpeft_mat weight, cpeft_vec out,
                                   void *stream, cpeft_status *st)
{
    (void)dtype, (void)weight, (void)out, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA);
}

int cpeft_dora_norm_cuda(const cpeft_dora_norm_args *a, cpeft_vec norm, void *stream,
                         cpeft_status *st)
{
    (void)a, (void)norm, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA);
}

int cpeft_dora_linear_fwd_cuda(const cpeft_dora_linear_args *a, const cpeft_dora_linear_fwd_out *o,
                               void *stream, cpeft_status *st)
{
    (void)a, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA);
}

int cpeft_dora_linear_bwd_cuda(const cpeft_dora_linear_args *a, const cpeft_dora_linear_bwd_in *in,
                               const cpeft_dora_linear_bwd_out *o, void *stream, cpeft_status *st)
{
    (void)a, (void)in, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA);
}

int cpeft_dora_embedding_fwd_cuda(const cpeft_dora_embedding_args *a, cpeft_mat y, cpeft_vec norm,
                                  void *stream, cpeft_status *st)
{
    (void)a, (void)y, (void)norm, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA);
}

int cpeft_dora_embedding_bwd_cuda(const cpeft_dora_embedding_args *a, cpeft_mat grad_out,
                                  cpeft_vec norm, const cpeft_dora_embedding_bwd_out *o,
                                  void *stream, cpeft_status *st)
{
    (void)a, (void)grad_out, (void)norm, (void)o, (void)stream;
    return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED, CPEFT_NO_CUDA);
}
#else
typedef int cpeft_dora_cuda_stubs_unused; /* an empty translation unit is not ISO C */
#endif
