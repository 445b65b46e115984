/*
 * Entry points of DoRA (cpeft/dora.h): the weight's squared row norms, the DoRA row norms, and
 * linear and embedding forward and backward. Linear: x (..., IN) flattened to M rows, weight
 * viewed as (OUT, IN), lora_a (R, IN), lora_b (OUT, R), magnitude (OUT,). Embedding: indices
 * (...) flattened to N, weight (V, D), lora_a (R, V), lora_b (D, R), magnitude (D,).
 */
#include "params.h"

#include "cpeft/dora.h"

/* DoRA adapters are ungrouped: one group, enabled. */
static const cpeft_groups one_group = {.groups = 1, .enabled_count = 1, .enabled = {1}};

/* A vector argument of exactly `count` entries (shape (count,)) with like's dtype; `meaning`
 * says what count is. */
static int dora_vector(cpeft_call *call, PyObject *obj, const char *name, int64_t count,
                       const char *meaning, const cpeft_tensor *like, cpeft_vec *vec)
{
    cpeft_tensor *t = cpeft_call_input(call, obj, name, CPEFT_ROLE_INPUT);
    if (t == NULL || cpeft_check_float_dtype(t, like) < 0 ||
        cpeft_check_shape(t, 1, &count, meaning) < 0) {
        return -1;
    }
    return cpeft_tensor_vec(t, vec);
}

static int optional_dora_vector(cpeft_call *call, PyObject *obj, const char *name, int64_t count,
                                const char *meaning, const cpeft_tensor *like, cpeft_vec *vec)
{
    if (obj == Py_None) {
        vec->data = NULL;
        return 0;
    }
    return dora_vector(call, obj, name, count, meaning, like, vec);
}

/* A vector output of `count` entries; required ones are allocated for None too. */
static int vector_output(cpeft_call *call, PyObject *obj, const char *name, int required, int dtype,
                         int64_t count, cpeft_tensor **t, cpeft_vec *vec)
{
    if (cpeft_call_output(call, obj, name, required, dtype, 1, &count, t) < 0) {
        return -1;
    }
    if (*t == NULL) {
        vec->data = NULL;
        return 0;
    }
    return cpeft_tensor_vec(*t, vec);
}

const char cpeft_doc_dora_weight_sq_norm[] =
    "dora_weight_sq_norm(weight, *, fan_in_fan_out=False, out=None, stream=None)\n--\n\n"
    "The squared L2 norm of every row of weight's (OUT, IN) view (out_features entries), the part\n"
    "of DoRA's row norms that changes only when the weight does. out: None/True or an array.";

