/*
 * The compute functions cpeft._C lends to cpeft's torch-native extension (csrc/torch), through a
 * PyCapsule as NumPy lends its C API: that extension links libtorch, which cpeft._C must not
 * (torch is optional), and calling these from it spares a second copy of the compute layer and
 * of its BLAS wiring. The table is versioned; a caller refuses a version it does not know.
 */
#ifndef CPEFT_COMPUTE_API_H
#define CPEFT_COMPUTE_API_H

#include "cpeft/lora_linear.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CPEFT_COMPUTE_API_CAPSULE "cpeft._C._compute_api"
/* Raised whenever a member is added, removed or changes its signature or the meaning of its
 * arguments (cpeft_lora_linear_args included). */
#define CPEFT_COMPUTE_API_VERSION 1

typedef struct {
    int version;
    int (*lora_linear_fwd_cpu)(const cpeft_lora_linear_args *a, const cpeft_lora_linear_fwd_out *o,
                               cpeft_status *st);
    int (*lora_linear_bwd_cpu)(const cpeft_lora_linear_args *a, const cpeft_lora_linear_bwd_in *in,
                               const cpeft_lora_linear_bwd_out *o, cpeft_status *st);
} cpeft_compute_api;

#ifdef __cplusplus
}
#endif

#endif /* CPEFT_COMPUTE_API_H */
