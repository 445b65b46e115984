/*
 * Entry points of merge and unmerge (cpeft/merge.h), in place on the weight with an exact
 * unmerge through a record of the elements whose round trip would not restore them bit for bit.
 *
 * Each merge entry point works in one of three ways:
 *   count_only=True     the count pass only; returns the record size and writes nothing,
 *   index/value None    NumPy weights: count pass, record allocated as NumPy arrays, apply pass,
 *   index/value arrays  a record the caller allocated with exactly the counted size
 *                       (cpeft.functional does this with the weight's own framework).
 * A LoRA merge's caller that allocates the record also passes delta, a scratch for ΔW (merge.h):
 * the count_only call writes ΔW there, the merge reads it, so the GEMMs run once.
 * Unmerge takes the record as inputs and writes the recorded values back after the arithmetic.
 */
#include "params.h"

typedef enum {
    MODE_COUNT,
    MODE_MERGE,
    MODE_UNMERGE,
} merge_mode;

/* One tensor merged in place (a weight, or an IA3 bias) and its record. */
typedef struct {
    const char *index_name, *value_name;
    int is_lora;
    cpeft_lora_linear_args lora;   /* LoRA: the adapter and the target's (OUT, IN) view */
    cpeft_dtype dtype;             /* IA3: the target's dtype, view, scale vector, scaled axis */
    cpeft_mat target;
    cpeft_vec l;
    int along_cols;
    int64_t count;                 /* exceptions found by the count pass */
    void *delta;                   /* LoRA: the caller's ΔW scratch, or NULL */
    cpeft_tensor *index, *value;   /* bound record */
    cpeft_merge_record rec;
} merge_target;

/* Elements of the merged view, the range of the record's linear indices. */
static int64_t target_size(const merge_target *m)
{
    return m->is_lora ? m->lora.out * m->lora.in : m->target.rows * m->target.cols;
}

static int run_pass(cpeft_call *call, merge_target *m, int direction)
{
    int rc;
    if (m->is_lora) {
        CPEFT_DISPATCH(call, rc, cpeft_lora_merge_cpu(&m->lora, direction, &m->rec, &call->status),
                       cpeft_lora_merge_cuda(&m->lora, direction, &m->rec, call->stream,
                                             &call->status));
    } else {
        CPEFT_DISPATCH(call, rc,
                       cpeft_ia3_merge_cpu(m->dtype, m->target, m->l, m->along_cols, direction,
                                           &m->rec, &call->status),
                       cpeft_ia3_merge_cuda(m->dtype, m->target, m->l, m->along_cols, direction,
                                            &m->rec, call->stream, &call->status));
    }
    if (rc == CPEFT_ERR_INDEX && direction == CPEFT_UNMERGE) {
        /* The compute checks every recorded index before it writes anything (and again where it
         * uses it): an index outside the weight is a record made for another tensor. */
        cpeft_reraise_with_context(PyExc_ValueError,
                                   "%s must hold linear indices in [0, %lld) for this weight; was "
                                   "the record made for another tensor?",
                                   m->index_name, (long long)target_size(m));
    }
    return rc == CPEFT_OK ? 0 : -1;
}

/* A count_only call computes ΔW into m->delta; a merge reads the ΔW its count_only call left. */
static int count_pass(cpeft_call *call, merge_target *m, merge_mode mode)
{
    memset(&m->rec, 0, sizeof m->rec);   /* index NULL with CPEFT_MERGE: count only */
    m->rec.delta = m->delta;
    m->rec.delta_ready = mode == MODE_MERGE;
    if (run_pass(call, m, CPEFT_MERGE) < 0) {
        return -1;
    }
    m->count = m->rec.count;
    return 0;
}

/* Bind index (int64) and value (the target's dtype), 1-D and unit-stride, to m->rec: outputs of
 * exactly the counted size for a merge (None allocates NumPy arrays), inputs of equal length for
 * an unmerge. */
