/*
 * Entry points of LoRA embedding (loralib Embedding): forward and backward.
 * indices (...) flattened to N; weight (V, D); lora_a (R, V); lora_b (D, R); y (..., D).
 */
#include "py_ops.h"

int cpeft_py_lora_embedding_params(cpeft_call *call, PyObject *weight_obj, cpeft_role weight_role,
                                   PyObject *lora_a_obj, PyObject *lora_b_obj, double scale,
                                   const cpeft_tensor *like, cpeft_lora_embedding_args *a,
                                   cpeft_tensor **weight)
{
    cpeft_tensor *w = NULL;
    if (weight_obj != NULL) {
        w = cpeft_call_input(call, weight_obj, "weight", weight_role);
        if (w == NULL || cpeft_check_ndim(w, 2) < 0 ||
            cpeft_check_float_dtype(call, w, like) < 0) {
            return -1;
        }
        like = w;
    }
    cpeft_tensor *la = cpeft_call_input(call, lora_a_obj, "lora_a", CPEFT_ROLE_INPUT);
    if (la == NULL || cpeft_check_ndim(la, 2) < 0 || cpeft_check_float_dtype(call, la, like) < 0) {
        return -1;
    }
    cpeft_tensor *lb = cpeft_call_input(call, lora_b_obj, "lora_b", CPEFT_ROLE_INPUT);
    if (lb == NULL || cpeft_check_ndim(lb, 2) < 0 || cpeft_check_float_dtype(call, lb, la) < 0) {
        return -1;
    }
    a->dtype = (cpeft_dtype)la->dtype;
    a->num_embeddings = w ? w->shape[0] : la->shape[1];
    a->dim = w ? w->shape[1] : lb->shape[0];
    a->r = lb->shape[1];
    a->scale = scale;
    if (a->r < 1) {
        PyErr_Format(PyExc_ValueError, "lora_b must have shape (embedding_dim, r) with r >= 1, "
                     "got r = lora_b.shape[1] = %lld", (long long)a->r);
        return -1;
    }
    int64_t expect_a[2] = {a->r, a->num_embeddings};
    int64_t expect_b[2] = {a->dim, a->r};
    if (cpeft_check_shape(la, 2, expect_a, "(r, num_embeddings)") < 0 ||
        cpeft_check_shape(lb, 2, expect_b, "(embedding_dim, r)") < 0) {
        return -1;
    }
    if ((w && cpeft_tensor_mat(call, w, 0, &a->weight) < 0) ||
        cpeft_tensor_mat(call, la, 0, &a->lora_a) < 0 ||
        cpeft_tensor_mat(call, lb, 0, &a->lora_b) < 0) {
        return -1;
    }
    *weight = w;
    return 0;
}

int cpeft_py_indices(cpeft_call *call, PyObject *obj, int64_t num_embeddings, cpeft_tensor **t,
                     cpeft_vec *vec)
{
    *t = cpeft_call_input(call, obj, "indices", CPEFT_ROLE_INPUT);
    if (*t == NULL || cpeft_check_index_dtype(*t) < 0 || cpeft_tensor_vec(call, *t, vec) < 0 ||
        cpeft_check_indices_in_range(call, *t, *vec, num_embeddings) < 0) {
        return -1;
    }
    return 0;
}

int cpeft_py_embedding_shape(const cpeft_tensor *indices, int64_t dim, int64_t *shape)
{
    if (indices->ndim + 1 > CPEFT_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "indices must have fewer than %d dimensions, got %d",
                     CPEFT_MAX_NDIM, indices->ndim);
        return -1;
    }
    for (int i = 0; i < indices->ndim; ++i) shape[i] = indices->shape[i];
    shape[indices->ndim] = dim;
    return indices->ndim + 1;
}

const char cpeft_doc_lora_embedding_forward[] =
    "lora_embedding_forward(indices, weight, lora_a, lora_b, scale, *, padding_idx=None, "
    "out=None, stream=None)\n--\n\n"
    "y[n] = weight[indices[n]] + scale * (lora_a[:, indices[n]] @ lora_b.T); y has shape\n"
    "indices.shape + (embedding_dim,). out: None/True allocate NumPy, or an array to write.";

PyObject *cpeft_py_lora_embedding_forward(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"indices", "weight", "lora_a", "lora_b", "scale", "padding_idx",
                             "out", "stream", NULL};
    PyObject *indices_obj, *weight_obj, *lora_a_obj, *lora_b_obj, *scale;
    PyObject *padding_obj = Py_None, *out_obj = Py_None, *stream = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|$OOO:lora_embedding_forward", kwlist,
                                     &indices_obj, &weight_obj, &lora_a_obj, &lora_b_obj, &scale,
                                     &padding_obj, &out_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_init(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_lora_embedding_args a = {0};
    cpeft_tensor *weight, *indices, *y;
    cpeft_mat y_mat;
    int64_t shape[CPEFT_MAX_NDIM];
    int ndim, padding_given;
    double scale_value;
    PyObject *const tensor_objs[] = {indices_obj, weight_obj, lora_a_obj, lora_b_obj, out_obj};
    static const char *const tensor_names[] = {"indices", "weight", "lora_a", "lora_b", "out"};

    if (cpeft_py_parse_scale(scale, &scale_value) < 0 ||
        cpeft_parse_padding_idx(padding_obj, &a.padding_idx, &padding_given) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 5) < 0 ||
        cpeft_py_lora_embedding_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj,
                                       lora_b_obj, scale_value, NULL, &a, &weight) < 0 ||
        cpeft_check_padding_idx(&a.padding_idx, padding_given, a.num_embeddings) < 0 ||
        cpeft_py_indices(&call, indices_obj, a.num_embeddings, &indices, &a.indices) < 0 ||
        (ndim = cpeft_py_embedding_shape(indices, a.dim, shape)) < 0 ||
        cpeft_call_output(&call, out_obj, "out", 1, a.dtype, ndim, shape, &y) < 0 ||
        cpeft_tensor_mat(&call, y, 0, &y_mat) < 0 || cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }
    a.index_dtype = (cpeft_dtype)indices->dtype;
    a.n = a.indices.len;

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_lora_embedding_fwd_cpu(&a, y_mat, &call.status),
                   cpeft_lora_embedding_fwd_cuda(&a, y_mat, call.stream, &call.status));
    if (rc != CPEFT_OK) {
        cpeft_raise_status(call.state, &call.status);
        goto finish;
    }
    ret = Py_NewRef(y->source);