PyObject *cpeft_py_dora_weight_sq_norm(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames)
{
    static char *kwlist[] = {"weight", "fan_in_fan_out", "out", "stream", NULL};
    PyObject *weight_obj, *out_obj = Py_None, *stream = Py_None;
    int fan_in_fan_out = 0;
    if (!cpeft_parse_args(args, nargs, kwnames, "O|$pOO:dora_weight_sq_norm", kwlist, &weight_obj,
                          &fan_in_fan_out, &out_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_mat weight;
    cpeft_vec out_vec;
    cpeft_tensor *out;
    PyObject *const tensor_objs[] = {weight_obj, out_obj};
    static const char *const tensor_names[] = {"weight", "out"};
    if (cpeft_call_prepare(&call, tensor_objs, tensor_names, 2) < 0) {
        goto finish;
    }
    cpeft_tensor *w = cpeft_call_input(&call, weight_obj, "weight", CPEFT_ROLE_INPUT);
    if (w == NULL || cpeft_check_ndim(w, 2) < 0 || cpeft_check_float_dtype(w, NULL) < 0 ||
        cpeft_tensor_mat(w, fan_in_fan_out, &weight) < 0 ||
        vector_output(&call, out_obj, "out", 1, w->dtype, weight.rows, &out, &out_vec) < 0 ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }
    int rc;
    cpeft_dtype dt = (cpeft_dtype)w->dtype;
    CPEFT_DISPATCH(&call, rc, cpeft_dora_weight_sq_norm_cpu(dt, weight, out_vec, &call.status),
                   cpeft_dora_weight_sq_norm_cuda(dt, weight, out_vec, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = Py_NewRef(out->source);
    }

finish:
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_dora_weight_norm[] =
    "dora_weight_norm(weight, lora_a, lora_b, scale, *, fan_in_fan_out=False, "
    "weight_sq_norm=None, out=None, stream=None)\n--\n\n"
    "n_j = ||w_j + scale * lora_b[j] @ lora_a|| for every row j of weight's (OUT, IN) view,\n"
    "without forming W + scale * B A. weight_sq_norm: None or dora_weight_sq_norm(weight).";

PyObject *cpeft_py_dora_weight_norm(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    static char *kwlist[] = {"weight",         "lora_a", "lora_b", "scale", "fan_in_fan_out",
                             "weight_sq_norm", "out",    "stream", NULL};
    PyObject *weight_obj, *lora_a_obj, *lora_b_obj, *scale;
    PyObject *sq_obj = Py_None, *out_obj = Py_None, *stream = Py_None;
    int fan_in_fan_out = 0;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOO|$pOOO:dora_weight_norm", kwlist, &weight_obj,
                          &lora_a_obj, &lora_b_obj, &scale, &fan_in_fan_out, &sq_obj, &out_obj,
                          &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_lora_linear_args l = {0};
    cpeft_dora_norm_args a = {0};
    cpeft_tensor *weight, *out;
    cpeft_vec out_vec;
    double scale_value;
    PyObject *const tensor_objs[] = {weight_obj, lora_a_obj, lora_b_obj, sq_obj, out_obj};
    static const char *const tensor_names[] = {"weight", "lora_a", "lora_b", "weight_sq_norm",
                                               "out"};
    if (cpeft_py_parse_scale(scale, &scale_value) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 5) < 0 ||
        cpeft_py_lora_linear_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                    scale_value, fan_in_fan_out, &one_group, NULL, 0, &l,
                                    &weight) < 0 ||
        optional_dora_vector(&call, sq_obj, "weight_sq_norm", l.out, "(out_features,)", weight,
                             &a.weight_sq_norm) < 0 ||
        vector_output(&call, out_obj, "out", 1, weight->dtype, l.out, &out, &out_vec) < 0 ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }
    a.dtype = l.dtype;
    a.out = l.out;
    a.in = l.in;
    a.r = l.r;
    a.weight = l.weight;
    a.lora_a = l.lora_a;
    a.lora_b = l.lora_b;
    a.scale = l.scale;
    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_dora_norm_cpu(&a, out_vec, &call.status),
                   cpeft_dora_norm_cuda(&a, out_vec, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = Py_NewRef(out->source);
    }

finish:
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_dora_linear_forward[] =
    "dora_linear_forward(x, weight, bias, lora_a, lora_b, magnitude, scale, *, "
    "fan_in_fan_out=False, dropout=0.0, seed=0, offset=0, weight_sq_norm=None, out=None, "
    "out_xa=None, out_base=None, out_norm=None, stream=None)\n--\n\n"
    "DoRA linear forward with peft's semantics; returns (y, xa, base, norm). base (kept for the\n"
    "gradient of magnitude) is written only when out_base is True or an array, else None.";

PyObject *cpeft_py_dora_linear_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames)
{
    static char *kwlist[] = {
        "x",     "weight",         "bias",     "lora_a",   "lora_b", "magnitude",
        "scale", "fan_in_fan_out", "dropout",  "seed",     "offset", "weight_sq_norm",
        "out",   "out_xa",         "out_base", "out_norm", "stream", NULL};
    PyObject *x_obj, *weight_obj, *bias_obj, *lora_a_obj, *lora_b_obj, *m_obj, *scale;
    PyObject *p = NULL, *seed = NULL, *offset = NULL, *sq_obj = Py_None, *out_obj = Py_None,
             *out_xa_obj = Py_None, *out_base_obj = Py_None, *out_norm_obj = Py_None,
             *stream = Py_None;
    int fan_in_fan_out = 0;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOOOO|$pOOOOOOOOO:dora_linear_forward", kwlist,
                          &x_obj, &weight_obj, &bias_obj, &lora_a_obj, &lora_b_obj, &m_obj, &scale,
                          &fan_in_fan_out, &p, &seed, &offset, &sq_obj, &out_obj, &out_xa_obj,
                          &out_base_obj, &out_norm_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_dora_linear_args a = {0};
    cpeft_dora_linear_fwd_out o = {0};
    cpeft_lora_linear_args *l = &a.lora;
    cpeft_tensor *weight, *bias, *y, *xa, *base, *norm;
    int64_t shape[CPEFT_MAX_NDIM];
    double scale_value;
    PyObject *const tensor_objs[] = {x_obj,      weight_obj,   bias_obj,    lora_a_obj,
                                     lora_b_obj, m_obj,        sq_obj,      out_obj,
                                     out_xa_obj, out_base_obj, out_norm_obj};
    static const char *const tensor_names[] = {"x",      "weight",    "bias",           "lora_a",
                                               "lora_b", "magnitude", "weight_sq_norm", "out",
                                               "out_xa", "out_base",  "out_norm"};
    if (cpeft_py_parse_scale(scale, &scale_value) < 0 ||
        cpeft_parse_dropout(p, seed, offset, &l->dropout) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 11) < 0) {
        goto finish;
    }

    cpeft_tensor *x = cpeft_call_input(&call, x_obj, "x", CPEFT_ROLE_INPUT);
    if (x == NULL || cpeft_check_min_ndim(x, 1) < 0 || cpeft_check_float_dtype(x, NULL) < 0 ||
        cpeft_py_lora_linear_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                    scale_value, fan_in_fan_out, &one_group, x, 0, l,
                                    &weight) < 0 ||
        cpeft_call_optional_input(&call, bias_obj, "bias", &bias) < 0) {
        goto finish;
    }
    if (bias != NULL) {
        if (cpeft_check_float_dtype(bias, x) < 0 ||
            cpeft_check_shape(bias, 1, &l->out, "(out_features,)") < 0 ||
            cpeft_tensor_vec(bias, &l->bias) < 0) {
            goto finish;
        }
    }
    if (dora_vector(&call, m_obj, "magnitude", l->out, "(out_features,)", x, &a.magnitude) < 0 ||
        optional_dora_vector(&call, sq_obj, "weight_sq_norm", l->out, "(out_features,)", x,
                             &a.weight_sq_norm) < 0) {
        goto finish;
    }
    l->m = cpeft_leading_numel(x);
    int ndim = cpeft_py_leading_shape_with(x, l->out, shape);
    if (cpeft_call_output(&call, out_obj, "out", 1, x->dtype, ndim, shape, &y) < 0 ||
        cpeft_call_output(&call, out_base_obj, "out_base", 0, x->dtype, ndim, shape, &base) < 0) {
        goto finish;
    }
    cpeft_py_leading_shape_with(x, l->r, shape);
    if (cpeft_call_output(&call, out_xa_obj, "out_xa", 1, x->dtype, ndim, shape, &xa) < 0 ||
        vector_output(&call, out_norm_obj, "out_norm", 1, x->dtype, l->out, &norm, &o.norm) < 0 ||
        cpeft_tensor_mat(x, 0, &l->x) < 0 || cpeft_tensor_mat(y, 0, &o.y) < 0 ||
        cpeft_tensor_mat(xa, 0, &o.xa) < 0 || (base && cpeft_tensor_mat(base, 0, &o.base) < 0) ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_dora_linear_fwd_cpu(&a, &o, &call.status),
                   cpeft_dora_linear_fwd_cuda(&a, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = PyTuple_Pack(4, y->source, xa->source, base ? base->source : Py_None, norm->source);
    }

finish:
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_dora_linear_backward[] =
    "dora_linear_backward(grad_out, x, weight, lora_a, lora_b, magnitude, norm, xa, base, scale, "
    "*, fan_in_fan_out=False, dropout=0.0, seed=0, offset=0, grad_x=True, grad_lora_a=True, "
    "grad_lora_b=True, grad_magnitude=True, grad_bias=False, stream=None)\n--\n\n"
    "Gradients of dora_linear_forward as (x, lora_a, lora_b, magnitude, bias), None where not\n"
    "requested. base (from the forward) is required for grad_magnitude, else may be None.";

PyObject *cpeft_py_dora_linear_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames)
{
    static char *kwlist[] = {
        "grad_out",  "x",      "weight", "lora_a",      "lora_b",         "magnitude",
        "norm",      "xa",     "base",   "scale",       "fan_in_fan_out", "dropout",
        "seed",      "offset", "grad_x", "grad_lora_a", "grad_lora_b",    "grad_magnitude",
        "grad_bias", "stream", NULL};
    PyObject *grad_out_obj, *x_obj, *weight_obj, *lora_a_obj, *lora_b_obj, *m_obj, *norm_obj,
        *xa_obj, *base_obj, *scale;
    PyObject *p = NULL, *seed = NULL, *offset = NULL, *stream = Py_None;
    PyObject *grad_x_obj = Py_True, *grad_a_obj = Py_True, *grad_b_obj = Py_True,
             *grad_m_obj = Py_True, *grad_bias_obj = Py_False;
    int fan_in_fan_out = 0;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOOOOOOO|$pOOOOOOOOO:dora_linear_backward",
                          kwlist, &grad_out_obj, &x_obj, &weight_obj, &lora_a_obj, &lora_b_obj,
                          &m_obj, &norm_obj, &xa_obj, &base_obj, &scale, &fan_in_fan_out, &p, &seed,
                          &offset, &grad_x_obj, &grad_a_obj, &grad_b_obj, &grad_m_obj,
                          &grad_bias_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_dora_linear_args a = {0};
    cpeft_dora_linear_bwd_in in = {0};
    cpeft_dora_linear_bwd_out o = {0};
    cpeft_lora_linear_args *l = &a.lora;
    cpeft_tensor *weight, *grad_out, *xa, *base = NULL, *gx, *ga, *gb, *gm, *gbias;
    int64_t shape[CPEFT_MAX_NDIM];
    double scale_value;
    PyObject *const tensor_objs[] = {grad_out_obj, x_obj,      weight_obj, lora_a_obj,   lora_b_obj,
                                     m_obj,        norm_obj,   xa_obj,     base_obj,     grad_x_obj,
                                     grad_a_obj,   grad_b_obj, grad_m_obj, grad_bias_obj};
    static const char *const tensor_names[] = {
        "grad_out", "x",    "weight", "lora_a",      "lora_b",      "magnitude",      "norm",
        "xa",       "base", "grad_x", "grad_lora_a", "grad_lora_b", "grad_magnitude", "grad_bias"};
    if (cpeft_py_parse_scale(scale, &scale_value) < 0 ||
        cpeft_parse_dropout(p, seed, offset, &l->dropout) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 14) < 0) {
        goto finish;
    }

    cpeft_tensor *x = cpeft_call_input(&call, x_obj, "x", CPEFT_ROLE_INPUT);
    if (x == NULL || cpeft_check_min_ndim(x, 1) < 0 || cpeft_check_float_dtype(x, NULL) < 0 ||
        cpeft_py_lora_linear_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                    scale_value, fan_in_fan_out, &one_group, x, 0, l,
                                    &weight) < 0 ||
        dora_vector(&call, m_obj, "magnitude", l->out, "(out_features,)", x, &a.magnitude) < 0 ||
        dora_vector(&call, norm_obj, "norm", l->out, "(out_features,)", x, &in.norm) < 0) {
        goto finish;
    }
    int ndim = cpeft_py_leading_shape_with(x, l->out, shape);
    grad_out = cpeft_call_input(&call, grad_out_obj, "grad_out", CPEFT_ROLE_INPUT);
    if (grad_out == NULL || cpeft_check_float_dtype(grad_out, x) < 0 ||
        cpeft_check_shape(grad_out, ndim, shape, "x.shape[:-1] + (out_features,)") < 0) {
        goto finish;
    }
    if (cpeft_call_output(&call, grad_m_obj, "grad_magnitude", 0, x->dtype, 1, &l->out, &gm) < 0) {
        goto finish;
    }
    if (gm != NULL || base_obj != Py_None) {
        if (base_obj == Py_None) {
            PyErr_SetString(PyExc_ValueError,
                            "base must be the forward's base (x.shape[:-1] + (out_features,)) "
                            "when grad_magnitude is requested, got None");
            goto finish;
        }
        base = cpeft_call_input(&call, base_obj, "base", CPEFT_ROLE_INPUT);
        if (base == NULL || cpeft_check_float_dtype(base, x) < 0 ||
            cpeft_check_shape(base, ndim, shape, "x.shape[:-1] + (out_features,)") < 0) {
            goto finish;
        }
    }
    cpeft_py_leading_shape_with(x, l->r, shape);
    xa = cpeft_call_input(&call, xa_obj, "xa", CPEFT_ROLE_INPUT);
    if (xa == NULL || cpeft_check_float_dtype(xa, x) < 0 ||
        cpeft_check_shape(xa, ndim, shape, "x.shape[:-1] + (r,)") < 0) {
        goto finish;
    }
    l->m = cpeft_leading_numel(x);
    if (cpeft_call_output(&call, grad_x_obj, "grad_x", 0, x->dtype, x->ndim, x->shape, &gx) < 0 ||
        cpeft_call_output(&call, grad_a_obj, "grad_lora_a", 0, x->dtype, 2,
                          (int64_t[]){l->r, l->in}, &ga) < 0 ||
        cpeft_call_output(&call, grad_b_obj, "grad_lora_b", 0, x->dtype, 2,
                          (int64_t[]){l->out, l->r}, &gb) < 0 ||
        cpeft_call_output(&call, grad_bias_obj, "grad_bias", 0, x->dtype, 1, &l->out, &gbias) < 0) {
        goto finish;
    }
    if (cpeft_tensor_mat(x, 0, &l->x) < 0 || cpeft_tensor_mat(grad_out, 0, &in.grad_out) < 0 ||
        cpeft_tensor_mat(xa, 0, &in.xa) < 0 || (base && cpeft_tensor_mat(base, 0, &in.base) < 0) ||
        (gx && cpeft_tensor_mat(gx, 0, &o.grad_x) < 0) ||
        (ga && cpeft_tensor_mat(ga, 0, &o.grad_a) < 0) ||
        (gb && cpeft_tensor_mat(gb, 0, &o.grad_b) < 0) ||
        (gm && cpeft_tensor_vec(gm, &o.grad_m) < 0) ||
        (gbias && cpeft_tensor_vec(gbias, &o.grad_bias) < 0) ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_dora_linear_bwd_cpu(&a, &in, &o, &call.status),
                   cpeft_dora_linear_bwd_cuda(&a, &in, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = PyTuple_Pack(5, gx ? gx->source : Py_None, ga ? ga->source : Py_None,
                           gb ? gb->source : Py_None, gm ? gm->source : Py_None,
                           gbias ? gbias->source : Py_None);
    }

finish:
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_dora_embedding_forward[] =
    "dora_embedding_forward(indices, weight, lora_a, lora_b, magnitude, scale, *, "
    "weight_sq_norm=None, out=None, out_norm=None, stream=None)\n--\n\n"
    "y[n] = (magnitude / norm) * (weight[indices[n]] + scale * lora_a[:, indices[n]] @ "
    "lora_b.T),\nnorm[d] = ||weight[:, d] + scale * (lora_b @ lora_a)[d]||; returns (y, norm).";

PyObject *cpeft_py_dora_embedding_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames)
{
    static char *kwlist[] = {"indices",        "weight", "lora_a",   "lora_b", "magnitude", "scale",
                             "weight_sq_norm", "out",    "out_norm", "stream", NULL};
    PyObject *indices_obj, *weight_obj, *lora_a_obj, *lora_b_obj, *m_obj, *scale;
    PyObject *sq_obj = Py_None, *out_obj = Py_None, *out_norm_obj = Py_None, *stream = Py_None;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOOO|$OOOO:dora_embedding_forward", kwlist,
                          &indices_obj, &weight_obj, &lora_a_obj, &lora_b_obj, &m_obj, &scale,
                          &sq_obj, &out_obj, &out_norm_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_dora_embedding_args a = {0};
    cpeft_lora_embedding_args *l = &a.lora;
    cpeft_tensor *weight, *indices, *y, *norm;
    cpeft_mat y_mat;
    cpeft_vec norm_vec;
    int64_t shape[CPEFT_MAX_NDIM];
    int ndim;
    double scale_value;
    PyObject *const tensor_objs[] = {indices_obj, weight_obj, lora_a_obj, lora_b_obj,
                                     m_obj,       sq_obj,     out_obj,    out_norm_obj};
    static const char *const tensor_names[] = {"indices",   "weight",         "lora_a", "lora_b",
                                               "magnitude", "weight_sq_norm", "out",    "out_norm"};

    if (cpeft_py_parse_scale(scale, &scale_value) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 8) < 0 ||
        cpeft_py_lora_embedding_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                       scale_value, NULL, l, &weight) < 0 ||
        dora_vector(&call, m_obj, "magnitude", l->dim, "(embedding_dim,)", weight, &a.magnitude) <
            0 ||
        optional_dora_vector(&call, sq_obj, "weight_sq_norm", l->dim, "(embedding_dim,)", weight,
                             &a.weight_sq_norm) < 0 ||
        cpeft_py_indices(&call, indices_obj, &indices, &l->indices) < 0 ||
        (ndim = cpeft_py_embedding_shape(indices, l->dim, shape)) < 0 ||
        cpeft_call_output(&call, out_obj, "out", 1, l->dtype, ndim, shape, &y) < 0 ||
        vector_output(&call, out_norm_obj, "out_norm", 1, l->dtype, l->dim, &norm, &norm_vec) < 0 ||
        cpeft_tensor_mat(y, 0, &y_mat) < 0 || cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }
    l->index_dtype = (cpeft_dtype)indices->dtype;
    l->n = l->indices.len;
    l->padding_idx = -1;

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_dora_embedding_fwd_cpu(&a, y_mat, norm_vec, &call.status),
                   cpeft_dora_embedding_fwd_cuda(&a, y_mat, norm_vec, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = PyTuple_Pack(2, y->source, norm->source);
    }

