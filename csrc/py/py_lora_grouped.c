/*
 * Entry points of the mixed-adapter LoRA linear (cpeft/lora_grouped.h): forward and backward.
 * The G adapters arrive packed (lora_a (ΣR, IN), lora_b (OUT, ΣR)) with their ranks and scales as
 * Python sequences, and `index` says which adapter each row of x uses (-1: none).
 */
#include "params.h"
#include "cpeft/lora_grouped.h"

typedef struct {
    int64_t *ranks;
    double *scales;
    int64_t count;
    int64_t total_rank;
    int64_t max_rank;
} grouped_lists;

static void grouped_lists_free(grouped_lists *l)
{
    PyMem_Free(l->ranks);
    PyMem_Free(l->scales);
}

/* ranks: G ints >= 1; scales: G finite reals. Converted before any tensor is acquired (items may
 * run Python code through __index__ / __float__); their sum is checked against the packed rank
 * by check_packed_rank once lora_b is known. */
/* A tuple of obj's items: a list is copied, because converting one item (__index__,
 * __float__) may run code that shrinks or clears the list while it is being read. */
static PyObject *sequence_snapshot(PyObject *obj, const char *message)
{
    PyObject *seq = PySequence_Fast(obj, message);
    if (seq == NULL || PyTuple_CheckExact(seq)) {
        return seq;
    }
    PyObject *tuple = PySequence_Tuple(seq);
    Py_DECREF(seq);
    return tuple;
}

static int parse_adapters(PyObject *ranks_obj, PyObject *scales_obj, grouped_lists *l)
{
    PyObject *ranks = sequence_snapshot(ranks_obj, "ranks must be a sequence of ints");
    if (ranks == NULL) {
        return -1;
    }
    PyObject *scales = sequence_snapshot(scales_obj, "scales must be a sequence of numbers");
    if (scales == NULL) {
        Py_DECREF(ranks);
        return -1;
    }
    int rc = -1;
    Py_ssize_t g_count = PySequence_Fast_GET_SIZE(ranks);
    if (g_count < 1 || g_count > CPEFT_MAX_ADAPTERS) {
        PyErr_Format(PyExc_ValueError, "ranks must list between 1 and %d adapters, got %zd",
                     CPEFT_MAX_ADAPTERS, g_count);
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(scales) != g_count) {
        PyErr_Format(PyExc_ValueError,
                     "scales must have one entry per adapter (len(ranks) = %zd), "
                     "got %zd",
                     g_count, PySequence_Fast_GET_SIZE(scales));
        goto done;
    }
    l->ranks = PyMem_Calloc((size_t)g_count, sizeof(int64_t));
    l->scales = PyMem_Calloc((size_t)g_count, sizeof(double));
    if (l->ranks == NULL || l->scales == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t g = 0; g < g_count; ++g) {
        PyObject *item = PySequence_Fast_GET_ITEM(ranks, g);
        long long r = PyLong_Check(item) && !PyBool_Check(item) ? PyLong_AsLongLong(item) : -1;
        if (r == -1 && PyErr_Occurred()) {
            PyErr_Clear();
        }
        if (r < 1 || r > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "ranks[%zd] must be an int >= 1, got %R", g, item);
            goto done;
        }
        l->ranks[g] = r;
        l->total_rank += r;
        l->max_rank = r > l->max_rank ? r : l->max_rank;
        char name[48];
        PyOS_snprintf(name, sizeof name, "scales[%zd]", g);
        if (cpeft_parse_real(PySequence_Fast_GET_ITEM(scales, g), name, &l->scales[g]) < 0 ||
            cpeft_check_finite(l->scales[g], name) < 0) {
            goto done;
        }
    }
    l->count = g_count;
    rc = 0;
done:
    Py_DECREF(ranks);
    Py_DECREF(scales);
    return rc;
}

static int check_packed_rank(const grouped_lists *l, int64_t packed_rank,
                             cpeft_lora_grouped_args *a)
{
    if (l->total_rank != packed_rank) {
        PyErr_Format(PyExc_ValueError,
                     "ranks must sum to the packed rank lora_a.shape[0] = "
                     "lora_b.shape[1] = %lld, got sum %lld",
                     (long long)packed_rank, (long long)l->total_rank);
        return -1;
    }
    a->adapters = l->count;
    a->ranks = l->ranks;
    a->scales = l->scales;
    a->r_max = l->max_rank;
    return 0;
}

