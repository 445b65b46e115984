/*
 * Merge / unmerge on the GPU with the exact-unmerge record of merge.h.
 *
 * Every element computes merged = round(W + d) and back = round(merged - d) (IA3: round(W * l),
 * round(merged / l)) with explicitly rounded fp32/fp64 operations, so compiler contraction
 * cannot make merge and unmerge disagree. Elements whose back differs from W bit for bit get a
 * record slot from a device counter. The slots are taken with atomics, so the record's ORDER is
 * unspecified on the GPU (its content is not): unmerge writes entries back by index, so order
 * does not matter. The count is read back to the host (the one synchronization, accepted
 * because merge is not a per-call path); unmerge also reads back the number of record indices
 * outside the weight, and refuses such a record before writing anything, as the CPU twin does.
 *
 * LoRA's d = s·B_k·A_k is built a row chunk at a time by cuBLAS into fp32 (fp64) scratch (and
 * kept in the caller's W-sized ΔW scratch of merge.h, which spares a later pass the GEMMs);
 * the chunking depends only on the shapes, so merge and unmerge run the same GEMMs and get the
 * same d bit for bit. A weight whose (OUT, IN) view is column-major (fan_in_fan_out) is walked
 * through its transpose so the elementwise pass streams through memory.
 */
#include "cpeft/merge.h"

#include "cpeft/views.h"
#include "gemm.cuh"
#include "kernel_support.cuh"
#include "status.cuh"
#include "stream_context.cuh"

#include <cstring>

namespace cpeft_cuda {
namespace {

const int64_t kChunkElems = (int64_t)1 << 22;

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

/* Bitwise equality: NaN payloads and signed zeros count, as memcmp does on the CPU. */
template <class T> __device__ __forceinline__ bool same_bits(T a, T b)
{
    if (sizeof(T) == 2) {
        unsigned short x, y;
        memcpy(&x, &a, 2);
        memcpy(&y, &b, 2);
        return x == y;
    }
    if (sizeof(T) == 4) {
        unsigned int x, y;
        memcpy(&x, &a, 4);
        memcpy(&y, &b, 4);
        return x == y;
    }
    unsigned long long x, y;
    memcpy(&x, &a, 8);
    memcpy(&y, &b, 8);
    return x == y;
}

/* Where a record entry goes: element (i, j) of the walked target is element
 * base + i*row + j*col of the logical view the record indexes. */
struct LinearIndex {
    int64_t base, row, col;
};

template <class T> struct RecordSink {
    int write;                  /* W is modified: unmerge, or merge with a record */
    int64_t *index;
    T *value;
    int64_t capacity;
    unsigned long long *counter;

    __device__ __forceinline__ void note(int64_t lin, T original) const
    {
        const unsigned long long slot = atomicAdd(counter, 1ull);
        if (write && (int64_t)slot < capacity) {
            index[slot] = lin;
            value[slot] = original;
        }
    }
};

template <class T>
static __global__ void merge_delta_kernel(int64_t rows, int64_t cols, T *w, int64_t w_rs,
                                          int64_t w_cs, const typename Num<T>::acc *d,
                                          LinearIndex li, int direction, RecordSink<T> sink)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x)
        for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
            T *p = &w[i * w_rs + j * w_cs];
            const Acc dv = d[i * cols + j];
            if (direction == CPEFT_UNMERGE) {
                *p = Num<T>::store(sub_rn(Num<T>::load(*p), dv));
                continue;
            }
            const T original = *p;
            const T merged = Num<T>::store(add_rn(Num<T>::load(original), dv));
            const T back = Num<T>::store(sub_rn(Num<T>::load(merged), dv));
            if (!same_bits(back, original))
                sink.note(li.base + i * li.row + j * li.col, original);
            if (sink.write)
                *p = merged;
        }
}

