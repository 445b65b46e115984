/*
 * Entry points of LoRA embedding (loralib Embedding): forward and backward.
 * indices (...) flattened to N; weight (V, D); lora_a (R, V); lora_b (D, R); y (..., D).
 */
#include "params.h"

const char cpeft_doc_lora_embedding_forward[] =
    "lora_embedding_forward(indices, weight, lora_a, lora_b, scale, *, padding_idx=None, "
    "out=None, stream=None)\n--\n\n"
    "y[n] = weight[indices[n]] + scale * (lora_a[:, indices[n]] @ lora_b.T); y has shape\n"
    "indices.shape + (embedding_dim,). out: None/True allocate NumPy, or an array to write.";

PyObject *cpeft_py_lora_embedding_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames)
{
    static char *kwlist[] = {"indices",     "weight", "lora_a", "lora_b", "scale",
                             "padding_idx", "out",    "stream", NULL};
    PyObject *indices_obj, *weight_obj, *lora_a_obj, *lora_b_obj, *scale;
    PyObject *padding_obj = Py_None, *out_obj = Py_None, *stream = Py_None;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOO|$OOO:lora_embedding_forward", kwlist,
                          &indices_obj, &weight_obj, &lora_a_obj, &lora_b_obj, &scale, &padding_obj,
                          &out_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
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
        cpeft_py_lora_embedding_params(&call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                       scale_value, NULL, &a, &weight) < 0 ||
        cpeft_check_padding_idx(&a.padding_idx, padding_given, a.num_embeddings) < 0 ||
        cpeft_py_indices(&call, indices_obj, &indices, &a.indices) < 0 ||
        (ndim = cpeft_py_embedding_shape(indices, a.dim, shape)) < 0 ||
        cpeft_call_output(&call, out_obj, "out", 1, a.dtype, ndim, shape, &y) < 0 ||
        cpeft_tensor_mat(y, 0, &y_mat) < 0 || cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }
    a.index_dtype = (cpeft_dtype)indices->dtype;
    a.n = a.indices.len;

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_lora_embedding_fwd_cpu(&a, y_mat, &call.status),
                   cpeft_lora_embedding_fwd_cuda(&a, y_mat, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = Py_NewRef(y->source);
    }

finish:
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_lora_embedding_backward[] =
    "lora_embedding_backward(grad_out, indices, lora_a, lora_b, scale, *, padding_idx=None, "
    "grad_lora_a=True, grad_lora_b=True, grad_weight=False, stream=None)\n--\n\n"
    "Gradients of lora_embedding_forward as (lora_a, lora_b, weight), None where not requested.\n"
    "Rows whose index is padding_idx contribute nothing to grad_lora_a and grad_weight.";

PyObject *cpeft_py_lora_embedding_backward(PyObject *module, PyObject *const *args,
                                           Py_ssize_t nargs, PyObject *kwnames)
{
    static char *kwlist[] = {"grad_out",    "indices",     "lora_a",      "lora_b",
                             "scale",       "padding_idx", "grad_lora_a", "grad_lora_b",
                             "grad_weight", "stream",      NULL};
    PyObject *grad_out_obj, *indices_obj, *lora_a_obj, *lora_b_obj, *scale;
    PyObject *padding_obj = Py_None, *stream = Py_None, *grad_a_obj = Py_True,
             *grad_b_obj = Py_True, *grad_weight_obj = Py_False;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOO|$OOOOO:lora_embedding_backward", kwlist,
                          &grad_out_obj, &indices_obj, &lora_a_obj, &lora_b_obj, &scale,
                          &padding_obj, &grad_a_obj, &grad_b_obj, &grad_weight_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
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
    PyObject *const tensor_objs[] = {grad_out_obj, indices_obj, lora_a_obj,     lora_b_obj,
                                     grad_a_obj,   grad_b_obj,  grad_weight_obj};
    static const char *const tensor_names[] = {"grad_out",    "indices",     "lora_a",     "lora_b",
                                               "grad_lora_a", "grad_lora_b", "grad_weight"};
    if (cpeft_py_parse_scale(scale, &scale_value) < 0 ||
        cpeft_parse_padding_idx(padding_obj, &a.padding_idx, &padding_given) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 7) < 0) {
        goto finish;
    }

    grad_out = cpeft_call_input(&call, grad_out_obj, "grad_out", CPEFT_ROLE_INPUT);
    if (grad_out == NULL || cpeft_check_float_dtype(grad_out, NULL) < 0 ||
        cpeft_py_lora_embedding_params(&call, NULL, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj,
                                       scale_value, grad_out, &a, &weight) < 0 ||
        cpeft_check_padding_idx(&a.padding_idx, padding_given, a.num_embeddings) < 0 ||
        cpeft_py_indices(&call, indices_obj, &indices, &a.indices) < 0 ||
        (ndim = cpeft_py_embedding_shape(indices, a.dim, shape)) < 0 ||
        cpeft_check_shape(grad_out, ndim, shape, "indices.shape + (embedding_dim,)") < 0 ||
        cpeft_call_output(&call, grad_a_obj, "grad_lora_a", 0, a.dtype, 2,
                          (int64_t[]){a.r, a.num_embeddings}, &ga) < 0 ||
        cpeft_call_output(&call, grad_b_obj, "grad_lora_b", 0, a.dtype, 2, (int64_t[]){a.dim, a.r},
                          &gb) < 0 ||
        cpeft_call_output(&call, grad_weight_obj, "grad_weight", 0, a.dtype, 2,
                          (int64_t[]){a.num_embeddings, a.dim}, &gw) < 0 ||
        cpeft_tensor_mat(grad_out, 0, &in.grad_out) < 0 ||
        (ga && cpeft_tensor_mat(ga, 0, &o.grad_a) < 0) ||
        (gb && cpeft_tensor_mat(gb, 0, &o.grad_b) < 0) ||
        (gw && cpeft_tensor_mat(gw, 0, &o.grad_weight) < 0) ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }
    a.index_dtype = (cpeft_dtype)indices->dtype;
    a.n = a.indices.len;

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_lora_embedding_bwd_cpu(&a, &in, &o, &call.status),
                   cpeft_lora_embedding_bwd_cuda(&a, &in, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = PyTuple_Pack(3, ga ? ga->source : Py_None, gb ? gb->source : Py_None,
                           gw ? gw->source : Py_None);
    }

finish:
    return cpeft_call_end(&call, ret);
}
