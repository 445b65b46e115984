/*
 * The argument parsers and validators the entry points (py_*.c) share, in one place so that a
 * message is the same whichever entry point the caller used. Scalars are converted before
 * cpeft_call_begin (their conversion may run Python code); the tensor parameters of an op family
 * are acquired, checked and viewed after it, and so are the outputs the two LoRA linear ops (plain
 * and grouped) share. Entry points include this header and nothing else of the boundary's.
 */
#ifndef CPEFT_PY_PARAMS_H
#define CPEFT_PY_PARAMS_H

#include "call.h"
#include "checks.h"
#include "views.h"

/* ---- the argument list ----------------------------------------------------------------------- */

/*
 * An entry point's arguments as METH_FASTCALL | METH_KEYWORDS passes them (no tuple or dict is
 * built for the call), bound like PyArg_ParseTupleAndKeywords with a format of 'O' (the object,
 * borrowed) and 'p' (its truth value as an int) items, '|' before the optional ones, '$' before
 * the keyword-only ones and ':' before the function name. kwlist names every item; an argument
 * not given leaves its variable as it was. Like PyArg_ParseTupleAndKeywords, returns 1, or 0 with
 * TypeError (or the error of a __bool__) on failure.
 */
int cpeft_parse_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *format,
                     char *const *kwlist, ...);

/* ---- scalar arguments ------------------------------------------------------------------------ */

/* A real number (float, int, NumPy scalar); obj NULL leaves *value as it is. */
int cpeft_parse_real(PyObject *obj, const char *name, double *value);
int cpeft_check_finite(double value, const char *name);
int cpeft_check_probability(double p, const char *name);
int cpeft_parse_u64(PyObject *obj, const char *name, uint64_t *value);
/* dropout p in [0, 1], seed and offset ints >= 0 (NULL: 0). */
int cpeft_parse_dropout(PyObject *p_obj, PyObject *seed, PyObject *offset, cpeft_dropout *d);
/* Any integer through __index__ (never a float) in the int64 range; `expected` completes
 * "name must be ..." in messages. */
int cpeft_parse_i64(PyObject *obj, const char *name, const char *expected, int64_t *value);

/* enable_lora: None (one group, enabled) or a sequence of at most CPEFT_MAX_GROUPS truthy/falsy
 * items, at least one enabled. Parsed before any tensor is acquired (an item's __bool__ is Python
 * code); that the groups divide out_features is checked once the weight is known. */
typedef struct {
    int64_t groups;
    int64_t enabled_count;
    uint8_t enabled[CPEFT_MAX_GROUPS];
} cpeft_groups;
int cpeft_parse_groups(PyObject *obj, cpeft_groups *groups);
int cpeft_check_groups(const cpeft_groups *groups, int64_t out_features);
/* padding_idx: None (given = 0, -1) or an integer; its range [-V, V) is checked, and a negative
 * value normalized to [0, V), by cpeft_check_padding_idx once V is known. */
int cpeft_parse_padding_idx(PyObject *obj, int64_t *padding_idx, int *given);
int cpeft_check_padding_idx(int64_t *padding_idx, int given, int64_t num_embeddings);

/* scale: a finite real number. */
int cpeft_py_parse_scale(PyObject *scale_obj, double *scale);
/* A finite scale and enable_lora, the scalars of a LoRA linear call. */
int cpeft_py_lora_linear_scalars(PyObject *scale_obj, PyObject *enable_lora, double *scale,
                                 cpeft_groups *groups);

/* ---- tensor parameters of the op families ---------------------------------------------------- */

/*
 * weight (OUT, IN), or (IN, OUT) with fan_in_fan_out; lora_a (R*K, IN); lora_b (OUT/G*K, R);
 * enable_lora splitting OUT into G groups of which K carry an adapter; a finite scale. Fills
 * every field of `a` except x, bias, m and dropout. x (or NULL for merges) must share the dtype
 * and have IN features; it is checked right after the weight so a layout mistake is reported
 * against the weight rather than the adapter. weight_role is CPEFT_ROLE_INPLACE for merges.
 * allow_fp32_adapters: float32 lora_a / lora_b are also accepted with a float16/bfloat16 weight
 * (sets a->fp32_adapters; the forward and backward ops support it, merges do not).
 */
int cpeft_py_lora_linear_params(cpeft_call *call, PyObject *weight_obj, cpeft_role weight_role,
                                PyObject *lora_a_obj, PyObject *lora_b_obj, double scale,
                                int fan_in_fan_out, const cpeft_groups *groups,
                                const cpeft_tensor *x, int allow_fp32_adapters,
                                cpeft_lora_linear_args *a, cpeft_tensor **weight);

