/*
 * cpeft compute layer: shared types.
 *
 * Everything below csrc/py/ is a pure function of pointers, shapes, strides and (on the GPU) a
 * stream. Nothing here includes Python.h; the boundary in csrc/py/ is the only code that sees
 * Python objects, and it has already validated every argument before a compute function runs.
 *
 * Conventions shared by every op family:
 *   - Strides are in ELEMENTS, never bytes.
 *   - A cpeft_mat handed to a compute function is BLAS-able: either col_stride == 1 and
 *     row_stride >= max(1, cols) (row-major), or row_stride == 1 and col_stride >= max(1, rows)
 *     (column-major). The boundary copies an input into a compact temporary only when no such
 *     view exists (e.g. x[:, ::2]); outputs that are not BLAS-able are rejected there.
 *   - Outputs are owned by the caller and fully overwritten (gradients are not accumulated into);
 *     a NULL data pointer means "not requested" and the work that only feeds it is skipped.
 *   - Low-precision data (fp16/bf16, CUDA only) is accumulated in fp32.
 *   - Dimension letters: M rows of activations (all leading dims of x flattened), IN / OUT
 *     features, R the LoRA rank, G output groups of a merged projection, K the enabled groups.
 */
#ifndef CPEFT_CORE_H
#define CPEFT_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__CUDACC__)
#define CPEFT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CPEFT_HOST_DEVICE static inline
#endif

typedef enum {
    CPEFT_FLOAT32 = 0,
    CPEFT_FLOAT64 = 1,
    CPEFT_FLOAT16 = 2,
    CPEFT_BFLOAT16 = 3,
    CPEFT_INT32 = 4,
    CPEFT_INT64 = 5,
} cpeft_dtype;

static inline size_t cpeft_dtype_size(cpeft_dtype dt)
{
    switch (dt) {
    case CPEFT_FLOAT64:
    case CPEFT_INT64: return 8;
    case CPEFT_FLOAT32:
    case CPEFT_INT32: return 4;
    default: return 2;
    }
}

/* The dtype a float dtype's products and sums accumulate in: float64 stays float64, everything
 * else (float32, float16, bfloat16) accumulates in float32. */
static inline cpeft_dtype cpeft_acc_dtype(cpeft_dtype dt)
{
    return dt == CPEFT_FLOAT64 ? CPEFT_FLOAT64 : CPEFT_FLOAT32;
}

/* Element (i, j) lives at data + i*row_stride + j*col_stride (elements). */
typedef struct {
    void *data;
    int64_t rows, cols;
    int64_t row_stride, col_stride;
} cpeft_mat;

/* Element i lives at data + i*stride (elements). data == NULL: absent / not requested. */
typedef struct {
    void *data;
    int64_t len;
    int64_t stride;
} cpeft_vec;

typedef enum {
    CPEFT_OK = 0,
    CPEFT_ERR_NOMEM = 1,     /* a temporary could not be allocated       -> MemoryError */
    CPEFT_ERR_INDEX = 2,     /* an embedding index out of range          -> IndexError  */
    CPEFT_ERR_CUDA = 3,      /* a CUDA runtime call failed               -> cpeft.CudaError */
    CPEFT_ERR_CUBLAS = 4,    /* a cuBLAS call failed                     -> cpeft.CudaError */
    CPEFT_ERR_UNSUPPORTED = 5, /* e.g. a CUDA op in a CPU-only build     -> RuntimeError */
    CPEFT_ERR_INTERNAL = 6,  /* an invariant broke (never on valid input) -> RuntimeError */
    CPEFT_ERR_CHANGED = 7,   /* an input changed during the call (another thread wrote to it)
                                                                          -> RuntimeError */
} cpeft_code;

/* The message of CPEFT_ERR_UNSUPPORTED for a CUDA op in a CPU-only build. */
#define CPEFT_NO_CUDA_MESSAGE \
    "cpeft was built without CUDA; reinstall with CPEFT_CUDA=1 on a machine with the CUDA toolkit"

/* Compute functions return st->code and, on failure, say what failed in st->message
 * (the call, the status name, file:line). The boundary turns it into a Python exception. */
typedef struct {
    int code;
    char message[320];
} cpeft_status;

int cpeft_fail(cpeft_status *st, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/*
 * Dropout on the LoRA branch input, from a counter-based generator so that backward regenerates
 * the mask instead of keeping anything of x's size. Element (m, i) of the logical M x IN input
 * uses counter c = offset + m*IN + i; it is kept when uniform(seed, c) >= p and then scaled by
 * 1/(1-p) (p >= 1 drops everything). The same (seed, offset) gives the same mask on CPU and GPU.
 */
typedef struct {
    double p;        /* 0 <= p <= 1; 0 disables dropout */
    uint64_t seed;
    uint64_t offset;
} cpeft_dropout;

/* Philox4x32-10 (Salmon et al., SC'11): four 32-bit outputs per 128-bit counter. */
CPEFT_HOST_DEVICE void cpeft_philox4x32_10(uint32_t ctr[4], uint32_t key0, uint32_t key1)
{
    for (int round = 0; round < 10; ++round) {
        uint64_t p0 = (uint64_t)0xD2511F53u * ctr[0];
        uint64_t p1 = (uint64_t)0xCD9E8D57u * ctr[2];
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        uint32_t n0 = hi1 ^ ctr[1] ^ key0;
        uint32_t n2 = hi0 ^ ctr[3] ^ key1;
        ctr[0] = n0;
        ctr[1] = lo1;
        ctr[2] = n2;
        ctr[3] = lo0;
        key0 += 0x9E3779B9u;
        key1 += 0xBB67AE85u;
    }
}

/* Uniform in [0, 1) with 24 random bits, for element counter c. Counter block c/4, lane c%4. */
CPEFT_HOST_DEVICE float cpeft_dropout_uniform(uint64_t seed, uint64_t c)
{
    uint64_t block = c >> 2;
    uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), 0u, 0u};
    cpeft_philox4x32_10(ctr, (uint32_t)seed, (uint32_t)(seed >> 32));
    return (float)(ctr[c & 3] >> 8) * (1.0f / 16777216.0f);
}

/* Whether element counter c is kept; kept values are multiplied by cpeft_dropout_keep_scale. */
CPEFT_HOST_DEVICE int cpeft_dropout_keep(const cpeft_dropout *d, uint64_t c)
{
    return cpeft_dropout_uniform(d->seed, d->offset + c) >= (float)d->p;
}

/* 1/(1-p), in double so the float64 path keeps full precision; 0 when everything is dropped. */
CPEFT_HOST_DEVICE double cpeft_dropout_keep_scale(double p)
{
    return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
}

#ifdef __cplusplus
}
#endif
#endif /* CPEFT_CORE_H */
