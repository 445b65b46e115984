/* The per-(device, stream) contexts of the CUDA compute code (see stream_context.cuh). */
#include "stream_context.cuh"

#include <new>
#include <utility>

#include "cpeft/workspace.h"
#include "status.cuh"

namespace cpeft_cuda {

typedef std::pair<int, cudaStream_t> ContextKey;

/* Contexts are never destroyed: destroying cuBLAS handles from a static destructor would race
 * the CUDA runtime's own teardown at process exit. The registry itself is leaked for the same
 * reason. */
static std::mutex &registry_mutex()
{
    static std::mutex *m = new std::mutex;
    return *m;
}

static std::map<ContextKey, StreamContext *> &registry()
{
    static std::map<ContextKey, StreamContext *> *r = new std::map<ContextKey, StreamContext *>;
    return *r;
}

static int create_context(StreamContext **out, cpeft_status *st)
{
    cublasHandle_t handle = nullptr;
    CPEFT_CUBLAS_CHECK(st, cublasCreate(&handle));
    /* fp32 accumulation is part of the contract: forbid split-K reductions in 16 bits. */
    cublasStatus_t mode = cublasSetMathMode(
        handle,
        (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
    if (mode != CUBLAS_STATUS_SUCCESS) {
        cublasDestroy(handle);
        return fail_cublas(st, mode, "cublasSetMathMode", __FILE__, __LINE__, __func__);
    }
    StreamContext *ctx = new (std::nothrow) StreamContext;
    if (!ctx) {
        cublasDestroy(handle);
        return cpeft_fail(st, CPEFT_ERR_NOMEM, "could not allocate a CUDA stream context");
    }
    ctx->blas = handle;
    *out = ctx;
    return CPEFT_OK;
}

Session::~Session() = default;

int Session::open(void *stream_handle, cpeft_status *st)
{
    int device = 0;
    CPEFT_CUDA_CHECK(st, cudaGetDevice(&device));
    cudaStream_t s = static_cast<cudaStream_t>(stream_handle);
    StreamContext *ctx = nullptr;
    {
        std::lock_guard<std::mutex> guard(registry_mutex());
        std::map<ContextKey, StreamContext *> &r = registry();
        auto found = r.find(ContextKey(device, s));
        if (found != r.end()) {
            ctx = found->second;
        } else {
            CPEFT_TRY(create_context(&ctx, st));
            r[ContextKey(device, s)] = ctx;
        }
    }
    lock_ = std::unique_lock<std::mutex>(ctx->mutex);
    ctx_ = ctx;
    stream = s;
    blas = ctx->blas;
    CPEFT_CUBLAS_CHECK(st, cublasSetStream(blas, s));
    return CPEFT_OK;
}

StreamContext *Session::context() const { return ctx_; }

/* Replaces ctx's workspace by one of at least `bytes` (rounded up to whole MiB), in the order of
 * `stream`: the old buffer is freed after the work already queued there, and the new one is
 * usable by the work queued after it. Nothing synchronizes. */
static int grow_workspace(StreamContext *ctx, cudaStream_t stream, size_t bytes, cpeft_status *st)
{
    const size_t mib = (size_t)1 << 20;
    const size_t grown = (bytes + mib - 1) / mib * mib;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    CPEFT_CUDA_CHECK(st, cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED,
                          "this call needs a CUDA workspace of %zu bytes on its stream, which has "
                          "%zu, and a workspace cannot grow while the stream is captured into a "
                          "CUDA graph: run the step once on this stream before capture, or call "
                          "cpeft._C.cuda_reserve_workspace(%zu, stream) before capture",
                          bytes, ctx->workspace_bytes, grown);
    if (ctx->workspace && ctx->workspace_captured) {
        /* A graph captured with this buffer may still be replayed, and CUDA does not say when
         * the last such graph is destroyed: the buffer stays allocated for the process. Sizes
         * only grow, so what is kept is bounded by the sizes reserved before captures. */
        ctx->workspace = nullptr;
        ctx->workspace_bytes = 0;
        ctx->workspace_captured = false;
    } else if (ctx->workspace) {
        CPEFT_CUDA_CHECK(st, cudaFreeAsync(ctx->workspace, stream));
        ctx->workspace = nullptr;
        ctx->workspace_bytes = 0;
    }
    void *p = nullptr;
    cudaError_t err = cudaMallocAsync(&p, grown, stream);
    if (err != cudaSuccess) {
        cudaGetLastError(); /* an allocation failure is not sticky; clear it */
        if (err == cudaErrorMemoryAllocation)
            return cpeft_fail(st, CPEFT_ERR_NOMEM,
                              "cudaMallocAsync failed: could not allocate a %zu-byte CUDA "
                              "workspace",
                              grown);
        return fail_cuda(st, err, "cudaMallocAsync", __FILE__, __LINE__, __func__);
    }
    ctx->workspace = p;
    ctx->workspace_bytes = grown;
    return CPEFT_OK;
}

int Session::workspace(size_t bytes, void **out, cpeft_status *st)
{
    if (!ctx_)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "CUDA workspace requested before Session::open");
    if (ctx_->workspace_bytes < bytes)
        CPEFT_TRY(grow_workspace(ctx_, stream, bytes, st));
    if (!ctx_->workspace_captured && ctx_->workspace) {
        cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
        CPEFT_CUDA_CHECK(st, cudaStreamIsCapturing(stream, &capture));
        ctx_->workspace_captured = capture != cudaStreamCaptureStatusNone;
    }
    *out = ctx_->workspace;
    return CPEFT_OK;
}

} /* namespace cpeft_cuda */

using namespace cpeft_cuda;

int cpeft_cuda_reserve_workspace(size_t bytes, void *stream, size_t *reserved, cpeft_status *st)
{
    st->code = CPEFT_OK;
    st->message[0] = '\0';
    Session s;
    CPEFT_TRY(s.open(stream, st));
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    CPEFT_CUDA_CHECK(st, cudaStreamIsCapturing(s.stream, &capture));
    if (capture != cudaStreamCaptureStatusNone)
        return cpeft_fail(st, CPEFT_ERR_UNSUPPORTED,
                          "cuda_reserve_workspace: the stream is being captured into a CUDA "
                          "graph; reserve its workspace before the capture begins");
    void *unused = nullptr;
    CPEFT_TRY(s.workspace(bytes, &unused, st));
    /* Done before returning, so that a graph captured afterwards may be replayed on any stream. */
    CPEFT_CUDA_CHECK(st, cudaStreamSynchronize(s.stream));
    *reserved = s.context()->workspace_bytes;
    return CPEFT_OK;
}
