/*
 * The CUDA workspace: scratch memory the CUDA ops take from a cache kept per (device, stream).
 * It grows in stream order (cudaMallocAsync / cudaFreeAsync, no host synchronization) the first
 * time a call needs more, which a stream being captured into a CUDA graph cannot do. Reserving it
 * before capture (or running the step once on the capture stream) makes the captured calls find
 * it large enough. A graph keeps the workspace address it was captured with: a later growth on
 * that stream frees that memory, so reserve the most any call will need before capturing.
 */
#ifndef CPEFT_WORKSPACE_H
#define CPEFT_WORKSPACE_H

#include "cpeft/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Grows the workspace of the current device and `stream` (a cudaStream_t) to at least `bytes`
 * and waits for the allocation; *reserved is its size afterwards. Refused on a stream that is
 * being captured. */
int cpeft_cuda_reserve_workspace(size_t bytes, void *stream, size_t *reserved, cpeft_status *st);

#ifdef __cplusplus
}
#endif
#endif /* CPEFT_WORKSPACE_H */