template <class T>
static __global__ void merge_scale_kernel(int64_t rows, int64_t cols, T *w, int64_t w_rs,
                                          int64_t w_cs, const T *l, int64_t l_stride,
                                          int along_cols, LinearIndex li, int direction,
                                          RecordSink<T> sink)
{
    typedef typename Num<T>::acc Acc;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x)
        for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
            T *p = &w[i * w_rs + j * w_cs];
            const Acc s = Num<T>::load(l[(along_cols ? j : i) * l_stride]);
            if (direction == CPEFT_UNMERGE) {
                *p = Num<T>::store(div_rn(Num<T>::load(*p), s));
                continue;
            }
            const T original = *p;
            const T merged = Num<T>::store(mul_rn(Num<T>::load(original), s));
            const T back = Num<T>::store(div_rn(Num<T>::load(merged), s));
            if (!same_bits(back, original))
                sink.note(li.base + i * li.row + j * li.col, original);
            if (sink.write)
                *p = merged;
        }
}

static __global__ void count_invalid_kernel(int64_t count, const int64_t *index, int64_t size,
                                            unsigned long long *invalid)
{
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < count;
         k += (int64_t)gridDim.x * blockDim.x)
        if (index[k] < 0 || index[k] >= size)
            atomicAdd(invalid, 1ull);
}

template <class T>
static __global__ void restore_kernel(int64_t count, const int64_t *index, const T *value,
                                      int64_t rows, int64_t cols, T *w, int64_t w_rs, int64_t w_cs)
{
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < count;
         k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t lin = index[k];
        if (lin < 0 || lin >= rows * cols)
            continue;
        const int64_t i = lin / cols, j = lin - i * cols;
        w[i * w_rs + j * w_cs] = value[k];
    }
}

bool rows_contiguous(const cpeft_mat &m) { return m.col_stride == 1 || m.cols <= 1; }

int read_counter(const unsigned long long *counter, int64_t *out, cudaStream_t stream,
                 cpeft_status *st)
{
    unsigned long long host = 0;
    CPEFT_CUDA_CHECK(st,
                     cudaMemcpyAsync(&host, counter, sizeof host, cudaMemcpyDeviceToHost, stream));
    CPEFT_CUDA_CHECK(st, cudaStreamSynchronize(stream));
    *out = (int64_t)host;
    return CPEFT_OK;
}

/* Checks direction and record like the CPU twin; for unmerge also every recorded index against
 * the view, on the device, before anything is written. */
int begin_pass(const char *op, int direction, const cpeft_merge_record *rec, const cpeft_mat &view,
               unsigned long long *counter, cudaStream_t stream, cpeft_status *st)
{
    if (direction != CPEFT_MERGE && direction != CPEFT_UNMERGE)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "%s: direction must be +1 or -1, got %d", op,
                          direction);
    if (rec == nullptr)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL, "%s: a merge record is required, got NULL", op);
    if (direction == CPEFT_UNMERGE && rec->delta != nullptr)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "%s: unmerge computes its own ΔW, got a delta scratch", op);
    CPEFT_CUDA_CHECK(st, cudaMemsetAsync(counter, 0, sizeof *counter, stream));
    if (direction == CPEFT_MERGE) {
        if (rec->index != nullptr && rec->value == nullptr)
            return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                              "%s: record has an index array but no value array", op);
        return CPEFT_OK;
    }
    if (rec->count < 0 || (rec->count > 0 && (rec->index == nullptr || rec->value == nullptr)))
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "%s: the record must hold count >= 0 entries with index and value "
                          "arrays, got count %lld",
                          op, (long long)rec->count);
    if (rec->count == 0)
        return CPEFT_OK;
    count_invalid_kernel<<<grid_1d(rec->count, 256), 256, 0, stream>>>(rec->count, rec->index,
                                                                       view.rows * view.cols,
                                                                       counter);
    CPEFT_LAUNCH_CHECK(st, "count_invalid_kernel");
    int64_t invalid = 0;
    CPEFT_TRY(read_counter(counter, &invalid, stream, st));
    if (invalid > 0)
        return cpeft_fail(st, CPEFT_ERR_INDEX,
                          "%s: %lld record indices are outside the %lld x %lld weight view", op,
                          (long long)invalid, (long long)view.rows, (long long)view.cols);
    return CPEFT_OK;
}