static int bind_record(cpeft_call *call, merge_target *m, merge_mode mode, PyObject *index_obj,
                       PyObject *value_obj)
{
    int64_t n = m->count;
    if (mode == MODE_MERGE && index_obj == Py_None && value_obj == Py_None) {
        if (cpeft_call_output(call, Py_True, m->index_name, 1, CPEFT_INT64, 1, &n, &m->index) < 0 ||
            cpeft_call_output(call, Py_True, m->value_name, 1, m->dtype, 1, &n, &m->value) < 0) {
            return -1;
        }
    } else {
        if (index_obj == Py_None || value_obj == Py_None) {
            PyErr_Format(PyExc_ValueError, "%s and %s must be given together", m->index_name,
                         m->value_name);
            return -1;
        }
        cpeft_role role = mode == MODE_MERGE ? CPEFT_ROLE_OUTPUT : CPEFT_ROLE_INPUT;
        m->index = cpeft_call_input(call, index_obj, m->index_name, role);
        if (m->index == NULL || cpeft_check_ndim(m->index, 1) < 0) {
            return -1;
        }
        if (m->index->dtype != CPEFT_INT64) {
            PyErr_Format(PyExc_ValueError, "%s must have dtype int64, got %s", m->index_name,
                         m->index->dtype_name);
            return -1;
        }
        if (mode == MODE_UNMERGE) {
            n = m->index->shape[0];
        } else if (m->index->shape[0] != n) {
            PyErr_Format(PyExc_ValueError,
                         "%s must have exactly %lld entries (this merge's count pass), got %lld",
                         m->index_name, (long long)n, (long long)m->index->shape[0]);
            return -1;
        }
        m->value = cpeft_call_input(call, value_obj, m->value_name, role);
        if (m->value == NULL) {
            return -1;
        }
        if (m->value->dtype != (int)m->dtype) {
            PyErr_Format(PyExc_ValueError, "%s must have the weight's dtype %s, got %s",
                         m->value_name, cpeft_dtype_name(m->dtype), m->value->dtype_name);
            return -1;
        }
        if (cpeft_check_shape(m->value, 1, &n, "the length of the record's index") < 0) {
            return -1;
        }
    }
    void *index_data, *value_data;
    if (cpeft_tensor_contiguous(m->index, &index_data) < 0 ||
        cpeft_tensor_contiguous(m->value, &value_data) < 0) {
        return -1;
    }
    /* A NULL index means "count only" to the compute layer, and DLPack producers export empty
     * tensors with data == NULL: an empty record still has to merge, so it gets a valid address
     * that is never dereferenced (capacity 0). */
    static int64_t empty_record_slot;
    m->rec.index = index_data ? index_data : &empty_record_slot;
    m->rec.value = value_data ? value_data : (void *)&empty_record_slot;
    m->rec.capacity = n;
    m->rec.count = mode == MODE_UNMERGE ? n : 0;
    return 0;
}

/* delta (None or a 1-D contiguous array with as many elements as the weight, of the accumulation
 * dtype): written by a count_only call, read by a merge. Unmerge recomputes ΔW and takes none. */
static int bind_delta(cpeft_call *call, merge_target *m, merge_mode mode, PyObject *delta_obj)
{
    if (delta_obj == Py_None) {
        return 0;
    }
    cpeft_tensor *t = cpeft_call_input(call, delta_obj, "delta",
                                       mode == MODE_COUNT ? CPEFT_ROLE_OUTPUT : CPEFT_ROLE_INPUT);
    if (t == NULL) {
        return -1;
    }
    int acc = (int)cpeft_acc_dtype(m->dtype);
    if (t->dtype != acc) {
        PyErr_Format(PyExc_ValueError,
                     "delta must have dtype %s (the dtype a %s weight accumulates in), got %s",
                     cpeft_dtype_name(acc), cpeft_dtype_name(m->dtype), t->dtype_name);
        return -1;
    }
    int64_t n = m->lora.out * m->lora.in;
    void *data;
    if (cpeft_check_shape(t, 1, &n, "(the weight's number of elements,)") < 0 ||
        cpeft_tensor_contiguous(t, &data) < 0 || cpeft_call_check_aliasing(call) < 0) {
        return -1;
    }
    m->delta = data;
    return 0;
}

