/*
 * The extension module cpeft._C: multi-phase init, per-module state (the CudaError type), the
 * method table of the entry points defined in py_*.c, and build/device queries.
 */
#define CPEFT_MODULE_TU
#include "boundary.h"
#include "cpeft/compute_api.h"
#include "device.h"
#include "dtypes.h"

#ifndef CPEFT_BUILD_BLAS
#define CPEFT_BUILD_BLAS "unknown"
#endif

cpeft_state *cpeft_get_state(PyObject *module) { return (cpeft_state *)PyModule_GetState(module); }

PyDoc_STRVAR(has_cuda_doc,
             "has_cuda()\n--\n\n"
             "True when cpeft was compiled with CUDA and at least one CUDA device is visible.");

static PyObject *has_cuda(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
#ifdef CPEFT_WITH_CUDA
    return PyBool_FromLong(cpeft_cuda_device_count() > 0);
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(
    build_info_doc,
    "build_info()\n--\n\n"
    "How this copy of cpeft was built: a dict with 'cuda' (bool), 'cuda_version' and 'cuda_archs'\n"
    "(str, or None without CUDA), 'blas' (the CPU BLAS library and version) and 'debug' (bool).");

static PyObject *build_info(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
#ifdef CPEFT_WITH_CUDA
    PyObject *cuda = Py_True, *version = PyUnicode_FromString(CPEFT_BUILD_CUDA_VERSION),
             *archs = PyUnicode_FromString(CPEFT_BUILD_CUDA_ARCHS);
#else
    PyObject *cuda = Py_False, *version = Py_NewRef(Py_None), *archs = Py_NewRef(Py_None);
#endif
#ifdef CPEFT_BUILD_DEBUG
    PyObject *debug = Py_True;
#else
    PyObject *debug = Py_False;
#endif
    PyObject *info = NULL;
    if (version != NULL && archs != NULL) {
        info = Py_BuildValue("{s:O,s:O,s:O,s:s,s:O}", "cuda", cuda, "cuda_version", version,
                             "cuda_archs", archs, "blas", CPEFT_BUILD_BLAS, "debug", debug);
    }
    Py_XDECREF(version);
    Py_XDECREF(archs);
    return info;
}

#define CPEFT_ENTRY(name)                                                                \
    {#name, (PyCFunction)(void (*)(void))cpeft_py_##name, METH_FASTCALL | METH_KEYWORDS, \
     cpeft_doc_##name}

static PyMethodDef cpeft_methods[] = {
    CPEFT_ENTRY(lora_linear_forward),
    CPEFT_ENTRY(lora_linear_backward),
    CPEFT_ENTRY(lora_embedding_forward),
    CPEFT_ENTRY(lora_embedding_backward),
    CPEFT_ENTRY(ia3_linear_forward),
    CPEFT_ENTRY(ia3_linear_backward),
    CPEFT_ENTRY(ia3_embedding_forward),
    CPEFT_ENTRY(ia3_embedding_backward),
    CPEFT_ENTRY(lora_merge),
    CPEFT_ENTRY(lora_unmerge),
    CPEFT_ENTRY(lora_embedding_merge),
    CPEFT_ENTRY(lora_embedding_unmerge),
    CPEFT_ENTRY(ia3_merge),
    CPEFT_ENTRY(ia3_unmerge),
    CPEFT_ENTRY(ia3_embedding_merge),
    CPEFT_ENTRY(ia3_embedding_unmerge),
    CPEFT_ENTRY(dropout_mask),
    CPEFT_ENTRY(dora_weight_sq_norm),
    CPEFT_ENTRY(dora_weight_norm),
    CPEFT_ENTRY(dora_linear_forward),
    CPEFT_ENTRY(dora_linear_backward),
    CPEFT_ENTRY(dora_embedding_forward),
    CPEFT_ENTRY(dora_embedding_backward),
    CPEFT_ENTRY(lora_grouped_forward),
    CPEFT_ENTRY(lora_grouped_backward),
    CPEFT_ENTRY(cuda_reserve_workspace),
    {"has_cuda", has_cuda, METH_NOARGS, has_cuda_doc},
    {"build_info", build_info, METH_NOARGS, build_info_doc},
    {"supported_dtypes", cpeft_py_supported_dtypes, METH_NOARGS, cpeft_doc_supported_dtypes},
    {"accumulation_dtypes", cpeft_py_accumulation_dtypes, METH_NOARGS,
     cpeft_doc_accumulation_dtypes},
    {"fp32_adapter_compute_dtypes", cpeft_py_fp32_adapter_compute_dtypes, METH_NOARGS,
     cpeft_doc_fp32_adapter_compute_dtypes},
    {NULL, NULL, 0, NULL},
};

static int cpeft_exec(PyObject *module)
{
    if (_import_array() < 0) {
        return -1;
    }
    cpeft_state *state = cpeft_get_state(module);
    state->CudaError = PyErr_NewExceptionWithDoc(
        "cpeft.CudaError",
        "A CUDA runtime or cuBLAS call made by cpeft failed; the message names the call, the "
        "status and where it happened.",
        PyExc_RuntimeError, NULL);
    if (state->CudaError == NULL) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "CudaError", state->CudaError) < 0) {
        return -1;
    }
    static const cpeft_compute_api compute_api = {
        .version = CPEFT_COMPUTE_API_VERSION,
        .lora_linear_fwd_cpu = cpeft_lora_linear_fwd_cpu,
        .lora_linear_bwd_cpu = cpeft_lora_linear_bwd_cpu,
    };
    PyObject *capsule = PyCapsule_New((void *)&compute_api, CPEFT_COMPUTE_API_CAPSULE, NULL);
    if (capsule == NULL) {
        return -1;
    }
    int rc = PyModule_AddObjectRef(module, "_compute_api", capsule);
    Py_DECREF(capsule);
    return rc;
}

static int cpeft_traverse(PyObject *module, visitproc visit, void *arg)
{
    cpeft_state *state = cpeft_get_state(module);
    Py_VISIT(state->CudaError);
    for (int i = 0; i < CPEFT_EXCHANGE_API_CACHE; ++i)
        Py_VISIT(state->exchange_apis[i].type);
    return 0;
}

static int cpeft_clear(PyObject *module)
{
    cpeft_state *state = cpeft_get_state(module);
    Py_CLEAR(state->CudaError);
    for (int i = 0; i < CPEFT_EXCHANGE_API_CACHE; ++i) {
        Py_CLEAR(state->exchange_apis[i].type);
        state->exchange_apis[i].api = NULL;
    }
    return 0;
}

static void cpeft_free(void *module) { cpeft_clear((PyObject *)module); }

static PyModuleDef_Slot cpeft_slots[] = {
    {Py_mod_exec, cpeft_exec},
    {0, NULL},
};

static struct PyModuleDef cpeft_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cpeft._C",
    .m_doc = "cpeft's C core: LoRA and IA3 forward, backward and merge on CPU (OpenBLAS) and "
             "CUDA (cuBLAS). Use cpeft.functional; these entry points take caller-owned outputs.",
    .m_size = sizeof(cpeft_state),
    .m_methods = cpeft_methods,
    .m_slots = cpeft_slots,
    .m_traverse = cpeft_traverse,
    .m_clear = cpeft_clear,
    .m_free = cpeft_free,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&cpeft_module); }