/* Unmerge: writes the recorded originals back. Merge: reads the exception count back. */
int end_pass(const char *op, cpeft_dtype dt, int direction, cpeft_merge_record *rec,
             const cpeft_mat &view, const unsigned long long *counter, cudaStream_t stream,
             cpeft_status *st)
{
    if (direction == CPEFT_UNMERGE) {
        if (rec->count == 0)
            return CPEFT_OK;
        return dispatch_float(dt, st, [&](auto tag) {
            typedef typename decltype(tag)::type T;
            restore_kernel<T><<<grid_1d(rec->count, 256), 256, 0, stream>>>(
                rec->count, rec->index, static_cast<const T *>(rec->value), view.rows, view.cols,
                static_cast<T *>(view.data), view.row_stride, view.col_stride);
            CPEFT_LAUNCH_CHECK(st, "restore_kernel");
            return (int)CPEFT_OK;
        });
    }
    int64_t count = 0;
    CPEFT_TRY(read_counter(counter, &count, stream, st));
    rec->count = count;
    if (rec->index != nullptr && count > rec->capacity)
        return cpeft_fail(st, CPEFT_ERR_CHANGED,
                          "%s: the record's capacity %lld (the count pass) is smaller than the "
                          "%lld elements to record: the weight changed during the call (written "
                          "by another thread?) and is now partially merged",
                          op, (long long)rec->capacity, (long long)count);
    return CPEFT_OK;
}

} /* namespace */
} /* namespace cpeft_cuda */

using namespace cpeft_cuda;

int cpeft_lora_merge_cuda(const cpeft_lora_linear_args *a, int direction, cpeft_merge_record *rec,
                          void *stream, cpeft_status *st)
{
    static const char op[] = "lora_merge";
    int64_t seg = 0, enabled_count = 0;
    CPEFT_TRY(cpeft_lora_groups(a, &seg, &enabled_count, st));
    const cpeft_dtype dt = a->dtype, acc = cpeft_acc_dtype(dt);
    const int64_t in = a->in, r = a->r;

    const bool transpose = !rows_contiguous(a->weight);
    const int64_t target_rows = transpose ? in : seg;
    const int64_t target_cols = transpose ? seg : in;
    int64_t chunk = target_cols > 0 ? kChunkElems / target_cols : 1;
    if (chunk < 1)
        chunk = 1;
    if (chunk > target_rows)
        chunk = target_rows > 0 ? target_rows : 1;

    /* With the caller's ΔW scratch (rec->delta) every chunk has its own place there (output
     * group g's Δ (or Δᵀ) compact from g·seg·IN on), and a pass with delta_ready reads it back
     * instead of running the GEMMs. The GEMMs still write to the workspace, as unmerge's do, and
     * the chunk is copied: cuBLAS may choose its kernel by the pointers' alignment, and unmerge
     * must get the same d bit for bit. */
    const bool kept_delta = rec != nullptr && rec->delta != nullptr;
    const bool run_gemms = !kept_delta || !rec->delta_ready;
    const size_t acc_elt = cpeft_dtype_size(acc);
    Session s;
    CPEFT_TRY(s.open(stream, st));
    void *ws = nullptr;
    const size_t d_bytes = (size_t)(chunk * target_cols) * acc_elt;
    CPEFT_TRY(s.workspace(ws_align(sizeof(unsigned long long)) + d_bytes, &ws, st));
    Carver carve(ws);
    unsigned long long *counter = static_cast<unsigned long long *>(
        carve.take(sizeof(unsigned long long)));
    void *d_data = carve.take(d_bytes);
    CPEFT_TRY(begin_pass(op, direction, rec, a->weight, counter, s.stream, st));

    const int write = direction == CPEFT_UNMERGE || rec->index != nullptr;
    for (int64_t grp = 0, k = 0; grp < a->groups; ++grp) {
        if (!a->enabled[grp])
            continue;
        const cpeft_mat a_k = cpeft_mat_sub(dt, a->lora_a, k * r, r, 0, in);
        const cpeft_mat b_k = cpeft_mat_sub(dt, a->lora_b, k * seg, seg, 0, r);
        const cpeft_mat w_k = cpeft_mat_sub(dt, a->weight, grp * seg, seg, 0, in);
        const cpeft_mat left = transpose ? cpeft_mat_transpose(a_k) : b_k;
        const cpeft_mat right = transpose ? cpeft_mat_transpose(b_k) : a_k;
        const cpeft_mat target = transpose ? cpeft_mat_transpose(w_k) : w_k;
        ++k;
        for (int64_t row0 = 0; row0 < target_rows; row0 += chunk) {
            const int64_t n = target_rows - row0 < chunk ? target_rows - row0 : chunk;
            void *kept = kept_delta ? static_cast<char *>(rec->delta) +
                                          (size_t)(grp * seg * in + row0 * target_cols) * acc_elt
                                    : nullptr;
            const size_t chunk_bytes = (size_t)(n * target_cols) * acc_elt;
            if (run_gemms) {
                CPEFT_TRY(gemm(s, dt, acc, a->scale, cpeft_mat_sub(dt, left, row0, n, 0, r), right,
                               0.0, cpeft_mat_compact(d_data, n, target_cols), st));
                if (kept_delta && chunk_bytes > 0)
                    CPEFT_CUDA_CHECK(st, cudaMemcpyAsync(kept, d_data, chunk_bytes,
                                                         cudaMemcpyDeviceToDevice, s.stream));
            }
            const void *d_place = run_gemms ? d_data : kept;
            const cpeft_mat part = cpeft_mat_sub(dt, target, row0, n, 0, target_cols);
            const LinearIndex li = transpose ? LinearIndex{grp * seg * in + row0, 1, in}
                                             : LinearIndex{(grp * seg + row0) * in, in, 1};
            CPEFT_TRY(dispatch_float(dt, st, [&](auto tag) {
                typedef typename decltype(tag)::type T;
                typedef typename Num<T>::acc Acc;
                const RecordSink<T> sink = {write, rec->index, static_cast<T *>(rec->value),
                                            rec->capacity, counter};
                merge_delta_kernel<T><<<grid_2d(n, target_cols), 256, 0, s.stream>>>(
                    n, target_cols, static_cast<T *>(part.data), part.row_stride, part.col_stride,
                    static_cast<const Acc *>(d_place), li, direction, sink);
                CPEFT_LAUNCH_CHECK(st, "merge_delta_kernel");
                return (int)CPEFT_OK;
            }));
        }
    }
    return end_pass(op, dt, direction, rec, a->weight, counter, s.stream, st);
}