/* index: int32/int64 with one entry per row of x. That every entry is in [-1, G) is the compute's
 * to check (before its first write, and again where it reads each entry). */
static int parse_index(cpeft_call *call, PyObject *obj, const cpeft_tensor *x,
                       cpeft_lora_grouped_args *a)
{
    cpeft_tensor *t = cpeft_call_input(call, obj, "index", CPEFT_ROLE_INPUT);
    if (t == NULL || cpeft_check_index_dtype(t) < 0) {
        return -1;
    }
    if (cpeft_numel(t) != a->m) {
        char want[256], got[256];
        cpeft_format_shape(want, sizeof want, x->ndim - 1, x->shape);
        cpeft_format_shape(got, sizeof got, t->ndim, t->shape);
        PyErr_Format(PyExc_ValueError,
                     "index must have one entry per row of x (x.shape[:-1] = %s, "
                     "%lld rows), got shape %s",
                     want, (long long)a->m, got);
        return -1;
    }
    if (cpeft_tensor_vec(t, &a->index) < 0) {
        return -1;
    }
    a->index_dtype = (cpeft_dtype)t->dtype;
    return 0;
}

/* x, weight, lora_a, lora_b (through the plain LoRA linear checks with R = ΣR), then the
 * adapter lists against the packed rank and the index; every Python-level argument was
 * converted before (see cpeft_call_prepare). */
static int parse_common(cpeft_call *call, PyObject *x_obj, PyObject *weight_obj,
                        PyObject *lora_a_obj, PyObject *lora_b_obj, PyObject *index_obj,
                        int fan_in_fan_out, const grouped_lists *lists, cpeft_lora_grouped_args *a,
                        cpeft_tensor **x, cpeft_tensor **weight)
{
    cpeft_lora_linear_args packed = {0};
    cpeft_groups one_group = {.groups = 1, .enabled_count = 1, .enabled = {1}};
    *x = cpeft_call_input(call, x_obj, "x", CPEFT_ROLE_INPUT);
    if (*x == NULL || cpeft_check_min_ndim(*x, 1) < 0 || cpeft_check_float_dtype(*x, NULL) < 0 ||
        cpeft_py_lora_linear_params(call, weight_obj, CPEFT_ROLE_INPUT, lora_a_obj, lora_b_obj, 1.0,
                                    fan_in_fan_out, &one_group, *x, 0, &packed, weight) < 0) {
        return -1;
    }
    a->dtype = packed.dtype;
    a->in = packed.in;
    a->out = packed.out;
    a->weight = packed.weight;
    a->lora_a = packed.lora_a;
    a->lora_b = packed.lora_b;
    a->m = cpeft_leading_numel(*x);
    if (check_packed_rank(lists, packed.r, a) < 0 || parse_index(call, index_obj, *x, a) < 0) {
        return -1;
    }
    return 0;
}

const char cpeft_doc_lora_grouped_forward[] =
    "lora_grouped_forward(x, weight, bias, lora_a, lora_b, index, ranks, scales, *, "
    "fan_in_fan_out=False, dropout=0.0, seed=0, offset=0, out=None, out_xa=None, stream=None)"
    "\n--\n\n"
    "y[m] = x[m] W^T + bias + s_g drop(x[m]) A_g^T B_g^T with g = index[m] (-1: no adapter);\n"
    "adapters packed: lora_a (sum(ranks), IN), lora_b (OUT, sum(ranks)). Returns (y, xa),\n"
    "xa (..., max(ranks)) kept for backward.";