/* The compute checks a record before its own pass writes. An unmerge of two targets (an IA3
 * weight and its bias) runs two passes, and the second record's check would come after the first
 * pass wrote: on the CPU that record is scanned before any pass, so that a refused call modifies
 * nothing. (Device records are checked by the compute only, a scan here would need a copy.) */
static int check_later_record(const cpeft_call *call, const merge_target *m)
{
    if (cpeft_call_on_cuda(call))
        return 0;
    int64_t size = target_size(m);
    const int64_t *index = m->rec.index;
    for (int64_t i = 0; i < m->rec.count; ++i) {
        if (index[i] < 0 || index[i] >= size) {
            PyErr_Format(PyExc_ValueError,
                         "%s must hold linear indices in [0, %lld) for this weight; was the record "
                         "made for another tensor?: record index[%lld] = %lld is outside it",
                         m->index_name, (long long)size, (long long)i, (long long)index[i]);
            return -1;
        }
    }
    return 0;
}

/* The shared tail of every merge entry point once its targets are validated: count, bind the
 * records, check aliasing, apply. `records` holds an (index, value) pair of objects per target.
 * Returns the Python result (see the file comment), or NULL with an exception set. */
static PyObject *run_merge(cpeft_call *call, merge_mode mode, merge_target *targets, int n,
                           PyObject *const *records, int as_tuple_of_pairs)
{
    for (int i = 0; mode != MODE_UNMERGE && i < n; ++i) {
        if (count_pass(call, &targets[i], mode) < 0)
            return NULL;
    }
    if (mode == MODE_COUNT) {
        if (!as_tuple_of_pairs)
            return PyLong_FromLongLong(targets[0].count);
        return n == 2
                   ? Py_BuildValue("(LL)", (long long)targets[0].count, (long long)targets[1].count)
                   : Py_BuildValue("(LO)", (long long)targets[0].count, Py_None);
    }
    for (int i = 0; i < n; ++i) {
        if (bind_record(call, &targets[i], mode, records[2 * i], records[2 * i + 1]) < 0) {
            return NULL;
        }
    }
    if (cpeft_call_check_aliasing(call) < 0)
        return NULL;
    for (int i = 1; mode == MODE_UNMERGE && i < n; ++i) {
        if (check_later_record(call, &targets[i]) < 0)
            return NULL;
    }
    for (int i = 0; i < n; ++i) {
        merge_target *m = &targets[i];
        if (run_pass(call, m, mode == MODE_MERGE ? CPEFT_MERGE : CPEFT_UNMERGE) < 0)
            return NULL;
        if (mode == MODE_MERGE && m->rec.count != m->count) {
            /* The two passes see the same weight (and ΔW scratch) unless something wrote to it
             * in between; two cpeft merges are refused up front (call.c), so this is another
             * writer. */
            PyErr_Format(PyExc_RuntimeError,
                         "the weight%s changed while it was being merged (the merge pass found "
                         "%lld elements to record where the count pass found %lld): another "
                         "thread wrote to it during the call, and its values are now "
                         "unspecified",
                         m->delta != NULL ? " or delta" : "", (long long)m->rec.count,
                         (long long)m->count);
            return NULL;
        }
    }
    if (mode == MODE_UNMERGE)
        Py_RETURN_NONE;
    PyObject *pairs[2] = {NULL, NULL};
    for (int i = 0; i < n; ++i) {
        pairs[i] = PyTuple_Pack(2, targets[i].index->source, targets[i].value->source);
        if (pairs[i] == NULL) {
            Py_XDECREF(pairs[0]);
            return NULL;
        }
    }
    if (!as_tuple_of_pairs)
        return pairs[0];
    PyObject *result = PyTuple_Pack(2, pairs[0], n == 2 ? pairs[1] : Py_None);
    Py_DECREF(pairs[0]);
    Py_XDECREF(pairs[1]);
    return result;
}

static merge_mode merge_mode_of(int count_only) { return count_only ? MODE_COUNT : MODE_MERGE; }

/* ---- LoRA linear ---------------------------------------------------------------------------- */

