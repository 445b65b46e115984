/*
 * Entry points of LoRA linear (loralib Linear and MergedLinear): forward and backward.
 * Dimension letters as in cpeft/lora_linear.h: x (..., IN) flattened to M rows, weight viewed as
 * (OUT, IN), R the rank, G groups of which K are enabled, SEG = OUT / G.
 */
#include "py_ops.h"

#include <string.h>

/* lora_a's dtype: the weight's, or float32 beside a float16/bfloat16 weight when allowed. */
static int check_lora_a_dtype(const cpeft_call *call, const cpeft_tensor *la,
                              const cpeft_tensor *w, int allow_fp32_adapters)
{
    int sixteen_bit = w->dtype == CPEFT_FLOAT16 || w->dtype == CPEFT_BFLOAT16;
    if (allow_fp32_adapters && sixteen_bit && la->dtype == CPEFT_FLOAT32) {
        return 0;
    }
    if (allow_fp32_adapters && sixteen_bit && la->dtype != w->dtype) {
        PyErr_Format(PyExc_ValueError, "%s must have the dtype of %s (%s) or float32, got %s",
                     la->name, w->name, w->dtype_name, la->dtype_name);
        return -1;
    }
    return cpeft_check_float_dtype(call, la, w);
}

int cpeft_py_lora_linear_params(cpeft_call *call, PyObject *weight_obj, cpeft_role weight_role,
                                PyObject *lora_a_obj, PyObject *lora_b_obj, double scale,
                                int fan_in_fan_out, const cpeft_groups *groups,
                                const cpeft_tensor *x, int allow_fp32_adapters,
                                cpeft_lora_linear_args *a,
                                cpeft_tensor **weight)
{
    cpeft_tensor *w = cpeft_call_input(call, weight_obj, "weight", weight_role);
    if (w == NULL || cpeft_check_ndim(w, 2) < 0 || cpeft_check_float_dtype(call, w, x) < 0) {
        return -1;
    }
    a->out = fan_in_fan_out ? w->shape[1] : w->shape[0];
    a->in = fan_in_fan_out ? w->shape[0] : w->shape[1];
    if (x != NULL && cpeft_py_check_in_features(x, a->in) < 0) {
        return -1;
    }
    cpeft_tensor *la = cpeft_call_input(call, lora_a_obj, "lora_a", CPEFT_ROLE_INPUT);
    if (la == NULL || cpeft_check_ndim(la, 2) < 0 ||
        check_lora_a_dtype(call, la, w, allow_fp32_adapters) < 0) {
        return -1;
    }
    cpeft_tensor *lb = cpeft_call_input(call, lora_b_obj, "lora_b", CPEFT_ROLE_INPUT);
    if (lb == NULL || cpeft_check_ndim(lb, 2) < 0 || cpeft_check_float_dtype(call, lb, la) < 0) {
        return -1;
    }
    a->dtype = (cpeft_dtype)w->dtype;
    a->fp32_adapters = la->dtype != w->dtype;
    a->r = lb->shape[1];
    a->scale = scale;
    if (a->r < 1) {
        PyErr_Format(PyExc_ValueError, "lora_b must have shape (out_features/groups*k, r) with "
                     "r >= 1, got r = lora_b.shape[1] = %lld", (long long)a->r);
        return -1;
    }
    if (cpeft_check_groups(groups, a->out) < 0) {
        return -1;
    }
    int64_t k = groups->enabled_count;
    a->groups = groups->groups;
    memcpy(a->enabled, groups->enabled, sizeof a->enabled);
    int64_t expect_a[2] = {a->r * k, a->in};
    int64_t expect_b[2] = {a->out / a->groups * k, a->r};
    if (cpeft_check_shape(la, 2, expect_a, "(r*k, in_features)") < 0 ||
        cpeft_check_shape(lb, 2, expect_b, "(out_features/groups*k, r)") < 0) {
        return -1;
    }
    if (cpeft_tensor_mat(call, w, fan_in_fan_out, &a->weight) < 0 ||
        cpeft_tensor_mat(call, la, 0, &a->lora_a) < 0 ||
        cpeft_tensor_mat(call, lb, 0, &a->lora_b) < 0) {
        return -1;
    }
    *weight = w;
    return 0;
}

