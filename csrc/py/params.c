/*
 * The argument parsers and validators shared by the entry points (params.h): scalars first, then
 * the tensor parameters of each op family, then the outputs of the LoRA linear ops. Each names the
 * argument in its message, says what it expected and shows what came, so a mistake reads the same
 * from cpeft.functional and _C and whichever entry point took it.
 */
#include "params.h"

#include "dtypes.h"

#include <math.h>
#include <stdarg.h>
#include <string.h>

#define MAX_ARGUMENTS 32

/* The position of keyword `key` in kwlist[first, last), or -1. Compared in place (no string object
 * is made to look a name up), first character first. */
static int keyword_position(const char *key, char *const *kwlist, int first, int last)
{
    for (int i = first; i < last; ++i) {
        if (kwlist[i][0] == key[0] && strcmp(kwlist[i], key) == 0) {
            return i;
        }
    }
    return -1;
}

int cpeft_parse_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *format,
                     char *const *kwlist, ...)
{
    const char *function = strchr(format, ':');
    function = function ? function + 1 : "function";
    char kinds[MAX_ARGUMENTS];
    int count = 0, required = -1, positional = -1;
    for (const char *f = format; *f != '\0' && *f != ':' && count < MAX_ARGUMENTS; ++f) {
        if (*f == '|')
            required = count;
        else if (*f == '$')
            positional = count;
        else
            kinds[count++] = *f;
    }
    if (required < 0)
        required = count;
    if (positional < 0)
        positional = count;

    PyObject *values[MAX_ARGUMENTS] = {NULL};
    if (nargs > positional) {
        PyErr_Format(PyExc_TypeError, "%.200s() takes at most %d positional arguments (%zd given)",
                     function, positional, nargs);
        return 0;
    }
    for (Py_ssize_t i = 0; i < nargs; ++i)
        values[i] = args[i];
    Py_ssize_t keywords = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < keywords; ++k) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        const char *name = PyUnicode_AsUTF8(key);
        if (name == NULL) {
            PyErr_Clear();   /* not UTF-8 encodable (a lone surrogate): no argument's name */
            name = "";
        }
        /* Arguments given by position come first; a name among them is reported below. */
        int i = keyword_position(name, kwlist, (int)nargs, count);
        if (i < 0) {
            i = keyword_position(name, kwlist, 0, (int)nargs);
        }
        if (i < 0) {
            PyErr_Format(PyExc_TypeError, "'%U' is an invalid keyword argument for %.200s()", key,
                         function);
            return 0;
        }
        if (values[i] != NULL) {
            PyErr_Format(PyExc_TypeError,
                         "argument for %.200s() given by name ('%s') and "
                         "position (%d)",
                         function, kwlist[i], i + 1);
            return 0;
        }
        values[i] = args[nargs + k];
    }
    for (int i = 0; i < required; ++i) {
        if (values[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%.200s() missing required argument '%s' (pos %d)",
                         function, kwlist[i], i + 1);
            return 0;
        }
    }
    va_list va;
    va_start(va, kwlist);
    int ok = 1;
    for (int i = 0; i < count; ++i) {
        void *destination = va_arg(va, void *);
        if (values[i] == NULL)
            continue;
        if (kinds[i] == 'p') {
            int truth = PyObject_IsTrue(values[i]);
            if (truth < 0) {
                ok = 0;
                break;
            }
            *(int *)destination = truth;
        } else {
            *(PyObject **)destination = values[i];
        }
    }
    va_end(va);
    return ok;
}

int cpeft_parse_real(PyObject *obj, const char *name, double *value)
{
    if (obj == NULL) {
        return 0;
    }
    /* Floats, ints and anything with __float__ / __index__ (NumPy scalars); never strings. */
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a real number, got %.200s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *value = v;
    return 0;
}

int cpeft_check_finite(double value, const char *name)
{
    if (!isfinite(value)) {
        PyObject *shown = PyFloat_FromDouble(value);
        PyErr_Format(PyExc_ValueError, "%s must be a finite number, got %R", name, shown);
        Py_XDECREF(shown);
        return -1;
    }
    return 0;
}

int cpeft_check_probability(double p, const char *name)
{
    if (!(p >= 0.0 && p <= 1.0)) {
        PyObject *shown = PyFloat_FromDouble(p);
        PyErr_Format(PyExc_ValueError, "%s must be a probability in [0, 1], got %R", name, shown);
        Py_XDECREF(shown);
        return -1;
    }
    return 0;
}

/* An integer argument through __index__ (int, bool, NumPy integers, anything that is an integer
 * to Python), never a float: 2.7 as a count or seed is a mistake, not a request to truncate. */