static PyObject *lora_merge_impl(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames, int unmerge)
{
    static char *merge_kwlist[] = {"weight",         "lora_a",      "lora_b", "scale",
                                   "fan_in_fan_out", "enable_lora", "index",  "value",
                                   "count_only",     "delta",       "stream", NULL};
    static char *unmerge_kwlist[] = {"weight", "lora_a",         "lora_b",      "scale",  "index",
                                     "value",  "fan_in_fan_out", "enable_lora", "stream", NULL};
    PyObject *weight_obj, *lora_a_obj, *lora_b_obj, *scale, *enable_lora = Py_None,
                                                            *stream = Py_None, *delta_obj = Py_None;
    PyObject *records[2] = {Py_None, Py_None};
    int fan_in_fan_out = 0, count_only = 0, ok;
    if (unmerge) {
        ok = cpeft_parse_args(args, nargs, kwnames, "OOOOOO|$pOO:lora_unmerge", unmerge_kwlist,
                              &weight_obj, &lora_a_obj, &lora_b_obj, &scale, &records[0],
                              &records[1], &fan_in_fan_out, &enable_lora, &stream);
    } else {
        ok = cpeft_parse_args(args, nargs, kwnames, "OOOO|$pOOOpOO:lora_merge", merge_kwlist,
                              &weight_obj, &lora_a_obj, &lora_b_obj, &scale, &fan_in_fan_out,
                              &enable_lora, &records[0], &records[1], &count_only, &delta_obj,
                              &stream);
    }
    if (!ok) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    merge_target m = {.index_name = "record.index", .value_name = "record.value", .is_lora = 1};
    cpeft_tensor *weight;
    double scale_value;
    cpeft_groups groups;
    PyObject *const tensor_objs[] = {weight_obj, lora_a_obj, lora_b_obj,
                                     records[0], records[1], delta_obj};
    static const char *const tensor_names[] = {"weight",       "lora_a",       "lora_b",
                                               "record.index", "record.value", "delta"};
    if (cpeft_py_lora_linear_scalars(scale, enable_lora, &scale_value, &groups) == 0 &&
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 6) == 0 &&
        cpeft_py_lora_linear_params(&call, weight_obj, CPEFT_ROLE_INPLACE, lora_a_obj, lora_b_obj,
                                    scale_value, fan_in_fan_out, &groups, NULL, 0, &m.lora,
                                    &weight) == 0) {
        m.dtype = m.lora.dtype;
        merge_mode mode = unmerge ? MODE_UNMERGE : merge_mode_of(count_only);
        if (bind_delta(&call, &m, mode, delta_obj) == 0) {
            ret = run_merge(&call, mode, &m, 1, records, 0);
        }
    }
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_lora_merge[] =
    "lora_merge(weight, lora_a, lora_b, scale, *, fan_in_fan_out=False, enable_lora=None, "
    "index=None, value=None, count_only=False, delta=None, stream=None)\n--\n\n"
    "weight[(OUT, IN) view] += scale * B_k A_k on each enabled group, in place. Returns the\n"
    "record (index int64, value weight.dtype), or its size with count_only=True. delta, a\n"
    "scratch of OUT*IN elements (float32 for float16/bfloat16 weights, else weight.dtype),\n"
    "keeps dW from the count_only call for the merge that follows, so it is computed once.";

PyObject *cpeft_py_lora_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    return lora_merge_impl(module, args, nargs, kwnames, 0);
}

const char cpeft_doc_lora_unmerge[] =
    "lora_unmerge(weight, lora_a, lora_b, scale, index, value, *, fan_in_fan_out=False, "
    "enable_lora=None, stream=None)\n--\n\n"
    "Undo lora_merge in place, bit for bit, given its record and the same adapter.";

PyObject *cpeft_py_lora_unmerge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    return lora_merge_impl(module, args, nargs, kwnames, 1);
}

/* ---- LoRA embedding: the (V, D) weight merges as its (D, V) view with B (D, R), A (R, V) --- */

