/* Status handling of the CUDA compute code (see status.cuh). */
#include "status.cuh"

#include <cstring>

namespace cpeft_cuda {

static int call_name_length(const char *call)
{
    const char *paren = strchr(call, '(');
    return paren ? (int)(paren - call) : (int)strlen(call);
}

static const char *file_basename(const char *file)
{
    const char *slash = strrchr(file, '/');
    return slash ? slash + 1 : file;
}

int fail_cuda(cpeft_status *st, cudaError_t err, const char *call, const char *file, int line,
              const char *func)
{
    int code = err == cudaErrorMemoryAllocation ? CPEFT_ERR_NOMEM : CPEFT_ERR_CUDA;
    return cpeft_fail(st, code, "%.*s failed: %s: %s (%s:%d in %s)", call_name_length(call), call,
                      cudaGetErrorName(err), cudaGetErrorString(err), file_basename(file), line,
                      func);
}

int fail_cublas(cpeft_status *st, cublasStatus_t status, const char *call, const char *file,
                int line, const char *func)
{
    return cpeft_fail(st, CPEFT_ERR_CUBLAS, "%.*s failed: %s (%s:%d in %s)", call_name_length(call),
                      call, cublasGetStatusName(status), file_basename(file), line, func);
}

} /* namespace cpeft_cuda */