static PyObject *as_index(PyObject *obj, const char *name, const char *expected)
{
    if (PyFloat_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be %s, got %.200s", name, expected,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return PyNumber_Index(obj);
}

int cpeft_parse_u64(PyObject *obj, const char *name, uint64_t *value)
{
    if (obj == NULL) {
        *value = 0;
        return 0;
    }
    PyObject *index = as_index(obj, name, "an int >= 0");
    if (index == NULL) {
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(index);
    Py_DECREF(index);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be an int in [0, 2**64), got %R", name, obj);
        return -1;
    }
    *value = (uint64_t)v;
    return 0;
}

int cpeft_parse_i64(PyObject *obj, const char *name, const char *expected, int64_t *value)
{
    PyObject *index = as_index(obj, name, expected);
    if (index == NULL) {
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "%s must be %s in the int64 range, got %R", name, expected,
                     obj);
        return -1;
    }
    *value = (int64_t)v;
    return 0;
}

int cpeft_parse_groups(PyObject *obj, cpeft_groups *g)
{
    memset(g->enabled, 0, CPEFT_MAX_GROUPS);
    if (obj == NULL || obj == Py_None) {
        g->groups = 1;
        g->enabled[0] = 1;
        g->enabled_count = 1;
        return 0;
    }
    /* A string is a sequence too, but of characters, each of them truthy: never flags. */
    if (PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "enable_lora must be None or a sequence of bools, got %.200s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *seq = PySequence_Fast(obj, "enable_lora must be None or a sequence of bools");
    if (seq == NULL) {
        return -1;
    }
    int rc = -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > CPEFT_MAX_GROUPS) {
        PyErr_Format(PyExc_ValueError, "enable_lora must have between 1 and %d entries, got %zd",
                     CPEFT_MAX_GROUPS, n);
        goto finish;
    }
    int64_t count = 0;
    /* An item's __bool__ may run any code, including code that shrinks the sequence: read each
     * item through its own reference while the list is still n long. */
    for (Py_ssize_t i = 0; i < n && i < PySequence_Fast_GET_SIZE(seq); ++i) {
        PyObject *item = Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
        int truth = PyObject_IsTrue(item);
        Py_DECREF(item);
        if (truth < 0)
            goto finish;
        g->enabled[i] = (uint8_t)truth;
        count += truth;
    }
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_SetString(PyExc_RuntimeError, "enable_lora changed size while it was read");
        goto finish;
    }
    if (count == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "enable_lora must enable at least one group, got all False");
        goto finish;
    }
    g->groups = n;
    g->enabled_count = count;
    rc = 0;
finish:
    Py_DECREF(seq);
    return rc;
}

int cpeft_check_groups(const cpeft_groups *g, int64_t out_features)
{
    if (out_features % g->groups != 0) {
        PyErr_Format(PyExc_ValueError,
                     "enable_lora has %lld groups, which must divide out_features %lld",
                     (long long)g->groups, (long long)out_features);
        return -1;
    }
    return 0;
}

int cpeft_parse_padding_idx(PyObject *obj, int64_t *padding_idx, int *given)
{
    *given = obj != NULL && obj != Py_None;
    *padding_idx = -1;
    if (!*given) {
        return 0;
    }
    return cpeft_parse_i64(obj, "padding_idx", "None or an int", padding_idx);
}

int cpeft_check_padding_idx(int64_t *padding_idx, int given, int64_t num_embeddings)
{
    if (!given) {
        *padding_idx = -1;
        return 0;
    }
    int64_t v = *padding_idx;
    if (v < -num_embeddings || v >= num_embeddings) {
        PyErr_Format(PyExc_ValueError,
                     "padding_idx must be in [-num_embeddings, num_embeddings) = [%lld, %lld), "
                     "got %lld",
                     -(long long)num_embeddings, (long long)num_embeddings, (long long)v);
        return -1;
    }
    *padding_idx = v < 0 ? v + num_embeddings : v;
    return 0;
}

int cpeft_parse_dropout(PyObject *p_obj, PyObject *seed, PyObject *offset, cpeft_dropout *d)
{
    double p = 0.0;
    if (cpeft_parse_real(p_obj, "dropout", &p) < 0 || cpeft_check_probability(p, "dropout") < 0 ||
        cpeft_parse_u64(seed, "seed", &d->seed) < 0 ||
        cpeft_parse_u64(offset, "offset", &d->offset) < 0) {
        return -1;
    }
    d->p = p;
    return 0;
}

/* ---- tensor parameters shared by op families ------------------------------------------------ */

/* lora_a's dtype: the weight's, or float32 beside a weight of a dtype that takes float32 adapters
 * (cpeft_takes_fp32_adapters) when allowed. */