static PyObject *lora_embedding_merge_impl(PyObject *module, PyObject *const *args,
                                           Py_ssize_t nargs, PyObject *kwnames, int unmerge)
{
    static char *merge_kwlist[] = {"weight", "lora_a",     "lora_b", "scale",  "index",
                                   "value",  "count_only", "delta",  "stream", NULL};
    static char *unmerge_kwlist[] = {"weight", "lora_a", "lora_b", "scale",
                                     "index",  "value",  "stream", NULL};
    PyObject *weight_obj, *lora_a_obj, *lora_b_obj, *scale, *stream = Py_None, *delta_obj = Py_None;
    PyObject *records[2] = {Py_None, Py_None};
    int count_only = 0, ok;
    if (unmerge) {
        ok = cpeft_parse_args(args, nargs, kwnames, "OOOOOO|$O:lora_embedding_unmerge",
                              unmerge_kwlist, &weight_obj, &lora_a_obj, &lora_b_obj, &scale,
                              &records[0], &records[1], &stream);
    } else {
        ok = cpeft_parse_args(args, nargs, kwnames, "OOOO|$OOpOO:lora_embedding_merge",
                              merge_kwlist, &weight_obj, &lora_a_obj, &lora_b_obj, &scale,
                              &records[0], &records[1], &count_only, &delta_obj, &stream);
    }
    if (!ok) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    merge_target m = {.index_name = "record.index", .value_name = "record.value", .is_lora = 1};
    cpeft_lora_embedding_args e = {0};
    cpeft_tensor *weight;
    double scale_value;
    PyObject *const tensor_objs[] = {weight_obj, lora_a_obj, lora_b_obj,
                                     records[0], records[1], delta_obj};
    static const char *const tensor_names[] = {"weight",       "lora_a",       "lora_b",
                                               "record.index", "record.value", "delta"};
    if (cpeft_py_parse_scale(scale, &scale_value) == 0 &&
        cpeft_call_prepare(&call, tensor_objs, tensor_names, 6) == 0 &&
        cpeft_py_lora_embedding_params(&call, weight_obj, CPEFT_ROLE_INPLACE, lora_a_obj,
                                       lora_b_obj, scale_value, NULL, &e, &weight) == 0) {
        m.dtype = e.dtype;
        m.lora.dtype = e.dtype;
        m.lora.out = e.dim;
        m.lora.in = e.num_embeddings;
        m.lora.r = e.r;
        m.lora.groups = 1;
        m.lora.enabled[0] = 1;
        m.lora.weight = (cpeft_mat){e.weight.data, e.weight.cols, e.weight.rows,
                                    e.weight.col_stride, e.weight.row_stride};
        m.lora.lora_a = e.lora_a;
        m.lora.lora_b = e.lora_b;
        m.lora.scale = e.scale;
        merge_mode mode = unmerge ? MODE_UNMERGE : merge_mode_of(count_only);
        if (bind_delta(&call, &m, mode, delta_obj) == 0) {
            ret = run_merge(&call, mode, &m, 1, records, 0);
        }
    }
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_lora_embedding_merge[] =
    "lora_embedding_merge(weight, lora_a, lora_b, scale, *, index=None, value=None, "
    "count_only=False, delta=None, stream=None)\n--\n\n"
    "weight (V, D) += scale * (B A)^T in place; the record indexes the (D, V) view. delta\n"
    "(V*D elements) as in lora_merge.";

PyObject *cpeft_py_lora_embedding_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames)
{
    return lora_embedding_merge_impl(module, args, nargs, kwnames, 0);
}

const char cpeft_doc_lora_embedding_unmerge[] =
    "lora_embedding_unmerge(weight, lora_a, lora_b, scale, index, value, *, stream=None)\n--\n\n"
    "Undo lora_embedding_merge in place, bit for bit.";

PyObject *cpeft_py_lora_embedding_unmerge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames)
{
    return lora_embedding_merge_impl(module, args, nargs, kwnames, 1);
}

/* ---- IA3: targets in their own stored 2-D view, a bias as (1, OUT) --------------------------- */

/* weight in its stored layout, scaled by ia3_l along its columns (scale_cols) or rows; `meaning`
 * names what that axis is for messages. */
