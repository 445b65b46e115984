/*
 * Entry point exposing the dropout mask as data (cpeft/dropout.h): the ops regenerate it from
 * (seed, offset) and never store it; tests and curious callers get it here.
 */
#include "py_ops.h"

const char cpeft_doc_dropout_mask[] =
    "dropout_mask(out, p, seed, offset=0, *, stream=None)\n--\n\n"
    "Write the dropout mask of an (M, IN) input into out, shape (M, IN) or (..., IN) flattened\n"
    "to rows: element (m, i) is 1/(1-p) where counter offset + m*IN + i is kept, else 0.\n"
    "Returns out.";

PyObject *cpeft_py_dropout_mask(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"out", "p", "seed", "offset", "stream", NULL};
    PyObject *out_obj, *p_obj, *seed_obj, *offset_obj = NULL, *stream = Py_None;
    double p = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O$O:dropout_mask", kwlist, &out_obj,
                                     &p_obj, &seed_obj, &offset_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_init(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_dropout d = {0};
    cpeft_mat mask;
    cpeft_tensor *out = cpeft_call_input(&call, out_obj, "out", CPEFT_ROLE_OUTPUT);
    if (out == NULL || cpeft_check_float_dtype(&call, out, NULL) < 0 ||
        cpeft_parse_real(p_obj, "p", &p) < 0 || cpeft_check_probability(p, "p") < 0 || cpeft_parse_u64(seed_obj, "seed", &d.seed) < 0 ||
        cpeft_parse_u64(offset_obj, "offset", &d.offset) < 0 ||
        cpeft_tensor_mat(&call, out, 0, &mask) < 0) {
        goto finish;
    }
    d.p = p;

    int rc;
    CPEFT_DISPATCH(&call, rc,
                   cpeft_dropout_mask_cpu((cpeft_dtype)out->dtype, &d, mask, &call.status),
                   cpeft_dropout_mask_cuda((cpeft_dtype)out->dtype, &d, mask, call.stream,
                                           &call.status));
    if (rc != CPEFT_OK) {
        cpeft_raise_status(call.state, &call.status);
        goto finish;
    }
    ret = Py_NewRef(out->source);

finish:
    cpeft_call_release(&call);
    return ret;
}