finish:
    cpeft_call_release(&call);
    return ret;
}

const char cpeft_doc_lora_embedding_backward[] =
    "lora_embedding_backward(grad_out, indices, lora_a, lora_b, scale, *, padding_idx=None, "
    "grad_lora_a=True, grad_lora_b=True, grad_weight=False, stream=None)\n--\n\n"
    "Gradients of lora_embedding_forward as (lora_a, lora_b, weight), None where not requested.\n"
    "Rows whose index is padding_idx contribute nothing to grad_lora_a and grad_weight.";

PyObject *cpeft_py_lora_embedding_backward(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"grad_out", "indices", "lora_a", "lora_b", "scale", "padding_idx",
                             "grad_lora_a", "grad_lora_b", "grad_weight", "stream", NULL};
    PyObject *grad_out_obj, *indices_obj, *lora_a_obj, *lora_b_obj, *scale;
    PyObject *padding_obj = Py_None, *stream = Py_None, *grad_a_obj = Py_True,
             *grad_b_obj = Py_True, *grad_weight_obj = Py_False;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|$OOOOO:lora_embedding_backward",
                                     kwlist, &grad_out_obj, &indices_obj, &lora_a_obj,
                                     &lora_b_obj, &scale, &padding_obj, &grad_a_obj, &grad_b_obj,
                                     &grad_weight_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_init(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    cpeft_lora_embedding_args a = {0};
    cpeft_lora_embedding_bwd_in in = {0};
    cpeft_lora_embedding_bwd_out o = {0};
    cpeft_tensor *weight, *indices, *grad_out, *ga, *gb, *gw;
    int64_t shape[CPEFT_MAX_NDIM];
    int ndim, padding_given;
    double scale_value;
    PyObject *const tensor_objs[] = {grad_out_obj, indices_obj, lora_a_obj, lora_b_obj,
                                     grad_a_obj, grad_b_obj, grad_weight_obj};
    static const char *const tensor_names[] = {"grad_out", "indices", "lora_a", "lora_b",
                                               "grad_lora_a", "grad_lora_b", "grad_weight"};
    if (cpeft_py_parse_scale(scale, &scale_value) < 0 ||
        cpeft_parse_padding_idx(padding_obj, &a.padding_idx, &padding_given) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 7) < 0) {
        goto finish;
    }

    grad_out = cpeft_call_input(&call, grad_out_obj, "grad_out", CPEFT_ROLE_INPUT);
    if (grad_out == NULL || cpeft_check_float_dtype(&call, grad_out, NULL) < 0 ||
        cpeft_py_lora_embedding_params(&call, NULL, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                       scale_value, grad_out, &a, &weight) < 0 ||
        cpeft_check_padding_idx(&a.padding_idx, padding_given, a.num_embeddings) < 0 ||
        cpeft_py_indices(&call, indices_obj, a.num_embeddings, &indices, &a.indices) < 0 ||
        (ndim = cpeft_py_embedding_shape(indices, a.dim, shape)) < 0 ||
        cpeft_check_shape(grad_out, ndim, shape, "indices.shape + (embedding_dim,)") < 0 ||
        cpeft_call_output(&call, grad_a_obj, "grad_lora_a", 0, a.dtype, 2,
                          (int64_t[]){a.r, a.num_embeddings}, &ga) < 0 ||
        cpeft_call_output(&call, grad_b_obj, "grad_lora_b", 0, a.dtype, 2,
                          (int64_t[]){a.dim, a.r}, &gb) < 0 ||
        cpeft_call_output(&call, grad_weight_obj, "grad_weight", 0, a.dtype, 2,
                          (int64_t[]){a.num_embeddings, a.dim}, &gw) < 0 ||
        cpeft_tensor_mat(&call, grad_out, 0, &in.grad_out) < 0 ||
        (ga && cpeft_tensor_mat(&call, ga, 0, &o.grad_a) < 0) ||
        (gb && cpeft_tensor_mat(&call, gb, 0, &o.grad_b) < 0) ||
        (gw && cpeft_tensor_mat(&call, gw, 0, &o.grad_weight) < 0) ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }
    a.index_dtype = (cpeft_dtype)indices->dtype;
    a.n = a.indices.len;

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_lora_embedding_bwd_cpu(&a, &in, &o, &call.status),
                   cpeft_lora_embedding_bwd_cuda(&a, &in, &o, call.stream, &call.status));
    if (rc != CPEFT_OK) {
        cpeft_raise_status(call.state, &call.status);
        goto finish;
    }
    ret = PyTuple_Pack(3, ga ? ga->source : Py_None, gb ? gb->source : Py_None,
                       gw ? gw->source : Py_None);

finish:
    cpeft_call_release(&call);
    return ret;
}