/*
 * weight (V, D) when weight_obj is not NULL; lora_a (R, V); lora_b (D, R). Fills dtype,
 * num_embeddings, dim, r, weight (data NULL when absent), lora_a, lora_b and scale of `a`;
 * `like` (or NULL) is the tensor whose dtype all must share.
 */
int cpeft_py_lora_embedding_params(cpeft_call *call, PyObject *weight_obj, cpeft_role weight_role,
                                   PyObject *lora_a_obj, PyObject *lora_b_obj, double scale,
                                   const cpeft_tensor *like, cpeft_lora_embedding_args *a,
                                   cpeft_tensor **weight);

/* indices (...) int32/int64; its flat view goes to vec. Their range is the compute's to check (it
 * scans them before its first write and checks each where it is used). */
int cpeft_py_indices(cpeft_call *call, PyObject *obj, cpeft_tensor **t, cpeft_vec *vec);

/* indices.shape + (dim,) into shape; returns its ndim, or -1 when that is too many dims. */
int cpeft_py_embedding_shape(const cpeft_tensor *indices, int64_t dim, int64_t *shape);

/* x.shape[-1] must be in_features; messages name x (or whatever t is). */
int cpeft_py_check_in_features(const cpeft_tensor *x, int64_t in);

/* x.shape[:-1] + (last,) into shape; returns its ndim (x has at least one dim). */
int cpeft_py_leading_shape_with(const cpeft_tensor *x, int64_t last, int64_t *shape);

/*
 * ia3_l for a vector scaling of `count` entries: shape (count,), (count, 1) or (1, count), the
 * dtype of `like`. `meaning` says what count is ("out_features", ...).
 */
int cpeft_py_ia3_l(cpeft_call *call, PyObject *obj, int64_t count, const char *meaning,
                   const cpeft_tensor *like, cpeft_tensor **l, cpeft_vec *vec);

/* ---- outputs of the LoRA linear ops, plain and grouped --------------------------------------- */

/* out (x.shape[:-1] + (out,)) and out_xa (x.shape[:-1] + (xa_cols,)), both always written and in
 * x's dtype, resolved with cpeft_call_output in that order. */
int cpeft_py_lora_fwd_outputs(cpeft_call *call, PyObject *out_obj, PyObject *out_xa_obj,
                              const cpeft_tensor *x, int64_t out, int64_t xa_cols, cpeft_tensor **y,
                              cpeft_tensor **xa);

/* The gradients of a LoRA linear backward in the order of its result tuple; each NULL when its
 * grad_* argument did not request it. */
typedef struct {
    cpeft_tensor *x, *lora_a, *lora_b, *bias, *weight;
} cpeft_py_lora_grads;

/*
 * Resolve the grad_x, grad_lora_a, grad_lora_b, grad_bias and grad_weight arguments (objs, in that
 * order, which is the order their errors are raised in) with cpeft_call_output: grad_x like x;
 * grad_lora_a and grad_lora_b shaped like the lora_a and lora_b views, in adapter_dtype (each op
 * has its own rule for it); grad_bias (out,) with out the out_features, and grad_weight like
 * weight, both in x's dtype.
 */
int cpeft_py_lora_grad_outputs(cpeft_call *call, PyObject *const objs[5], const cpeft_tensor *x,
                               const cpeft_tensor *weight, int64_t out, const cpeft_mat *lora_a,
                               const cpeft_mat *lora_b, int adapter_dtype,
                               cpeft_py_lora_grads *grads);

/*
 * The compute's views of the requested gradients (those not requested are left as they are, data
 * NULL); grad_weight is viewed as W's (OUT, IN), so transposed with fan_in_fan_out. Not part of
 * cpeft_py_lora_grad_outputs because the entry points view their inputs in between, and that
 * order decides which error a call with several unusable tensors raises.
 */
int cpeft_py_lora_grad_views(const cpeft_py_lora_grads *grads, int fan_in_fan_out,
                             cpeft_mat *grad_x, cpeft_mat *grad_a, cpeft_mat *grad_b,
                             cpeft_vec *grad_bias, cpeft_mat *grad_weight);

/* The backward's result (x, lora_a, lora_b, bias, weight gradients), None where not requested. */
PyObject *cpeft_py_lora_grads_tuple(const cpeft_py_lora_grads *grads);

#endif /* CPEFT_PY_PARAMS_H */
