/*
 * The DLPack exchange structs cpeft consumes, written for this project from the DLPack 1.x ABI
 * (dmlc/dlpack). Only what the boundary reads is declared: the layout of every struct matches the
 * ABI exactly, so capsules from torch, NumPy, CuPy and JAX can be read through these definitions.
 *
 * Two exchange structs exist. The legacy DLManagedTensor (capsule "dltensor") starts with the
 * tensor; the versioned one (capsule "dltensor_versioned", DLPack >= 1.0) starts with the
 * ABI-frozen version/manager_ctx/deleter/flags block and ends with the tensor, so a consumer that
 * meets an unknown major version may touch nothing but the deleter.
 */
#ifndef CPEFT_PY_DLPACK_H
#define CPEFT_PY_DLPACK_H

#include <stdint.h>

/* The newest version this consumer understands; producers may answer with any 1.x minor. */
#define CPEFT_DLPACK_MAJOR 1
#define CPEFT_DLPACK_MINOR 1

#define CPEFT_DLPACK_FLAG_READ_ONLY ((uint64_t)1 << 0)

typedef enum {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,   /* pinned host memory: readable by the CPU like kDLCPU */
} DLDeviceType;

typedef enum {
    kDLInt = 0,
    kDLUInt = 1,
    kDLFloat = 2,
    kDLOpaqueHandle = 3,
    kDLBfloat = 4,
    kDLComplex = 5,
    kDLBool = 6,
} DLDataTypeCode;

typedef struct {
    uint32_t major;
    uint32_t minor;
} DLPackVersion;

typedef struct {
    int32_t device_type;   /* a DLDeviceType; int32_t keeps the ABI width for unknown values */
    int32_t device_id;
} DLDevice;

typedef struct {
    uint8_t code;          /* a DLDataTypeCode */
    uint8_t bits;
    uint16_t lanes;
} DLDataType;

typedef struct {
    void *data;            /* may be NULL for a tensor with no elements */
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;      /* in elements; NULL means compact row-major (producers before 1.2) */
    uint64_t byte_offset;  /* added to data to reach the first element */
} DLTensor;

typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;

/*
 * The DLPack C exchange API (DLPack >= 1.2): a table of C functions a framework offers on its
 * tensor type as the capsule `type(t).__dlpack_c_exchange_api__` ("dlpack_exchange_api"), so a
 * consumer exports a tensor without a Python call or a capsule (torch >= 2.10 has it). Only the
 * header is ABI-frozen; the entries after it are read when its major version is 1.
 */
typedef struct DLPackExchangeAPIHeader {
    DLPackVersion version;
    struct DLPackExchangeAPIHeader *prev_api;
} DLPackExchangeAPIHeader;

typedef struct {
    DLPackExchangeAPIHeader header;
    int (*managed_tensor_allocator)(DLTensor *prototype, DLManagedTensorVersioned **out,
                                    void *error_ctx,
                                    void (*set_error)(void *, const char *, const char *));
    /* An owning export (the deleter gives it back), with no stream synchronization: 0, or -1
     * with a Python exception set. */
    int (*managed_tensor_from_py_object_no_sync)(void *py_object, DLManagedTensorVersioned **out);
    int (*managed_tensor_to_py_object_no_sync)(DLManagedTensorVersioned *tensor, void **out);
    int (*dltensor_from_py_object_no_sync)(void *py_object, DLTensor *out);
    /* The framework's current stream on a device (NULL: its default stream). */
    int (*current_work_stream)(int32_t device_type, int32_t device_id, void **out_stream);
} DLPackExchangeAPI;

#endif /* CPEFT_PY_DLPACK_H */