static int ia3_target(cpeft_call *call, PyObject *weight_obj, PyObject *l_obj, int scale_cols,
                      const char *meaning, merge_target *m, cpeft_tensor **weight, cpeft_tensor **l)
{
    cpeft_tensor *w = cpeft_call_input(call, weight_obj, "weight", CPEFT_ROLE_INPLACE);
    if (w == NULL || cpeft_check_ndim(w, 2) < 0 || cpeft_check_float_dtype(w, NULL) < 0 ||
        cpeft_tensor_mat(w, 0, &m->target) < 0) {
        return -1;
    }
    m->dtype = (cpeft_dtype)w->dtype;
    m->along_cols = scale_cols;
    int64_t count = scale_cols ? w->shape[1] : w->shape[0];
    if (cpeft_py_ia3_l(call, l_obj, count, meaning, w, l, &m->l) < 0) {
        return -1;
    }
    *weight = w;
    return 0;
}

static PyObject *ia3_merge_impl(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames, int unmerge)
{
    static char *merge_kwlist[] = {"weight",         "ia3_l",      "bias",   "feedforward",
                                   "fan_in_fan_out", "index",      "value",  "bias_index",
                                   "bias_value",     "count_only", "stream", NULL};
    static char *unmerge_kwlist[] = {"weight",         "ia3_l",      "index",      "value",
                                     "bias",           "bias_index", "bias_value", "feedforward",
                                     "fan_in_fan_out", "stream",     NULL};
    PyObject *weight_obj, *l_obj, *bias_obj = Py_None, *stream = Py_None;
    PyObject *records[4] = {Py_None, Py_None, Py_None, Py_None};
    int feedforward = 0, fan_in_fan_out = 0, count_only = 0, ok;
    if (unmerge) {
        ok = cpeft_parse_args(args, nargs, kwnames, "OOOO|$OOOppO:ia3_unmerge", unmerge_kwlist,
                              &weight_obj, &l_obj, &records[0], &records[1], &bias_obj, &records[2],
                              &records[3], &feedforward, &fan_in_fan_out, &stream);
    } else {
        ok = cpeft_parse_args(args, nargs, kwnames, "OO|$OppOOOOpO:ia3_merge", merge_kwlist,
                              &weight_obj, &l_obj, &bias_obj, &feedforward, &fan_in_fan_out,
                              &records[0], &records[1], &records[2], &records[3], &count_only,
                              &stream);
    }
    if (!ok) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    merge_target targets[2] = {
        {.index_name = "records[0].index", .value_name = "records[0].value"},
        {.index_name = "records[1].index", .value_name = "records[1].value"},
    };
    cpeft_tensor *weight, *l, *bias = NULL;
    /* Output scaling scales the OUT axis, input scaling (feedforward) the IN axis; in the stored
     * layout OUT is the row axis unless fan_in_fan_out stores the weight as (IN, OUT). */
    int scale_cols = feedforward ? !fan_in_fan_out : fan_in_fan_out;
    int n = 1;
    PyObject *const tensor_objs[] = {weight_obj, l_obj,      bias_obj,  records[0],
                                     records[1], records[2], records[3]};
    static const char *const tensor_names[] = {
        "weight",           "ia3_l",           "bias", "records[0].index", "records[0].value",
        "records[1].index", "records[1].value"};
    if (cpeft_call_prepare(&call, tensor_objs, tensor_names, 7) < 0) {
        goto finish;
    }
    if (ia3_target(&call, weight_obj, l_obj, scale_cols,
                   feedforward ? "in_features, feedforward" : "out_features", &targets[0], &weight,
                   &l) < 0) {
        goto finish;
    }
    /* peft leaves the bias of feedforward modules alone: it is added after the scaled GEMM.
     * It is still checked like any bias (and must not alias the weight), so a mistake in it is
     * reported whichever kind of module it belongs to. */
    if (bias_obj != Py_None) {
        int64_t out = fan_in_fan_out ? weight->shape[1] : weight->shape[0];
        bias = cpeft_call_input(&call, bias_obj, "bias",
                                feedforward ? CPEFT_ROLE_INPUT : CPEFT_ROLE_INPLACE);
        if (bias == NULL || cpeft_check_float_dtype(bias, weight) < 0 ||
            cpeft_check_shape(bias, 1, &out, "(out_features,)") < 0) {
            goto finish;
        }
    }
    if (!feedforward && bias != NULL) {
        if (cpeft_tensor_mat(bias, 0, &targets[1].target) < 0) {
            goto finish;
        }
        targets[1].dtype = targets[0].dtype;
        targets[1].l = targets[0].l;
        targets[1].along_cols = 1;
        n = 2;
    }
    ret = run_merge(&call, unmerge ? MODE_UNMERGE : merge_mode_of(count_only), targets, n, records,
                    1);

finish:
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_ia3_merge[] =
    "ia3_merge(weight, ia3_l, *, bias=None, feedforward=False, fan_in_fan_out=False, "
    "index=None, value=None, bias_index=None, bias_value=None, count_only=False, "
    "stream=None)\n--\n\n"
    "weight *= l along OUT (or IN when feedforward) in place, and bias *= l with output\n"
    "scaling. Returns ((index, value), (bias_index, bias_value) or None); with count_only, the\n"
    "record sizes (weight's, bias's or None).";

PyObject *cpeft_py_ia3_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    return ia3_merge_impl(module, args, nargs, kwnames, 0);
}