finish:
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_dora_embedding_backward[] =
    "dora_embedding_backward(grad_out, indices, weight, lora_a, lora_b, magnitude, norm, scale, "
    "*, padding_idx=None, grad_lora_a=True, grad_lora_b=True, grad_magnitude=True, "
    "stream=None)\n--\n\n"
    "Gradients of dora_embedding_forward as (lora_a, lora_b, magnitude), None where not\n"
    "requested. Rows whose index is padding_idx contribute nothing to grad_lora_a.";

PyObject *cpeft_py_dora_embedding_backward(PyObject *module, PyObject *const *args,
                                           Py_ssize_t nargs, PyObject *kwnames)
{
    static char *kwlist[] = {"grad_out",    "indices",     "weight",      "lora_a",
                             "lora_b",      "magnitude",   "norm",        "scale",
                             "padding_idx", "grad_lora_a", "grad_lora_b", "grad_magnitude",
                             "stream",      NULL};
    PyObject *grad_out_obj, *indices_obj, *weight_obj, *lora_a_obj, *lora_b_obj, *m_obj, *norm_obj,
        *scale;
    PyObject *padding_obj = Py_None, *stream = Py_None, *grad_a_obj = Py_True,
             *grad_b_obj = Py_True, *grad_m_obj = Py_True;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOOOOO|$OOOOO:dora_embedding_backward", kwlist,
                          &grad_out_obj, &indices_obj, &weight_obj, &lora_a_obj, &lora_b_obj,
                          &m_obj, &norm_obj, &scale, &padding_obj, &grad_a_obj, &grad_b_obj,
                          &grad_m_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_dora_embedding_args a = {0};
    cpeft_dora_embedding_bwd_out o = {0};
    cpeft_lora_embedding_args *l = &a.lora;
    cpeft_tensor *weight, *indices, *grad_out, *ga, *gb, *gm;
    cpeft_mat g;
    cpeft_vec norm;
    int64_t shape[CPEFT_MAX_NDIM];
    int ndim, padding_given;
    double scale_value;
    PyObject *const tensor_objs[] = {grad_out_obj, indices_obj, weight_obj, lora_a_obj, lora_b_obj,
                                     m_obj,        norm_obj,    grad_a_obj, grad_b_obj, grad_m_obj};
    static const char *const tensor_names[] = {
        "grad_out",  "indices", "weight",      "lora_a",      "lora_b",
        "magnitude", "norm",    "grad_lora_a", "grad_lora_b", "grad_magnitude"};

    if (cpeft_py_parse_scale(scale, &scale_value) < 0 ||
        cpeft_parse_padding_idx(padding_obj, &l->padding_idx, &padding_given) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 10) < 0 ||
        cpeft_py_lora_embedding_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                       scale_value, NULL, l, &weight) < 0 ||
        cpeft_check_padding_idx(&l->padding_idx, padding_given, l->num_embeddings) < 0 ||
        dora_vector(&call, m_obj, "magnitude", l->dim, "(embedding_dim,)", weight, &a.magnitude) <
            0 ||
        dora_vector(&call, norm_obj, "norm", l->dim, "(embedding_dim,)", weight, &norm) < 0 ||
        cpeft_py_indices(&call, indices_obj, &indices, &l->indices) < 0 ||
        (ndim = cpeft_py_embedding_shape(indices, l->dim, shape)) < 0) {
        goto finish;
    }
    grad_out = cpeft_call_input(&call, grad_out_obj, "grad_out", CPEFT_ROLE_INPUT);
    if (grad_out == NULL || cpeft_check_float_dtype(grad_out, weight) < 0 ||
        cpeft_check_shape(grad_out, ndim, shape, "indices.shape + (embedding_dim,)") < 0 ||
        cpeft_call_output(&call, grad_a_obj, "grad_lora_a", 0, l->dtype, 2,
                          (int64_t[]){l->r, l->num_embeddings}, &ga) < 0 ||
        cpeft_call_output(&call, grad_b_obj, "grad_lora_b", 0, l->dtype, 2,
                          (int64_t[]){l->dim, l->r}, &gb) < 0 ||
        vector_output(&call, grad_m_obj, "grad_magnitude", 0, l->dtype, l->dim, &gm, &o.grad_m) <
            0 ||
        cpeft_tensor_mat(grad_out, 0, &g) < 0 || (ga && cpeft_tensor_mat(ga, 0, &o.grad_a) < 0) ||
        (gb && cpeft_tensor_mat(gb, 0, &o.grad_b) < 0) || cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }
    l->index_dtype = (cpeft_dtype)indices->dtype;
    l->n = l->indices.len;

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_dora_embedding_bwd_cpu(&a, g, norm, &o, &call.status),
                   cpeft_dora_embedding_bwd_cuda(&a, g, norm, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = PyTuple_Pack(3, ga ? ga->source : Py_None, gb ? gb->source : Py_None,
                           gm ? gm->source : Py_None);
    }

finish:
    return cpeft_call_end(&call, ret);
}
