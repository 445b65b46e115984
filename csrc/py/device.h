/*
 * Devices at the boundary: where a call's tensors live (all on one device, checked as each is
 * acquired) and, around the compute, making the tensors' CUDA device current and restoring the
 * caller's afterwards.
 */
#ifndef CPEFT_PY_DEVICE_H
#define CPEFT_PY_DEVICE_H

#include "boundary.h"

typedef enum {
    CPEFT_DEVICE_CPU = 1,
    CPEFT_DEVICE_CUDA = 2,
} cpeft_device_type;

/* The device of a call: set by its first tensor (owner, named in messages), met by the others. */
typedef struct {
    int type;            /* cpeft_device_type */
    int id;
    const char *owner;   /* NULL until the first tensor is acquired */
} cpeft_device;

/* A tensor `name` on (type, id) joins the call's device: the first sets it, any other must match
 * (ValueError naming both tensors and devices otherwise). */
int cpeft_device_join(cpeft_device *device, const char *name, int type, int id);

/* Without the GIL: make device_id current (its previous one in *previous), and restore it. */
int cpeft_device_enter(int device_id, int *previous, cpeft_status *st);
void cpeft_device_leave(int previous);
int cpeft_cuda_device_count(void);

#endif /* CPEFT_PY_DEVICE_H */