static int check_lora_a_dtype(const cpeft_call *call, const cpeft_tensor *la, const cpeft_tensor *w,
                              int allow_fp32_adapters)
{
    int fp32_allowed = allow_fp32_adapters && cpeft_takes_fp32_adapters(w->dtype);
    if (fp32_allowed && la->dtype == CPEFT_FLOAT32) {
        return 0;
    }
    if (fp32_allowed && la->dtype != w->dtype) {
        PyErr_Format(PyExc_ValueError, "%s must have the dtype of %s (%s) or float32, got %s",
                     la->name, w->name, w->dtype_name, la->dtype_name);
        return -1;
    }
    return cpeft_check_float_dtype(la, w);
}

int cpeft_py_lora_linear_params(cpeft_call *call, PyObject *weight_obj, cpeft_role weight_role,
                                PyObject *lora_a_obj, PyObject *lora_b_obj, double scale,
                                int fan_in_fan_out, const cpeft_groups *groups,
                                const cpeft_tensor *x, int allow_fp32_adapters,
                                cpeft_lora_linear_args *a, cpeft_tensor **weight)
{
    cpeft_tensor *w = cpeft_call_input(call, weight_obj, "weight", weight_role);
    if (w == NULL || cpeft_check_ndim(w, 2) < 0 || cpeft_check_float_dtype(w, x) < 0) {
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
    if (lb == NULL || cpeft_check_ndim(lb, 2) < 0 || cpeft_check_float_dtype(lb, la) < 0) {
        return -1;
    }
    a->dtype = (cpeft_dtype)w->dtype;
    a->fp32_adapters = la->dtype != w->dtype;
    a->r = lb->shape[1];
    a->scale = scale;
    if (a->r < 1) {
        PyErr_Format(PyExc_ValueError,
                     "lora_b must have shape (out_features/groups*k, r) with "
                     "r >= 1, got r = lora_b.shape[1] = %lld",
                     (long long)a->r);
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
    if (cpeft_tensor_mat(w, fan_in_fan_out, &a->weight) < 0 ||
        cpeft_tensor_mat(la, 0, &a->lora_a) < 0 || cpeft_tensor_mat(lb, 0, &a->lora_b) < 0) {
        return -1;
    }
    *weight = w;
    return 0;
}

int cpeft_py_leading_shape_with(const cpeft_tensor *x, int64_t last, int64_t *shape)
{
    for (int i = 0; i + 1 < x->ndim; ++i)
        shape[i] = x->shape[i];
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

int cpeft_py_lora_embedding_params(cpeft_call *call, PyObject *weight_obj, cpeft_role weight_role,
                                   PyObject *lora_a_obj, PyObject *lora_b_obj, double scale,
                                   const cpeft_tensor *like, cpeft_lora_embedding_args *a,
                                   cpeft_tensor **weight)
{
    cpeft_tensor *w = NULL;
    if (weight_obj != NULL) {
        w = cpeft_call_input(call, weight_obj, "weight", weight_role);
        if (w == NULL || cpeft_check_ndim(w, 2) < 0 || cpeft_check_float_dtype(w, like) < 0) {
            return -1;
        }
        like = w;
    }
    cpeft_tensor *la = cpeft_call_input(call, lora_a_obj, "lora_a", CPEFT_ROLE_INPUT);
    if (la == NULL || cpeft_check_ndim(la, 2) < 0 || cpeft_check_float_dtype(la, like) < 0) {
        return -1;
    }
    cpeft_tensor *lb = cpeft_call_input(call, lora_b_obj, "lora_b", CPEFT_ROLE_INPUT);
    if (lb == NULL || cpeft_check_ndim(lb, 2) < 0 || cpeft_check_float_dtype(lb, la) < 0) {
        return -1;
    }
    a->dtype = (cpeft_dtype)la->dtype;
    a->num_embeddings = w ? w->shape[0] : la->shape[1];
    a->dim = w ? w->shape[1] : lb->shape[0];
    a->r = lb->shape[1];
    a->scale = scale;
    if (a->r < 1) {
        PyErr_Format(PyExc_ValueError,
                     "lora_b must have shape (embedding_dim, r) with r >= 1, "
                     "got r = lora_b.shape[1] = %lld",
                     (long long)a->r);
        return -1;
    }
    int64_t expect_a[2] = {a->r, a->num_embeddings};
    int64_t expect_b[2] = {a->dim, a->r};
    if (cpeft_check_shape(la, 2, expect_a, "(r, num_embeddings)") < 0 ||
        cpeft_check_shape(lb, 2, expect_b, "(embedding_dim, r)") < 0) {
        return -1;
    }
    if ((w && cpeft_tensor_mat(w, 0, &a->weight) < 0) || cpeft_tensor_mat(la, 0, &a->lora_a) < 0 ||
        cpeft_tensor_mat(lb, 0, &a->lora_b) < 0) {
        return -1;
    }
    *weight = w;
    return 0;
}

int cpeft_py_indices(cpeft_call *call, PyObject *obj, cpeft_tensor **t, cpeft_vec *vec)
{
    *t = cpeft_call_input(call, obj, "indices", CPEFT_ROLE_INPUT);
    if (*t == NULL || cpeft_check_index_dtype(*t) < 0 || cpeft_tensor_vec(*t, vec) < 0) {
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
    for (int i = 0; i < indices->ndim; ++i)
        shape[i] = indices->shape[i];
    shape[indices->ndim] = dim;
    return indices->ndim + 1;
}

int cpeft_py_ia3_l(cpeft_call *call, PyObject *obj, int64_t count, const char *meaning,
                   const cpeft_tensor *like, cpeft_tensor **l, cpeft_vec *vec)
{
    cpeft_tensor *t = cpeft_call_input(call, obj, "ia3_l", CPEFT_ROLE_INPUT);
    if (t == NULL || cpeft_check_float_dtype(t, like) < 0) {
        return -1;
    }
    int ok = (t->ndim == 1 && t->shape[0] == count) ||
             (t->ndim == 2 && ((t->shape[0] == count && t->shape[1] == 1) ||
                               (t->shape[0] == 1 && t->shape[1] == count)));
    if (!ok) {
        char got[256];
        cpeft_format_shape(got, sizeof got, t->ndim, t->shape);
        PyErr_Format(PyExc_ValueError,
                     "ia3_l must have n = %lld entries (%s) in shape (n,), (n, 1) or (1, n), "
                     "got shape %s",
                     (long long)count, meaning, got);
        return -1;
    }
    *l = t;
    return cpeft_tensor_vec(t, vec);
}

int cpeft_py_lora_fwd_outputs(cpeft_call *call, PyObject *out_obj, PyObject *out_xa_obj,
                              const cpeft_tensor *x, int64_t out, int64_t xa_cols, cpeft_tensor **y,
                              cpeft_tensor **xa)
{
    int64_t shape[CPEFT_MAX_NDIM];
    int ndim = cpeft_py_leading_shape_with(x, out, shape);
    if (cpeft_call_output(call, out_obj, "out", 1, x->dtype, ndim, shape, y) < 0) {
        return -1;
    }
    cpeft_py_leading_shape_with(x, xa_cols, shape);
    return cpeft_call_output(call, out_xa_obj, "out_xa", 1, x->dtype, ndim, shape, xa);
}

int cpeft_py_lora_grad_outputs(cpeft_call *call, PyObject *const objs[5], const cpeft_tensor *x,
                               const cpeft_tensor *weight, int64_t out, const cpeft_mat *lora_a,
                               const cpeft_mat *lora_b, int adapter_dtype,
                               cpeft_py_lora_grads *grads)
{
    if (cpeft_call_output(call, objs[0], "grad_x", 0, x->dtype, x->ndim, x->shape, &grads->x) < 0 ||
        cpeft_call_output(call, objs[1], "grad_lora_a", 0, adapter_dtype, 2,
                          (int64_t[]){lora_a->rows, lora_a->cols}, &grads->lora_a) < 0 ||
        cpeft_call_output(call, objs[2], "grad_lora_b", 0, adapter_dtype, 2,
                          (int64_t[]){lora_b->rows, lora_b->cols}, &grads->lora_b) < 0 ||
        cpeft_call_output(call, objs[3], "grad_bias", 0, x->dtype, 1, &out, &grads->bias) < 0 ||
        cpeft_call_output(call, objs[4], "grad_weight", 0, x->dtype, 2, weight->shape,
                          &grads->weight) < 0) {
        return -1;
    }
    return 0;
}

int cpeft_py_lora_grad_views(const cpeft_py_lora_grads *grads, int fan_in_fan_out,
                             cpeft_mat *grad_x, cpeft_mat *grad_a, cpeft_mat *grad_b,
                             cpeft_vec *grad_bias, cpeft_mat *grad_weight)
{
    if ((grads->x && cpeft_tensor_mat(grads->x, 0, grad_x) < 0) ||
        (grads->lora_a && cpeft_tensor_mat(grads->lora_a, 0, grad_a) < 0) ||
        (grads->lora_b && cpeft_tensor_mat(grads->lora_b, 0, grad_b) < 0) ||
        (grads->bias && cpeft_tensor_vec(grads->bias, grad_bias) < 0) ||
        (grads->weight && cpeft_tensor_mat(grads->weight, fan_in_fan_out, grad_weight) < 0)) {
        return -1;
    }
    return 0;
}

static PyObject *source_or_none(const cpeft_tensor *t) { return t ? t->source : Py_None; }

PyObject *cpeft_py_lora_grads_tuple(const cpeft_py_lora_grads *grads)
{
    return PyTuple_Pack(5, source_or_none(grads->x), source_or_none(grads->lora_a),
                        source_or_none(grads->lora_b), source_or_none(grads->bias),
                        source_or_none(grads->weight));
}