int cpeft_ia3_merge_cuda(cpeft_dtype dtype, cpeft_mat target, cpeft_vec l, int along_cols,
                         int direction, cpeft_merge_record *rec, void *stream, cpeft_status *st)
{
    static const char op[] = "ia3_merge";
    Session s;
    CPEFT_TRY(s.open(stream, st));
    void *ws = nullptr;
    CPEFT_TRY(s.workspace(sizeof(unsigned long long), &ws, st));
    unsigned long long *counter = static_cast<unsigned long long *>(ws);
    CPEFT_TRY(begin_pass(op, direction, rec, target, counter, s.stream, st));

    cpeft_mat walk = target;
    LinearIndex li = {0, target.cols, 1};
    if (!rows_contiguous(target)) {
        walk = cpeft_mat_transpose(target);
        along_cols = !along_cols;
        li = LinearIndex{0, 1, target.cols};
    }
    const int write = direction == CPEFT_UNMERGE || rec->index != nullptr;
    if (walk.rows > 0 && walk.cols > 0)
        CPEFT_TRY(dispatch_float(dtype, st, [&](auto tag) {
            typedef typename decltype(tag)::type T;
            const RecordSink<T> sink = {write, rec->index, static_cast<T *>(rec->value),
                                        rec->capacity, counter};
            merge_scale_kernel<T><<<grid_2d(walk.rows, walk.cols), 256, 0, s.stream>>>(
                walk.rows, walk.cols, static_cast<T *>(walk.data), walk.row_stride, walk.col_stride,
                static_cast<const T *>(l.data), l.stride, along_cols, li, direction, sink);
            CPEFT_LAUNCH_CHECK(st, "merge_scale_kernel");
            return (int)CPEFT_OK;
        }));
    return end_pass(op, dtype, direction, rec, target, counter, s.stream, st);
}
