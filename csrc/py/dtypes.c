/*
 * The float dtype table of csrc/py (see dtypes.h) and its Python query.
 */
#include "dtypes.h"

#include "tensor.h"

/* In the order messages list them; CPEFT_DTYPE_UNSUPPORTED ends each list. */
static const int cpu_float_dtypes[] = {CPEFT_FLOAT32, CPEFT_FLOAT64, CPEFT_DTYPE_UNSUPPORTED};
static const int cuda_float_dtypes[] = {CPEFT_FLOAT32, CPEFT_FLOAT16, CPEFT_BFLOAT16, CPEFT_FLOAT64,
                                        CPEFT_DTYPE_UNSUPPORTED};
/* Beside these compute dtypes lora_a / lora_b may be float32 (peft's autocast_adapter_dtype master
 * weights): the products read them rounded to the compute dtype (cpeft/lora_linear.h). */
static const int fp32_adapter_compute_dtypes[] = {CPEFT_FLOAT16, CPEFT_BFLOAT16,
                                                  CPEFT_DTYPE_UNSUPPORTED};

static int listed(const int *d, int dtype)
{
    for (; *d != CPEFT_DTYPE_UNSUPPORTED; ++d) {
        if (*d == dtype) {
            return 1;
        }
    }
    return 0;
}

static const int *float_dtypes(int on_cuda)
{
    return on_cuda ? cuda_float_dtypes : cpu_float_dtypes;
}

int cpeft_float_dtype_supported(int dtype, int on_cuda)
{
    return listed(float_dtypes(on_cuda), dtype);
}

int cpeft_takes_fp32_adapters(int dtype) { return listed(fp32_adapter_compute_dtypes, dtype); }

void cpeft_format_float_dtypes(char *buf, size_t size, int on_cuda)
{
    const int *d = float_dtypes(on_cuda);
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; d[i] != CPEFT_DTYPE_UNSUPPORTED && used < size; ++i) {
        const char *sep = i == 0 ? "" : d[i + 1] == CPEFT_DTYPE_UNSUPPORTED ? " or " : ", ";
        used += (size_t)snprintf(buf + used, size - used, "%s%s", sep, cpeft_dtype_name(d[i]));
    }
}

static PyObject *dtype_names(const int *d)
{
    int n = 0;
    while (d[n] != CPEFT_DTYPE_UNSUPPORTED)
        ++n;
    PyObject *names = PyTuple_New(n);
    for (int i = 0; names != NULL && i < n; ++i) {
        PyObject *name = PyUnicode_FromString(cpeft_dtype_name(d[i]));
        if (name == NULL) {
            Py_CLEAR(names);
            break;
        }
        PyTuple_SET_ITEM(names, i, name);
    }
    return names;
}

const char cpeft_doc_supported_dtypes[] =
    "supported_dtypes()\n--\n\n"
    "The float dtypes the kernels take on each device type: {'cpu': ('float32', 'float64'),\n"
    "'cuda': (...)}. CUDA is listed whether or not this build has it.";

PyObject *cpeft_py_supported_dtypes(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    PyObject *cpu = dtype_names(cpu_float_dtypes), *cuda = dtype_names(cuda_float_dtypes);
    PyObject *table = NULL;
    if (cpu != NULL && cuda != NULL) {
        table = Py_BuildValue("{s:O,s:O}", "cpu", cpu, "cuda", cuda);
    }
    Py_XDECREF(cpu);
    Py_XDECREF(cuda);
    return table;
}

const char cpeft_doc_accumulation_dtypes[] =
    "accumulation_dtypes()\n--\n\n"
    "The dtype each float dtype's products and sums accumulate in, by name: {'float16':\n"
    "'float32', ...}; also the dtype of a merge's ΔW scratch (the `delta` of lora_merge).";

PyObject *cpeft_py_accumulation_dtypes(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    PyObject *table = PyDict_New();
    for (const int *d = cuda_float_dtypes; table != NULL && *d != CPEFT_DTYPE_UNSUPPORTED; ++d) {
        PyObject *acc = PyUnicode_FromString(cpeft_dtype_name(cpeft_acc_dtype((cpeft_dtype)*d)));
        if (acc == NULL || PyDict_SetItemString(table, cpeft_dtype_name(*d), acc) < 0) {
            Py_CLEAR(table);
        }
        Py_XDECREF(acc);
    }
    return table;
}

const char cpeft_doc_fp32_adapter_compute_dtypes[] =
    "fp32_adapter_compute_dtypes()\n--\n\n"
    "The compute dtypes (of x and weight) beside which lora_linear_forward and\n"
    "lora_linear_backward take float32 lora_a and lora_b as they are: ('float16', 'bfloat16').\n"
    "Only the CUDA kernels take these compute dtypes at all.";

PyObject *cpeft_py_fp32_adapter_compute_dtypes(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return dtype_names(fp32_adapter_compute_dtypes);
}
