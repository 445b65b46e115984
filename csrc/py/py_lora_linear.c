/*
 * Entry points of LoRA linear (loralib Linear and MergedLinear): forward and backward.
 * Dimension letters as in cpeft/lora_linear.h: x (..., IN) flattened to M rows, weight viewed as
 * (OUT, IN), R the rank, G groups of which K are enabled, SEG = OUT / G.
 */
#include "params.h"

#include <string.h>

const char cpeft_doc_lora_linear_forward[] =
    "lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, *, fan_in_fan_out=False, "
    "enable_lora=None, dropout=0.0, seed=0, offset=0, out=None, out_xa=None, stream=None)\n--\n\n"
    "y = x W^T + bias + scale * scatter(drop(x) A^T B^T); returns (y, xa) with xa = drop(x) A^T.\n"
    "out / out_xa: None or True allocate NumPy arrays (NumPy inputs only), or arrays to write.";

PyObject *cpeft_py_lora_linear_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames)
{
    static char *kwlist[] = {
        "x",           "weight",  "bias", "lora_a", "lora_b", "scale",  "fan_in_fan_out",
        "enable_lora", "dropout", "seed", "offset", "out",    "out_xa", "stream",
        NULL};
    PyObject *x_obj, *weight_obj, *bias_obj, *lora_a_obj, *lora_b_obj, *scale;
    PyObject *enable_lora = Py_None, *p = NULL, *seed = NULL, *offset = NULL, *out_obj = Py_None,
             *out_xa_obj = Py_None, *stream = Py_None;
    int fan_in_fan_out = 0;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOOO|$pOOOOOOO:lora_linear_forward", kwlist,
                          &x_obj, &weight_obj, &bias_obj, &lora_a_obj, &lora_b_obj, &scale,
                          &fan_in_fan_out, &enable_lora, &p, &seed, &offset, &out_obj, &out_xa_obj,
                          &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_lora_linear_args a = {0};
    cpeft_lora_linear_fwd_out o = {0};
    cpeft_tensor *weight, *bias, *y, *xa;
    double scale_value;
    cpeft_groups groups;
    PyObject *const tensor_objs[] = {x_obj,    weight_obj, lora_a_obj, lora_b_obj,
                                     bias_obj, out_obj,    out_xa_obj};
    static const char *const tensor_names[] = {"x",    "weight", "lora_a", "lora_b",
                                               "bias", "out",    "out_xa"};
    if (cpeft_py_lora_linear_scalars(scale, enable_lora, &scale_value, &groups) < 0 ||
        cpeft_parse_dropout(p, seed, offset, &a.dropout) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 7) < 0) {
        goto finish;
    }

    cpeft_tensor *x = cpeft_call_input(&call, x_obj, "x", CPEFT_ROLE_INPUT);
    if (x == NULL || cpeft_check_min_ndim(x, 1) < 0 || cpeft_check_float_dtype(x, NULL) < 0 ||
        cpeft_py_lora_linear_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                    scale_value, fan_in_fan_out, &groups, x, 1, &a, &weight) < 0 ||
        cpeft_call_optional_input(&call, bias_obj, "bias", &bias) < 0) {
        goto finish;
    }
    if (bias != NULL) {
        if (cpeft_check_float_dtype(bias, x) < 0 ||
            cpeft_check_shape(bias, 1, &a.out, "(out_features,)") < 0 ||
            cpeft_tensor_vec(bias, &a.bias) < 0) {
            goto finish;
        }
    }
    a.m = cpeft_leading_numel(x);
    if (cpeft_py_lora_fwd_outputs(&call, out_obj, out_xa_obj, x, a.out, a.lora_a.rows, &y, &xa) <
            0 ||
        cpeft_tensor_mat(x, 0, &a.x) < 0 || cpeft_tensor_mat(y, 0, &o.y) < 0 ||
        cpeft_tensor_mat(xa, 0, &o.xa) < 0 || cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_lora_linear_fwd_cpu(&a, &o, &call.status),
                   cpeft_lora_linear_fwd_cuda(&a, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = PyTuple_Pack(2, y->source, xa->source);
    }

finish:
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_lora_linear_backward[] =
    "lora_linear_backward(grad_out, x, weight, lora_a, lora_b, xa, scale, *, "
    "fan_in_fan_out=False, enable_lora=None, dropout=0.0, seed=0, offset=0, grad_x=True, "
    "grad_lora_a=True, grad_lora_b=True, grad_bias=False, grad_weight=False, stream=None)\n--\n\n"
    "Gradients of lora_linear_forward, returned as (x, lora_a, lora_b, bias, weight) with None\n"
    "where not requested. Each grad_* is False/None (skip), True (allocate NumPy) or an array.";

PyObject *cpeft_py_lora_linear_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames)
{
    static char *kwlist[] = {
        "grad_out",       "x",           "weight",      "lora_a", "lora_b", "xa",     "scale",
        "fan_in_fan_out", "enable_lora", "dropout",     "seed",   "offset", "grad_x", "grad_lora_a",
        "grad_lora_b",    "grad_bias",   "grad_weight", "stream", NULL};
    PyObject *grad_out_obj, *x_obj, *weight_obj, *lora_a_obj, *lora_b_obj, *xa_obj, *scale;
    PyObject *enable_lora = Py_None, *p = NULL, *seed = NULL, *offset = NULL, *stream = Py_None;
    PyObject *grad_x_obj = Py_True, *grad_a_obj = Py_True, *grad_b_obj = Py_True,
             *grad_bias_obj = Py_False, *grad_weight_obj = Py_False;
    int fan_in_fan_out = 0;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOOOO|$pOOOOOOOOOO:lora_linear_backward", kwlist,
                          &grad_out_obj, &x_obj, &weight_obj, &lora_a_obj, &lora_b_obj, &xa_obj,
                          &scale, &fan_in_fan_out, &enable_lora, &p, &seed, &offset, &grad_x_obj,
                          &grad_a_obj, &grad_b_obj, &grad_bias_obj, &grad_weight_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_lora_linear_args a = {0};
    cpeft_lora_linear_bwd_in in = {0};
    cpeft_lora_linear_bwd_out o = {0};
    cpeft_tensor *weight, *grad_out, *xa;
    cpeft_py_lora_grads grads = {0};
    int64_t shape[CPEFT_MAX_NDIM];
    double scale_value;
    cpeft_groups groups;
    PyObject *const tensor_objs[] = {grad_out_obj, x_obj,         weight_obj,     lora_a_obj,
                                     lora_b_obj,   xa_obj,        grad_x_obj,     grad_a_obj,
                                     grad_b_obj,   grad_bias_obj, grad_weight_obj};
    static const char *const tensor_names[] = {
        "grad_out", "x",           "weight",      "lora_a",    "lora_b",     "xa",
        "grad_x",   "grad_lora_a", "grad_lora_b", "grad_bias", "grad_weight"};
    if (cpeft_py_lora_linear_scalars(scale, enable_lora, &scale_value, &groups) < 0 ||
        cpeft_parse_dropout(p, seed, offset, &a.dropout) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 11) < 0) {
        goto finish;
    }

    cpeft_tensor *x = cpeft_call_input(&call, x_obj, "x", CPEFT_ROLE_INPUT);
    if (x == NULL || cpeft_check_min_ndim(x, 1) < 0 || cpeft_check_float_dtype(x, NULL) < 0 ||
        cpeft_py_lora_linear_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                    scale_value, fan_in_fan_out, &groups, x, 1, &a, &weight) < 0) {
        goto finish;
    }
    int ndim = cpeft_py_leading_shape_with(x, a.out, shape);
    grad_out = cpeft_call_input(&call, grad_out_obj, "grad_out", CPEFT_ROLE_INPUT);
    if (grad_out == NULL || cpeft_check_float_dtype(grad_out, x) < 0 ||
        cpeft_check_shape(grad_out, ndim, shape, "x.shape[:-1] + (out_features,)") < 0) {
        goto finish;
    }
    cpeft_py_leading_shape_with(x, a.lora_a.rows, shape);
    xa = cpeft_call_input(&call, xa_obj, "xa", CPEFT_ROLE_INPUT);
    if (xa == NULL || cpeft_check_float_dtype(xa, x) < 0 ||
        cpeft_check_shape(xa, ndim, shape, "x.shape[:-1] + (r*k,)") < 0) {
        goto finish;
    }
    a.m = cpeft_leading_numel(x);
    PyObject *const grad_requests[] = {grad_x_obj, grad_a_obj, grad_b_obj, grad_bias_obj,
                                       grad_weight_obj};
    if (cpeft_py_lora_grad_outputs(&call, grad_requests, x, weight, a.out, &a.lora_a, &a.lora_b,
                                   a.fp32_adapters ? CPEFT_FLOAT32 : x->dtype, &grads) < 0 ||
        cpeft_tensor_mat(x, 0, &a.x) < 0 || cpeft_tensor_mat(grad_out, 0, &in.grad_out) < 0 ||
        cpeft_tensor_mat(xa, 0, &in.xa) < 0 ||
        cpeft_py_lora_grad_views(&grads, fan_in_fan_out, &o.grad_x, &o.grad_a, &o.grad_b,
                                 &o.grad_bias, &o.grad_weight) < 0 ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_lora_linear_bwd_cpu(&a, &in, &o, &call.status),
                   cpeft_lora_linear_bwd_cuda(&a, &in, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = cpeft_py_lora_grads_tuple(&grads);
    }

finish:
    return cpeft_call_end(&call, ret);
}
