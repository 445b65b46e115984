/* The per-(device, stream) contexts of the CUDA compute code (see stream_context.cuh). */
#include "stream_context.cuh"

#include <new>
#include <utility>

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

int Session::workspace(size_t bytes, void **out, cpeft_status *st)
{
    if (!ctx_)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "CUDA workspace requested before Session::open");
    if (ctx_->workspace_bytes < bytes) {
        const size_t mib = (size_t)1 << 20;
        size_t grown = (bytes + mib - 1) / mib * mib;
        if (ctx_->workspace) {
            /* Earlier work on this stream may still read the old buffer. */
            CPEFT_CUDA_CHECK(st, cudaStreamSynchronize(stream));
            CPEFT_CUDA_CHECK(st, cudaFree(ctx_->workspace));
            ctx_->workspace = nullptr;
            ctx_->workspace_bytes = 0;
        }
        void *p = nullptr;
        cudaError_t err = cudaMalloc(&p, grown);
        if (err != cudaSuccess) {
            cudaGetLastError(); /* an allocation failure is not sticky; clear it */
            if (err == cudaErrorMemoryAllocation)
                return cpeft_fail(st, CPEFT_ERR_NOMEM,
                                  "cudaMalloc failed: could not allocate a %zu-byte CUDA workspace",
                                  grown);
            return fail_cuda(st, err, "cudaMalloc", __FILE__, __LINE__, __func__);
        }
        ctx_->workspace = p;
        ctx_->workspace_bytes = grown;
    }
    *out = ctx_->workspace;
    return CPEFT_OK;
}

} /* namespace cpeft_cuda */