PyObject *cpeft_py_lora_grouped_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames)
{
    static char *kwlist[] = {"x",     "weight", "bias",           "lora_a",  "lora_b", "index",
                             "ranks", "scales", "fan_in_fan_out", "dropout", "seed",   "offset",
                             "out",   "out_xa", "stream",         NULL};
    PyObject *x_obj, *weight_obj, *bias_obj, *lora_a_obj, *lora_b_obj, *index_obj, *ranks_obj,
        *scales_obj;
    PyObject *p = NULL, *seed = NULL, *offset = NULL, *out_obj = Py_None, *out_xa_obj = Py_None,
             *stream = Py_None;
    int fan_in_fan_out = 0;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOOOOO|$pOOOOOO:lora_grouped_forward", kwlist,
                          &x_obj, &weight_obj, &bias_obj, &lora_a_obj, &lora_b_obj, &index_obj,
                          &ranks_obj, &scales_obj, &fan_in_fan_out, &p, &seed, &offset, &out_obj,
                          &out_xa_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    grouped_lists lists = {0};
    cpeft_lora_grouped_args a = {0};
    cpeft_lora_grouped_fwd_out o = {0};
    cpeft_tensor *x, *weight, *bias, *y, *xa;

    PyObject *const tensor_objs[] = {x_obj,     weight_obj, lora_a_obj, lora_b_obj,
                                     index_obj, bias_obj,   out_obj,    out_xa_obj};
    static const char *const tensor_names[] = {"x",     "weight", "lora_a", "lora_b",
                                               "index", "bias",   "out",    "out_xa"};
    if (parse_adapters(ranks_obj, scales_obj, &lists) < 0 ||
        cpeft_parse_dropout(p, seed, offset, &a.dropout) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 8) < 0) {
        goto finish;
    }
    if (parse_common(&call, x_obj, weight_obj, lora_a_obj, lora_b_obj, index_obj, fan_in_fan_out,
                     &lists, &a, &x, &weight) < 0 ||
        cpeft_call_optional_input(&call, bias_obj, "bias", &bias) < 0) {
        goto finish;
    }
    if (bias != NULL && (cpeft_check_float_dtype(bias, x) < 0 ||
                         cpeft_check_shape(bias, 1, &a.out, "(out_features,)") < 0 ||
                         cpeft_tensor_vec(bias, &a.bias) < 0)) {
        goto finish;
    }
    if (cpeft_py_lora_fwd_outputs(&call, out_obj, out_xa_obj, x, a.out, a.r_max, &y, &xa) < 0 ||
        cpeft_tensor_mat(x, 0, &a.x) < 0 || cpeft_tensor_mat(y, 0, &o.y) < 0 ||
        cpeft_tensor_mat(xa, 0, &o.xa) < 0 || cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_lora_grouped_fwd_cpu(&a, &o, &call.status),
                   cpeft_lora_grouped_fwd_cuda(&a, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = PyTuple_Pack(2, y->source, xa->source);
    }

finish:
    grouped_lists_free(&lists);
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_lora_grouped_backward[] =
    "lora_grouped_backward(grad_out, x, weight, lora_a, lora_b, xa, index, ranks, scales, *, "
    "fan_in_fan_out=False, dropout=0.0, seed=0, offset=0, grad_x=True, grad_lora_a=True, "
    "grad_lora_b=True, grad_bias=False, grad_weight=False, stream=None)\n--\n\n"
    "Gradients of lora_grouped_forward as (x, lora_a, lora_b, bias, weight), None where not\n"
    "requested; grad_lora_a / grad_lora_b are packed like lora_a / lora_b.";

PyObject *cpeft_py_lora_grouped_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames)
{
    static char *kwlist[] = {"grad_out",    "x",         "weight",      "lora_a", "lora_b",
                             "xa",          "index",     "ranks",       "scales", "fan_in_fan_out",
                             "dropout",     "seed",      "offset",      "grad_x", "grad_lora_a",
                             "grad_lora_b", "grad_bias", "grad_weight", "stream", NULL};
    PyObject *grad_out_obj, *x_obj, *weight_obj, *lora_a_obj, *lora_b_obj, *xa_obj, *index_obj,
        *ranks_obj, *scales_obj;
    PyObject *p = NULL, *seed = NULL, *offset = NULL, *stream = Py_None;
    PyObject *grad_x_obj = Py_True, *grad_a_obj = Py_True, *grad_b_obj = Py_True,
             *grad_bias_obj = Py_False, *grad_weight_obj = Py_False;
    int fan_in_fan_out = 0;
    if (!cpeft_parse_args(args, nargs, kwnames, "OOOOOOOOO|$pOOOOOOOOO:lora_grouped_backward",
                          kwlist, &grad_out_obj, &x_obj, &weight_obj, &lora_a_obj, &lora_b_obj,
                          &xa_obj, &index_obj, &ranks_obj, &scales_obj, &fan_in_fan_out, &p, &seed,
                          &offset, &grad_x_obj, &grad_a_obj, &grad_b_obj, &grad_bias_obj,
                          &grad_weight_obj, &stream)) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    grouped_lists lists = {0};
    cpeft_lora_grouped_args a = {0};
    cpeft_lora_grouped_bwd_in in = {0};
    cpeft_lora_grouped_bwd_out o = {0};
    cpeft_tensor *x, *weight, *grad_out, *xa;
    cpeft_py_lora_grads grads = {0};
    int64_t shape[CPEFT_MAX_NDIM];

    PyObject *const tensor_objs[] = {grad_out_obj, x_obj,      weight_obj,    lora_a_obj,
                                     lora_b_obj,   xa_obj,     index_obj,     grad_x_obj,
                                     grad_a_obj,   grad_b_obj, grad_bias_obj, grad_weight_obj};
    static const char *const tensor_names[] = {
        "grad_out", "x",      "weight",      "lora_a",      "lora_b",    "xa",
        "index",    "grad_x", "grad_lora_a", "grad_lora_b", "grad_bias", "grad_weight"};
    if (parse_adapters(ranks_obj, scales_obj, &lists) < 0 ||
        cpeft_parse_dropout(p, seed, offset, &a.dropout) < 0 ||
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 12) < 0) {
        goto finish;
    }
    if (parse_common(&call, x_obj, weight_obj, lora_a_obj, lora_b_obj, index_obj, fan_in_fan_out,
                     &lists, &a, &x, &weight) < 0) {
        goto finish;
    }
    int ndim = cpeft_py_leading_shape_with(x, a.out, shape);
    grad_out = cpeft_call_input(&call, grad_out_obj, "grad_out", CPEFT_ROLE_INPUT);
    if (grad_out == NULL || cpeft_check_float_dtype(grad_out, x) < 0 ||
        cpeft_check_shape(grad_out, ndim, shape, "x.shape[:-1] + (out_features,)") < 0) {
        goto finish;
    }
    cpeft_py_leading_shape_with(x, a.r_max, shape);
    xa = cpeft_call_input(&call, xa_obj, "xa", CPEFT_ROLE_INPUT);
    if (xa == NULL || cpeft_check_float_dtype(xa, x) < 0 ||
        cpeft_check_shape(xa, ndim, shape, "x.shape[:-1] + (max(ranks),)") < 0) {
        goto finish;
    }
    PyObject *const grad_requests[] = {grad_x_obj, grad_a_obj, grad_b_obj, grad_bias_obj,
                                       grad_weight_obj};
    if (cpeft_py_lora_grad_outputs(&call, grad_requests, x, weight, a.out, &a.lora_a, &a.lora_b,
                                   x->dtype, &grads) < 0 ||
        cpeft_tensor_mat(x, 0, &a.x) < 0 || cpeft_tensor_mat(grad_out, 0, &in.grad_out) < 0 ||
        cpeft_tensor_mat(xa, 0, &in.xa) < 0 ||
        cpeft_py_lora_grad_views(&grads, fan_in_fan_out, &o.grad_x, &o.grad_a, &o.grad_b,
                                 &o.grad_bias, &o.grad_weight) < 0 ||
        cpeft_call_check_aliasing(&call) < 0) {
        goto finish;
    }

    int rc;
    CPEFT_DISPATCH(&call, rc, cpeft_lora_grouped_bwd_cpu(&a, &in, &o, &call.status),
                   cpeft_lora_grouped_bwd_cuda(&a, &in, &o, call.stream, &call.status));
    if (rc == CPEFT_OK) {
        ret = cpeft_py_lora_grads_tuple(&grads);
    }

finish:
    grouped_lists_free(&lists);
    return cpeft_call_end(&call, ret);
}