int cpeft_py_leading_shape_with(const cpeft_tensor *x, int64_t last, int64_t *shape)
{
    for (int i = 0; i + 1 < x->ndim; ++i) shape[i] = x->shape[i];
    shape[x->ndim - 1] = last;
    return x->ndim;
}

int cpeft_py_check_in_features(const cpeft_tensor *x, int64_t in)
{
    if (x->shape[x->ndim - 1] != in) {
        PyErr_Format(PyExc_ValueError,
                     "%s.shape[-1] must equal the weight's in_features %lld, got %lld", x->name,
                     (long long)in, (long long)x->shape[x->ndim - 1]);
        return -1;
    }
    return 0;
}

int cpeft_py_parse_scale(PyObject *scale_obj, double *scale)
{
    *scale = 0.0;
    return cpeft_parse_real(scale_obj, "scale", scale) < 0 ||
                   cpeft_check_finite(*scale, "scale") < 0
               ? -1
               : 0;
}

int cpeft_py_lora_linear_scalars(PyObject *scale_obj, PyObject *enable_lora, double *scale,
                                 cpeft_groups *groups)
{
    return cpeft_py_parse_scale(scale_obj, scale) < 0 || cpeft_parse_groups(enable_lora, groups) < 0
               ? -1
               : 0;
}

const char cpeft_doc_lora_linear_forward[] =
    "lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, *, fan_in_fan_out=False, "
    "enable_lora=None, dropout=0.0, seed=0, offset=0, out=None, out_xa=None, stream=None)\n--\n\n"
    "y = x W^T + bias + scale * scatter(drop(x) A^T B^T); returns (y, xa) with xa = drop(x) A^T.\n"
    "out / out_xa: None or True allocate NumPy arrays (NumPy inputs only), or arrays to write.";

PyObject *cpeft_py_lora_linear_forward(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "weight", "bias", "lora_a", "lora_b", "scale",
                             "fan_in_fan_out", "enable_lora", "dropout", "seed", "offset", "out",
                             "out_xa", "stream", NULL};
    PyObject *x_obj, *weight_obj, *bias_obj, *lora_a_obj, *lora_b_obj, *scale;
    PyObject *enable_lora = Py_None, *p = NULL, *seed = NULL, *offset = NULL, *out_obj = Py_None,
             *out_xa_obj = Py_None, *stream = Py_None;
    int fan_in_fan_out = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|$pOOOOOOO:lora_linear_forward", kwlist,
                                     &x_obj, &weight_obj, &bias_obj, &lora_a_obj, &lora_b_obj,
                                     &scale, &fan_in_fan_out, &enable_lora, &p, &seed, &offset,
                                     &out_obj, &out_xa_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_init(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_lora_linear_args a = {0};
    cpeft_lora_linear_fwd_out o = {0};
    cpeft_tensor *weight, *bias, *y, *xa;
    int64_t shape[CPEFT_MAX_NDIM];
    double scale_value;
    cpeft_groups groups;
    PyObject *const tensor_objs[] = {x_obj, weight_obj, lora_a_obj, lora_b_obj, bias_obj,
                                     out_obj, out_xa_obj};
    static const char *const tensor_names[] = {"x", "weight", "lora_a", "lora_b", "bias", "out",
                                               "out_xa"};
    if (cpeft_py_lora_linear_scalars(scale, enable_lora, &scale_value, &groups) < 0 ||
        cpeft_parse_dropout(p, seed, offset, &a.dropout) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 7) < 0) {
        goto finish;
    }

    cpeft_tensor *x = cpeft_call_input(&call, x_obj, "x", CPEFT_ROLE_INPUT);
    if (x == NULL || cpeft_check_min_ndim(x, 1) < 0 || cpeft_check_float_dtype(&call, x, NULL) < 0 ||
        cpeft_py_lora_linear_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                    scale_value, fan_in_fan_out, &groups, x, 1, &a, &weight) < 0 ||
        cpeft_call_optional_input(&call, bias_obj, "bias", &bias) < 0) {
        goto finish;
    }
    if (bias != NULL) {
        if (cpeft_check_float_dtype(&call, bias, x) < 0 ||
            cpeft_check_shape(bias, 1, &a.out, "(out_features,)") < 0 ||
            cpeft_tensor_vec(&call, bias, &a.bias) < 0) {
            goto finish;
        }
    }
    a.m = cpeft_leading_numel(x);
    int ndim = cpeft_py_leading_shape_with(x, a.out, shape);
    if (cpeft_call_output(&call, out_obj, "out", 1, x->dtype, ndim, shape, &y) < 0) {
        goto finish;
    }
    cpeft_py_leading_shape_with(x, a.lora_a.rows, shape);
    if (cpeft_call_output(&call, out_xa_obj, "out_xa", 1, x->dtype, ndim, shape, &xa) < 0 ||
        cpeft_tensor_mat(&call, x, 0, &a.x) < 0 || cpeft_tensor_mat(&call, y, 0, &o.y) < 0 ||
        cpeft_tensor_mat(&call, xa, 0, &o.xa) < 0 || cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_lora_linear_fwd_cpu(&a, &o, &call.status),
                   cpeft_lora_linear_fwd_cuda(&a, &o, call.stream, &call.status));
    if (rc != CPEFT_OK) {
        cpeft_raise_status(call.state, &call.status);
        goto finish;
    }
    ret = PyTuple_Pack(2, y->source, xa->source);

