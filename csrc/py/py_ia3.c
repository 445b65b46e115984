/*
 * Entry points of IA3 (peft IA3 Linear in both variants, and IA3 embedding): forward and
 * backward. Output scaling: l has OUT entries; input scaling (feedforward): l has IN entries;
 * embedding: l has D entries. Letters as in cpeft/ia3.h.
 */
#include "params.h"

/* weight (OUT, IN), or (IN, OUT) with fan_in_fan_out; same dtype as like. */
static cpeft_tensor *ia3_weight(cpeft_call *call, PyObject *obj, int fan_in_fan_out,
                                const cpeft_tensor *like, cpeft_ia3_linear_args *a)
{
    cpeft_tensor *w = cpeft_call_input(call, obj, "weight", CPEFT_ROLE_INPUT);
    if (w == NULL || cpeft_check_ndim(w, 2) < 0 || cpeft_check_float_dtype(w, like) < 0 ||
        cpeft_tensor_mat(w, fan_in_fan_out, &a->weight) < 0) {
        return NULL;
    }
    a->dtype = (cpeft_dtype)w->dtype;
    a->out = a->weight.rows;
    a->in = a->weight.cols;
    return w;
}

const char cpeft_doc_ia3_linear_forward[] =
    "ia3_linear_forward(x, weight, bias, ia3_l, *, feedforward=False, fan_in_fan_out=False, "
    "keep_base=False, out=None, out_base=None, stream=None)\n--\n\n"
    "Output scaling: y = (x W^T + bias) * l; input scaling (feedforward): y = (x * l) W^T + bias.\n"
    "Returns (y, base): base = x W^T + bias, written with output scaling when keep_base is true\n"
    "or out_base is an array (needed for the gradient of l), else None.";