const char cpeft_doc_ia3_unmerge[] =
    "ia3_unmerge(weight, ia3_l, index, value, *, bias=None, bias_index=None, bias_value=None, "
    "feedforward=False, fan_in_fan_out=False, stream=None)\n--\n\n"
    "Undo ia3_merge in place, bit for bit, given its records.";

PyObject *cpeft_py_ia3_unmerge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    return ia3_merge_impl(module, args, nargs, kwnames, 1);
}

static PyObject *ia3_embedding_merge_impl(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwnames, int unmerge)
{
    static char *merge_kwlist[] = {"weight",     "ia3_l",  "index", "value",
                                   "count_only", "stream", NULL};
    static char *unmerge_kwlist[] = {"weight", "ia3_l", "index", "value", "stream", NULL};
    PyObject *weight_obj, *l_obj, *stream = Py_None;
    PyObject *records[2] = {Py_None, Py_None};
    int count_only = 0, ok;
    if (unmerge) {
        ok = cpeft_parse_args(args, nargs, kwnames, "OOOO|$O:ia3_embedding_unmerge", unmerge_kwlist,
                              &weight_obj, &l_obj, &records[0], &records[1], &stream);
    } else {
        ok = cpeft_parse_args(args, nargs, kwnames, "OO|$OOpO:ia3_embedding_merge", merge_kwlist,
                              &weight_obj, &l_obj, &records[0], &records[1], &count_only, &stream);
    }
    if (!ok) {
        return NULL;
    }
    cpeft_call call;
    if (cpeft_call_begin(&call, module, stream) < 0) {
        return NULL;
    }
    PyObject *ret = NULL;
    merge_target m = {.index_name = "record.index", .value_name = "record.value"};
    cpeft_tensor *weight, *l;
    PyObject *const tensor_objs[] = {weight_obj, l_obj, records[0], records[1]};
    static const char *const tensor_names[] = {"weight", "ia3_l", "record.index", "record.value"};
    if (cpeft_call_prepare(&call, tensor_objs, tensor_names, 4) == 0 &&
        ia3_target(&call, weight_obj, l_obj, 1, "embedding_dim", &m, &weight, &l) == 0) {
        ret = run_merge(&call, unmerge ? MODE_UNMERGE : merge_mode_of(count_only), &m, 1, records,
                        0);
    }
    return cpeft_call_end(&call, ret);
}

const char cpeft_doc_ia3_embedding_merge[] =
    "ia3_embedding_merge(weight, ia3_l, *, index=None, value=None, count_only=False, "
    "stream=None)\n--\n\n"
    "weight (V, D) *= l along D in place; returns the record (index, value).";

PyObject *cpeft_py_ia3_embedding_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames)
{
    return ia3_embedding_merge_impl(module, args, nargs, kwnames, 0);
}

const char cpeft_doc_ia3_embedding_unmerge[] =
    "ia3_embedding_unmerge(weight, ia3_l, index, value, *, stream=None)\n--\n\n"
    "Undo ia3_embedding_merge in place, bit for bit.";

PyObject *cpeft_py_ia3_embedding_unmerge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames)
{
    return ia3_embedding_merge_impl(module, args, nargs, kwnames, 1);
}
