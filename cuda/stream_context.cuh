/*
 * The per-(device, stream) context of the CUDA compute code: one cuBLAS handle, the cuBLASLt plans
 * and one workspace per stream, and the Session an op holds for its whole call.
 */
#ifndef CPEFT_CUDA_STREAM_CONTEXT_CUH
#define CPEFT_CUDA_STREAM_CONTEXT_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>

#include "cpeft/core.h"

namespace cpeft_cuda {

/* ---------------------------------------------------------------------------------------------
 * One cuBLAS handle and one workspace per (device, stream) pair, created on first use and kept
 * for the life of the process. Keying by stream (not only by device) is what makes two
 * concurrent streams safe: each has its own workspace, so work queued on one stream never
 * overwrites scratch data that work on the other is still reading, and cuBLAS's own per-handle
 * workspace is never shared across streams either. A Session holds the context's mutex for the
 * whole op, so two host threads on the same stream cannot interleave their use of the workspace.
 * ------------------------------------------------------------------------------------------- */

/* A cuBLASLt matmul prepared once per problem (dtype, transposes, sizes, leading dimensions,
 * pointer alignments): descriptors, layouts and the heuristic's algorithm, or the finding that
 * there is none (then the caller keeps its cuBLAS path). Filled by gemm.cu. */
struct LtPlan {
    bool supported = false;
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo;
};
typedef std::array<int64_t, 12> LtKey;

struct StreamContext {
    std::mutex mutex;
    cublasHandle_t blas = nullptr;
    cublasLtHandle_t lt = nullptr;     /* created on first use */
    std::map<LtKey, LtPlan> lt_plans;
    void *workspace = nullptr;         /* allocated in this stream's order (cudaMallocAsync) */
    size_t workspace_bytes = 0;
    bool workspace_captured = false;   /* handed to a call on a capturing stream: never freed */
};

class Session {
public:
    Session() = default;
    Session(const Session &) = delete;
    Session &operator=(const Session &) = delete;
    ~Session();

    /* Finds (or lazily creates) the context of the current device and `stream`, locks it and
     * binds its cuBLAS handle to the stream. */
    int open(void *stream, cpeft_status *st);

    /* Scratch memory of at least `bytes` for work queued on this stream, valid until the Session
     * ends. The cached buffer grows only when a larger size is first needed, and in stream order:
     * the old buffer is released with cudaFreeAsync and the new one taken with cudaMallocAsync
     * on the stream, so nothing waits on the host. A stream being captured into a CUDA graph
     * cannot grow its workspace (the allocation would belong to the graph): that is an error
     * telling the caller to reserve it before capture (cpeft/workspace.h). A buffer once handed
     * out under capture is never released (a replay of that graph still writes it). */
    int workspace(size_t bytes, void **out, cpeft_status *st);

    /* The locked context (for the cuBLASLt plans it caches); null before open. */
    StreamContext *context() const;

    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;

private:
    StreamContext *ctx_ = nullptr;
    std::unique_lock<std::mutex> lock_;
};

/* Sequential carving of one workspace into aligned pieces: plan the sizes, then take them. */
inline size_t ws_align(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

class Carver {
public:
    explicit Carver(void *base) : base_(static_cast<char *>(base)) {}
    void *take(size_t bytes)
    {
        char *p = base_ + used_;
        used_ += ws_align(bytes);
        return p;
    }

private:
    char *base_;
    size_t used_ = 0;
};

} /* namespace cpeft_cuda */

#endif /* CPEFT_CUDA_STREAM_CONTEXT_CUH */