finish:
    cpeft_call_release(&call);
    return ret;
}

const char cpeft_doc_lora_linear_backward[] =
    "lora_linear_backward(grad_out, x, weight, lora_a, lora_b, xa, scale, *, "
    "fan_in_fan_out=False, enable_lora=None, dropout=0.0, seed=0, offset=0, grad_x=True, "
    "grad_lora_a=True, grad_lora_b=True, grad_bias=False, grad_weight=False, stream=None)\n--\n\n"
    "Gradients of lora_linear_forward, returned as (x, lora_a, lora_b, bias, weight) with None\n"
    "where not requested. Each grad_* is False/None (skip), True (allocate NumPy) or an array.";

PyObject *cpeft_py_lora_linear_backward(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"grad_out", "x", "weight", "lora_a", "lora_b", "xa", "scale",
                             "fan_in_fan_out", "enable_lora", "dropout", "seed", "offset",
                             "grad_x", "grad_lora_a", "grad_lora_b", "grad_bias", "grad_weight",
                             "stream", NULL};
    PyObject *grad_out_obj, *x_obj, *weight_obj, *lora_a_obj, *lora_b_obj, *xa_obj, *scale;
    PyObject *enable_lora = Py_None, *p = NULL, *seed = NULL, *offset = NULL, *stream = Py_None;
    PyObject *grad_x_obj = Py_True, *grad_a_obj = Py_True, *grad_b_obj = Py_True,
             *grad_bias_obj = Py_False, *grad_weight_obj = Py_False;
    int fan_in_fan_out = 0;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OOOOOOO|$pOOOOOOOOOO:lora_linear_backward", kwlist, &grad_out_obj,
            &x_obj, &weight_obj, &lora_a_obj, &lora_b_obj, &xa_obj, &scale, &fan_in_fan_out,
            &enable_lora, &p, &seed, &offset, &grad_x_obj, &grad_a_obj, &grad_b_obj,
            &grad_bias_obj, &grad_weight_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_init(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_lora_linear_args a = {0};
    cpeft_lora_linear_bwd_in in = {0};
    cpeft_lora_linear_bwd_out o = {0};
    cpeft_tensor *weight, *grad_out, *xa, *gx, *ga, *gb, *gbias, *gw;
    int64_t shape[CPEFT_MAX_NDIM];
    double scale_value;
    cpeft_groups groups;
    PyObject *const tensor_objs[] = {grad_out_obj, x_obj, weight_obj, lora_a_obj, lora_b_obj,
                                     xa_obj, grad_x_obj, grad_a_obj, grad_b_obj, grad_bias_obj,
                                     grad_weight_obj};
    static const char *const tensor_names[] = {"grad_out", "x", "weight", "lora_a", "lora_b",
                                               "xa", "grad_x", "grad_lora_a", "grad_lora_b",
                                               "grad_bias", "grad_weight"};
    if (cpeft_py_lora_linear_scalars(scale, enable_lora, &scale_value, &groups) < 0 ||
        cpeft_parse_dropout(p, seed, offset, &a.dropout) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 11) < 0) {
        goto finish;
    }

    cpeft_tensor *x = cpeft_call_input(&call, x_obj, "x", CPEFT_ROLE_INPUT);
    if (x == NULL || cpeft_check_min_ndim(x, 1) < 0 || cpeft_check_float_dtype(&call, x, NULL) < 0 ||
        cpeft_py_lora_linear_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                    scale_value, fan_in_fan_out, &groups, x, 1, &a, &weight) < 0) {
        goto finish;
    }
    int ndim = cpeft_py_leading_shape_with(x, a.out, shape);
    grad_out = cpeft_call_input(&call, grad_out_obj, "grad_out", CPEFT_ROLE_INPUT);
    if (grad_out == NULL || cpeft_check_float_dtype(&call, grad_out, x) < 0 ||
        cpeft_check_shape(grad_out, ndim, shape, "x.shape[:-1] + (out_features,)") < 0) {
        goto finish;
    }
    cpeft_py_leading_shape_with(x, a.lora_a.rows, shape);
    xa = cpeft_call_input(&call, xa_obj, "xa", CPEFT_ROLE_INPUT);
    if (xa == NULL || cpeft_check_float_dtype(&call, xa, x) < 0 ||
        cpeft_check_shape(xa, ndim, shape, "x.shape[:-1] + (r*k,)") < 0) {
        goto finish;
    }
    a.m = cpeft_leading_numel(x);
    int adapter_dtype = a.fp32_adapters ? CPEFT_FLOAT32 : x->dtype;
    if (cpeft_call_output(&call, grad_x_obj, "grad_x", 0, x->dtype, x->ndim, x->shape, &gx) < 0 ||
        cpeft_call_output(&call, grad_a_obj, "grad_lora_a", 0, adapter_dtype, 2, (int64_t[]){a.lora_a.rows, a.in}, &ga) < 0 ||
        cpeft_call_output(&call, grad_b_obj, "grad_lora_b", 0, adapter_dtype, 2, (int64_t[]){a.lora_b.rows, a.r}, &gb) < 0 ||
        cpeft_call_output(&call, grad_bias_obj, "grad_bias", 0, x->dtype, 1, &a.out, &gbias) < 0 ||
        cpeft_call_output(&call, grad_weight_obj, "grad_weight", 0, x->dtype, 2, weight->shape, &gw) < 0) {
        goto finish;
    }
    if (cpeft_tensor_mat(&call, x, 0, &a.x) < 0 ||
        cpeft_tensor_mat(&call, grad_out, 0, &in.grad_out) < 0 ||
        cpeft_tensor_mat(&call, xa, 0, &in.xa) < 0 ||
        (gx && cpeft_tensor_mat(&call, gx, 0, &o.grad_x) < 0) ||
        (ga && cpeft_tensor_mat(&call, ga, 0, &o.grad_a) < 0) ||
        (gb && cpeft_tensor_mat(&call, gb, 0, &o.grad_b) < 0) ||
        (gbias && cpeft_tensor_vec(&call, gbias, &o.grad_bias) < 0) ||
        (gw && cpeft_tensor_mat(&call, gw, fan_in_fan_out, &o.grad_weight) < 0) ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_lora_linear_bwd_cpu(&a, &in, &o, &call.status),
                   cpeft_lora_linear_bwd_cuda(&a, &in, &o, call.stream, &call.status));
    if (rc != CPEFT_OK) {
        cpeft_raise_status(call.state, &call.status);
        goto finish;
    }
    ret = PyTuple_Pack(5, gx ? gx->source : Py_None, ga ? ga->source : Py_None,
                       gb ? gb->source : Py_None, gbias ? gbias->source : Py_None,
                       gw ? gw->source : Py_None);

finish:
    cpeft_call_release(&call);
    return ret;
}