PyObject *cpeft_py_ia3_linear_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                      PyObject *kwnames)
{
    static char *kwlist[] = {"x",           "weight",         "bias",      "ia3_l",
                             "feedforward", "fan_in_fan_out", "keep_base", "out",
                             "out_base",    "stream",         NULL};
    PyObject *x_obj, *weight_obj, *bias_obj, *l_obj;
    PyObject *out_obj = Py_None, *out_base_obj = Py_None, *stream = Py_None;
    int feedforward = 0, fan_in_fan_out = 0, keep_base = 0;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOO|$pppOOO:ia3_linear_forward", kwlist, &x_obj,
                          &weight_obj, &bias_obj, &l_obj, &feedforward, &fan_in_fan_out, &keep_base,
                          &out_obj, &out_base_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_ia3_linear_args a = {0};
    cpeft_ia3_linear_fwd_out o = {0};
    cpeft_tensor *bias, *l, *y, *base = NULL;
    int64_t shape[CPEFT_MAX_NDIM];
    PyObject *const tensor_objs[] = {x_obj, weight_obj, bias_obj, l_obj, out_obj, out_base_obj};
    static const char *const tensor_names[] = {"x", "weight", "bias", "ia3_l", "out", "out_base"};
    if (cpeft_call_prepare(&call, tensor_objs, tensor_names, 6) < 0) {
        goto finish;
    }

    a.feedforward = feedforward;
    cpeft_tensor *x = cpeft_call_input(&call, x_obj, "x", CPEFT_ROLE_INPUT);
    if (x == NULL || cpeft_check_min_ndim(x, 1) < 0 || cpeft_check_float_dtype(x, NULL) < 0 ||
        ia3_weight(&call, weight_obj, fan_in_fan_out, x, &a) == NULL ||
        cpeft_py_check_in_features(x, a.in) < 0 ||
        cpeft_call_optional_input(&call, bias_obj, "bias", &bias) < 0) {
        goto finish;
    }
    if (bias != NULL && (cpeft_check_float_dtype(bias, x) < 0 ||
                         cpeft_check_shape(bias, 1, &a.out, "(out_features,)") < 0 ||
                         cpeft_tensor_vec(bias, &a.bias) < 0)) {
        goto finish;
    }
    if (cpeft_py_ia3_l(&call, l_obj, feedforward ? a.in : a.out,
                       feedforward ? "in_features, feedforward" : "out_features", x, &l,
                       &a.l) < 0) {
        goto finish;
    }
    if (feedforward && out_base_obj != Py_None && out_base_obj != Py_False) {
        PyErr_SetString(PyExc_ValueError,
                        "out_base is only written with output scaling "
                        "(feedforward=False); pass out_base=None with feedforward=True");
        goto finish;
    }
    a.m = cpeft_leading_numel(x);
    int ndim = cpeft_py_leading_shape_with(x, a.out, shape);
    PyObject *base_request = (out_base_obj == Py_None && keep_base && !feedforward) ? Py_True
                                                                                    : out_base_obj;
    if (cpeft_call_output(&call, out_obj, "out", 1, x->dtype, ndim, shape, &y) < 0 ||
        cpeft_call_output(&call, base_request, "out_base", 0, x->dtype, ndim, shape, &base) < 0 ||
        cpeft_tensor_mat(x, 0, &a.x) < 0 || cpeft_tensor_mat(y, 0, &o.y) < 0 ||
        (base && cpeft_tensor_mat(base, 0, &o.base) < 0) || cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_ia3_linear_fwd_cpu(&a, &o, &call.status),
                   cpeft_ia3_linear_fwd_cuda(&a, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = PyTuple_Pack(2, y->source, base ? base->source : Py_None);
    }

finish:
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_ia3_linear_backward[] =
    "ia3_linear_backward(grad_out, x, weight, ia3_l, base, *, feedforward=False, "
    "fan_in_fan_out=False, grad_x=True, grad_ia3_l=True, grad_bias=False, grad_weight=False, "
    "stream=None)\n--\n\n"
    "Gradients of ia3_linear_forward as (x, ia3_l, bias, weight), None where not requested.\n"
    "base (from forward with keep_base=True) is required for grad_ia3_l with output scaling.";

PyObject *cpeft_py_ia3_linear_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames)
{
    static char *kwlist[] = {"grad_out",   "x",           "weight",         "ia3_l",
                             "base",       "feedforward", "fan_in_fan_out", "grad_x",
                             "grad_ia3_l", "grad_bias",   "grad_weight",    "stream",
                             NULL};
    PyObject *grad_out_obj, *x_obj, *weight_obj, *l_obj, *base_obj;
    PyObject *grad_x_obj = Py_True, *grad_l_obj = Py_True, *grad_bias_obj = Py_False,
             *grad_weight_obj = Py_False, *stream = Py_None;
    int feedforward = 0, fan_in_fan_out = 0;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOO|$ppOOOOO:ia3_linear_backward", kwlist,
                          &grad_out_obj, &x_obj, &weight_obj, &l_obj, &base_obj, &feedforward,
                          &fan_in_fan_out, &grad_x_obj, &grad_l_obj, &grad_bias_obj,
                          &grad_weight_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_ia3_linear_args a = {0};
    cpeft_ia3_linear_bwd_in in = {0};
    cpeft_ia3_linear_bwd_out o = {0};
    cpeft_tensor *weight, *l, *grad_out, *base, *gx, *gl, *gbias, *gw;
    int64_t shape[CPEFT_MAX_NDIM];
    PyObject *const tensor_objs[] = {grad_out_obj, x_obj,         weight_obj,
                                     l_obj,        base_obj,      grad_x_obj,
                                     grad_l_obj,   grad_bias_obj, grad_weight_obj};
    static const char *const tensor_names[] = {"grad_out",   "x",         "weight",
                                               "ia3_l",      "base",      "grad_x",
                                               "grad_ia3_l", "grad_bias", "grad_weight"};
    if (cpeft_call_prepare(&call, tensor_objs, tensor_names, 9) < 0) {
        goto finish;
    }

    a.feedforward = feedforward;
    cpeft_tensor *x = cpeft_call_input(&call, x_obj, "x", CPEFT_ROLE_INPUT);
    if (x == NULL || cpeft_check_min_ndim(x, 1) < 0 || cpeft_check_float_dtype(x, NULL) < 0 ||
        (weight = ia3_weight(&call, weight_obj, fan_in_fan_out, x, &a)) == NULL ||
        cpeft_py_check_in_features(x, a.in) < 0 ||
        cpeft_py_ia3_l(&call, l_obj, feedforward ? a.in : a.out,
                       feedforward ? "in_features, feedforward" : "out_features", x, &l,
                       &a.l) < 0) {
        goto finish;
    }
    int ndim = cpeft_py_leading_shape_with(x, a.out, shape);
    grad_out = cpeft_call_input(&call, grad_out_obj, "grad_out", CPEFT_ROLE_INPUT);
    if (grad_out == NULL || cpeft_check_float_dtype(grad_out, x) < 0 ||
        cpeft_check_shape(grad_out, ndim, shape, "x.shape[:-1] + (out_features,)") < 0 ||
        cpeft_call_optional_input(&call, base_obj, "base", &base) < 0) {
        goto finish;
    }
    if (base != NULL &&
        (cpeft_check_float_dtype(base, x) < 0 ||
         cpeft_check_shape(base, ndim, shape, "x.shape[:-1] + (out_features,)") < 0)) {
        goto finish;
    }
    a.m = cpeft_leading_numel(x);
    if (cpeft_call_output(&call, grad_x_obj, "grad_x", 0, x->dtype, x->ndim, x->shape, &gx) < 0 ||
        cpeft_call_output(&call, grad_l_obj, "grad_ia3_l", 0, x->dtype, l->ndim, l->shape, &gl) <
            0 ||
        cpeft_call_output(&call, grad_bias_obj, "grad_bias", 0, x->dtype, 1, &a.out, &gbias) < 0 ||
        cpeft_call_output(&call, grad_weight_obj, "grad_weight", 0, x->dtype, 2, weight->shape,
                          &gw) < 0) {
        goto finish;
    }
    if (gl != NULL && !feedforward && base == NULL) {
        PyErr_SetString(PyExc_ValueError,
                        "base is required for grad_ia3_l with output scaling (feedforward=False): "
                        "pass the base returned by ia3_linear_forward(..., keep_base=True)");
        goto finish;
    }
    if (cpeft_tensor_mat(x, 0, &a.x) < 0 || cpeft_tensor_mat(grad_out, 0, &in.grad_out) < 0 ||
        (base && cpeft_tensor_mat(base, 0, &in.base) < 0) ||
        (gx && cpeft_tensor_mat(gx, 0, &o.grad_x) < 0) ||
        (gl && cpeft_tensor_vec(gl, &o.grad_l) < 0) ||
        (gbias && cpeft_tensor_vec(gbias, &o.grad_bias) < 0) ||
        (gw && cpeft_tensor_mat(gw, fan_in_fan_out, &o.grad_weight) < 0) ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_ia3_linear_bwd_cpu(&a, &in, &o, &call.status),
                   cpeft_ia3_linear_bwd_cuda(&a, &in, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = PyTuple_Pack(4, gx ? gx->source : Py_None, gl ? gl->source : Py_None,
                           gbias ? gbias->source : Py_None, gw ? gw->source : Py_None);
    }

finish:
    return cpeft_call_end(&call, ret);
}

/* weight (V, D), ia3_l with D entries, indices; fills everything of `a` but padding_idx. */
static int ia3_embedding_params(cpeft_call *call, PyObject *indices_obj, PyObject *weight_obj,
                                PyObject *l_obj, const cpeft_tensor *like,
                                cpeft_ia3_embedding_args *a, cpeft_tensor **indices,
                                cpeft_tensor **l)
{
    cpeft_tensor *w = cpeft_call_input(call, weight_obj, "weight", CPEFT_ROLE_INPUT);
    if (w == NULL || cpeft_check_ndim(w, 2) < 0 || cpeft_check_float_dtype(w, like) < 0 ||
        cpeft_tensor_mat(w, 0, &a->weight) < 0) {
        return -1;
    }
    a->dtype = (cpeft_dtype)w->dtype;
    a->num_embeddings = w->shape[0];
    a->dim = w->shape[1];
    if (cpeft_py_ia3_l(call, l_obj, a->dim, "embedding_dim", w, l, &a->l) < 0 ||
        cpeft_py_indices(call, indices_obj, indices, &a->indices) < 0) {
        return -1;
    }
    a->index_dtype = (cpeft_dtype)(*indices)->dtype;
    a->n = a->indices.len;
    return 0;
}

const char cpeft_doc_ia3_embedding_forward[] =
    "ia3_embedding_forward(indices, weight, ia3_l, *, out=None, stream=None)\n--\n\n"
    "y[n] = weight[indices[n]] * l; y has shape indices.shape + (embedding_dim,).";

PyObject *cpeft_py_ia3_embedding_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames)
{
    static char *kwlist[] = {"indices", "weight", "ia3_l", "out", "stream", NULL};
    PyObject *indices_obj, *weight_obj, *l_obj, *out_obj = Py_None, *stream = Py_None;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOO|$OO:ia3_embedding_forward", kwlist,
                          &indices_obj, &weight_obj, &l_obj, &out_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_ia3_embedding_args a = {0};
    cpeft_tensor *indices, *l, *y;
    cpeft_mat y_mat;
    int64_t shape[CPEFT_MAX_NDIM];
    int ndim;

    PyObject *const tensor_objs[] = {indices_obj, weight_obj, l_obj, out_obj};
    static const char *const tensor_names[] = {"indices", "weight", "ia3_l", "out"};
    a.padding_idx = -1;
    if (cpeft_call_prepare(&call, tensor_objs, tensor_names, 4) < 0 ||
        ia3_embedding_params(&call, indices_obj, weight_obj, l_obj, NULL, &a, &indices, &l) < 0 ||
        (ndim = cpeft_py_embedding_shape(indices, a.dim, shape)) < 0 ||
        cpeft_call_output(&call, out_obj, "out", 1, a.dtype, ndim, shape, &y) < 0 ||
        cpeft_tensor_mat(y, 0, &y_mat) < 0 || cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_ia3_embedding_fwd_cpu(&a, y_mat, &call.status),
                   cpeft_ia3_embedding_fwd_cuda(&a, y_mat, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = Py_NewRef(y->source);
    }

finish:
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_ia3_embedding_backward[] =
    "ia3_embedding_backward(grad_out, indices, weight, ia3_l, *, padding_idx=None, "
    "grad_ia3_l=True, grad_weight=False, stream=None)\n--\n\n"
    "Gradients of ia3_embedding_forward as (ia3_l, weight), None where not requested; rows at\n"
    "padding_idx are skipped for grad_weight only.";

PyObject *cpeft_py_ia3_embedding_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames)
{
    static char *kwlist[] = {"grad_out",   "indices",     "weight", "ia3_l", "padding_idx",
                             "grad_ia3_l", "grad_weight", "stream", NULL};
    PyObject *grad_out_obj, *indices_obj, *weight_obj, *l_obj,
        *padding_obj = Py_None, *grad_l_obj = Py_True, *grad_weight_obj = Py_False,
        *stream = Py_None;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOO|$OOOO:ia3_embedding_backward", kwlist,
                          &grad_out_obj, &indices_obj, &weight_obj, &l_obj, &padding_obj,
                          &grad_l_obj, &grad_weight_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_ia3_embedding_args a = {0};
    cpeft_ia3_embedding_bwd_out o = {0};
    cpeft_tensor *indices, *l, *gl, *gw;
    cpeft_mat grad_out_mat;
    int64_t shape[CPEFT_MAX_NDIM];
    int ndim, padding_given;
    PyObject *const tensor_objs[] = {grad_out_obj, indices_obj, weight_obj,
                                     l_obj,        grad_l_obj,  grad_weight_obj};
    static const char *const tensor_names[] = {"grad_out", "indices",    "weight",
                                               "ia3_l",    "grad_ia3_l", "grad_weight"};
    int64_t padding_idx;
    if (cpeft_parse_padding_idx(padding_obj, &padding_idx, &padding_given) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 6) < 0) {
        goto finish;
    }

    cpeft_tensor *grad_out = cpeft_call_input(&call, grad_out_obj, "grad_out", CPEFT_ROLE_INPUT);
    if (grad_out == NULL || cpeft_check_float_dtype(grad_out, NULL) < 0 ||
        ia3_embedding_params(&call, indices_obj, weight_obj, l_obj, grad_out, &a, &indices, &l) <
            0 ||
        cpeft_check_padding_idx(&padding_idx, padding_given, a.num_embeddings) < 0 ||
        (ndim = cpeft_py_embedding_shape(indices, a.dim, shape)) < 0 ||
        cpeft_check_shape(grad_out, ndim, shape, "indices.shape + (embedding_dim,)") < 0) {
        goto finish;
    }
    a.padding_idx = padding_idx;
    if (cpeft_call_output(&call, grad_l_obj, "grad_ia3_l", 0, a.dtype, l->ndim, l->shape, &gl) <
            0 ||
        cpeft_call_output(&call, grad_weight_obj, "grad_weight", 0, a.dtype, 2,
                          (int64_t[]){a.num_embeddings, a.dim}, &gw) < 0 ||
        cpeft_tensor_mat(grad_out, 0, &grad_out_mat) < 0 ||
        (gl && cpeft_tensor_vec(gl, &o.grad_l) < 0) ||
        (gw && cpeft_tensor_mat(gw, 0, &o.grad_weight) < 0) ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_ia3_embedding_bwd_cpu(&a, grad_out_mat, &o, &call.status),
                   cpeft_ia3_embedding_bwd_cuda(&a, grad_out_mat, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = PyTuple_Pack(2, gl ? gl->source : Py_None, gw ? gw->source : Py_None);
    }

finish:
    return cpeft_call_end(&call, ret);
}
