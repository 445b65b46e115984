/*
 * DLPack at the boundary: asking a producer (torch, CuPy, JAX, ...) to export a tensor
 * (obj.__dlpack__), consuming the capsule into a cpeft_tensor, and handing the tensor back to its
 * producer when the call ends. Both capsule kinds are read: legacy "dltensor" and versioned
 * "dltensor_versioned" (dlpack.h has the ABI).
 */
#ifndef CPEFT_PY_DLPACK_IMPORT_H
#define CPEFT_PY_DLPACK_IMPORT_H

#include "tensor.h"

/* obj.__dlpack__ after obj.__dlpack_device__: a new reference to the capsule, or NULL with a
 * BufferError naming `name`. A CUDA producer is passed `stream` (the DLPack stream integer). */
PyObject *cpeft_dlpack_export(PyObject *obj, const char *name, uintptr_t stream);

/* Consume capsule (renaming it used_*) and fill t (whose name is set) from its tensor. From the
 * rename on, t owns the producer's tensor: cpeft_dlpack_release must run, also after a failure
 * here. Returns -1 with an exception naming t on failure. */
int cpeft_dlpack_import(PyObject *capsule, cpeft_tensor *t);

/* Like cpeft_dlpack_import, for a versioned export t takes over (from the exchange API). */
int cpeft_dlpack_import_versioned(DLManagedTensorVersioned *m, cpeft_tensor *t);

/* The DLPack C exchange API of obj's type that the boundary uses to export it without a Python
 * call, cached per type in state; NULL when there is none (an error is set only when looking it
 * up raised). May run Python code: call it before any pointer is taken. */
const DLPackExchangeAPI *cpeft_dlpack_exchange_api(cpeft_state *state, PyObject *obj);

/* An owning export of obj through api. NULL with a BufferError naming `name` when the export
 * fails; NULL without an error for a CUDA tensor whose producer works on another stream than
 * stream_value (the DLPack stream integer of the call): export it through __dlpack__ then, which
 * orders the two streams. */
DLManagedTensorVersioned *cpeft_dlpack_exchange_export(const DLPackExchangeAPI *api, PyObject *obj,
                                                       const char *name, uintptr_t stream_value);

/* Call the producer's deleter of the tensor t consumed, if any (may run Python code). */
void cpeft_dlpack_release(cpeft_tensor *t);

#endif /* CPEFT_PY_DLPACK_IMPORT_H */
