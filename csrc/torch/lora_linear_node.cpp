/*
 * cpeft._torch_node: LoRA linear on CPU tensors as a C++ autograd node, the eager fast path of
 * the torch layers (issue 8, item 2).
 *
 * Why it exists: a layer built on a Python torch.autograd.Function pays for Python frames in
 * forward and backward, for five Python-level allocations and for handing every tensor to the C
 * boundary by DLPack, and at a small shape that is most of a training step (docs/benchmarks.md:
 * such a Function, making only this layer's two C calls, costs 1.46-1.49x nn.Linear's step).
 * Here the node, the saved tensors and the outputs are torch's own C++ objects, and the compute
 * functions of cpeft._C are called on their pointers directly, through the table that module
 * lends (cpeft/compute_api.h), so this file holds no arithmetic.
 *
 * It is a fast path, not a second boundary: it takes a call only when every operand is already
 * as the core wants it (CPU, one float dtype the core computes in, BLAS-able strides, no tensor
 * subclass or functorch wrapper, nonzero sizes, one adapter group) and returns None otherwise,
 * so that the Python path, with the C boundary's checks and messages, handles everything else.
 * A call it takes gives exactly what that path gives: same kernels, same saved tensors (x,
 * weight, the adapters and xa = drop(x)·Aᵀ), same gradients, once-differentiable likewise.
 *
 * Threads: like torch's own ops, the compute runs without the GIL on tensors this call holds
 * references to, with shapes and pointers read once, after every Python argument was converted.
 */
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstdint>
#include <utility>

#include "cpeft/compute_api.h"
#include "cpeft/views.h"

#ifndef CPEFT_TORCH_VERSION
#error "CPEFT_TORCH_VERSION (the torch this module is compiled against) must be defined"
#endif

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const cpeft_compute_api *compute = nullptr;

struct Settings {
    double scale;
    bool fan_in_fan_out;
    double dropout;
    uint64_t seed;
};

cpeft_dtype core_dtype(const at::Tensor &t)
{
    return t.scalar_type() == at::kDouble ? CPEFT_FLOAT64 : CPEFT_FLOAT32;
}

/* A 2-D tensor as the core's BLAS-able matrix, transposed for a fan_in_fan_out weight, by the
 * rule the C boundary applies (cpeft_mat_blas_layout, a size-1 dimension's stride free); false
 * where the boundary would copy it or refuse it. */
bool blas_view(const at::Tensor &t, bool transposed, cpeft_mat *m)
{
    int64_t rows = t.size(0), cols = t.size(1), row_stride = t.stride(0), col_stride = t.stride(1);
    if (transposed) {
        std::swap(rows, cols);
        std::swap(row_stride, col_stride);
    }
    if (!cpeft_mat_blas_layout(rows, cols, row_stride, rows <= 1, col_stride, cols <= 1, m))
        return false;
    m->data = t.data_ptr();
    return cpeft_mat_leading_dim(*m) <= INT32_MAX;
}

/* A contiguous tensor (..., cols) as the M x cols matrix of its flattened leading dims. */
cpeft_mat rows_view(const at::Tensor &t, int64_t cols)
{
    return cpeft_mat_compact(t.data_ptr(), t.numel() / cols, cols);
}

/* A dense CPU tensor of `dtype` that the core can read: a torch.Tensor or nn.Parameter itself
 * (a subclass may override what an op means), no functorch or __torch_dispatch__ wrapper, an
 * address aligned to its itemsize. */
bool plain_operand(PyObject *obj, at::ScalarType dtype)
{
    if (!THPVariable_CheckExact(obj))
        return false;
    const at::Tensor &t = THPVariable_Unpack(obj);
    if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() ||
        t.scalar_type() != dtype)
        return false;
    auto wrappers = c10::functorch_transforms_ks | c10::python_ks;
    if (!(t.key_set() & wrappers).empty() || !t.has_storage())
        return false;
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % t.element_size() == 0;
}

/* a's views of x, the weight and the adapters (one adapter group), as the core takes them: true
 * when x is contiguous, the others BLAS-able 2-D views, and every shared size agrees and is
 * nonzero. Forward's test for taking a call and backward's re-check of what it saved. */
bool linear_views(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &lora_a,
                  const at::Tensor &lora_b, bool fan_in_fan_out, cpeft_lora_linear_args *a)
{
    if (x.dim() < 1 || !x.is_contiguous() || weight.dim() != 2 || lora_a.dim() != 2 ||
        lora_b.dim() != 2 || !blas_view(weight, fan_in_fan_out, &a->weight) ||
        !blas_view(lora_a, false, &a->lora_a) || !blas_view(lora_b, false, &a->lora_b))
        return false;
    a->dtype = core_dtype(x);
    a->groups = 1;
    a->enabled[0] = 1;
    a->out = a->weight.rows;
    a->in = a->weight.cols;
    a->r = a->lora_a.rows;
    if (a->in == 0 || a->out == 0 || a->r == 0 || a->in > INT32_MAX || x.size(-1) != a->in ||
        a->lora_a.cols != a->in || a->lora_b.rows != a->out || a->lora_b.cols != a->r)
        return false;
    a->x = rows_view(x, a->in);
    a->m = a->x.rows;
    return true;
}

/* Backward's views of the saved tensors and the incoming gradient (contiguous by then), true
 * when they still fit together as forward checked them: one CPU float dtype, linear_views, and
 * xa and the gradient contiguous with x's rows. */
bool saved_views_agree(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &lora_a,
                       const at::Tensor &lora_b, const at::Tensor &xa, const at::Tensor &grad_out,
                       bool fan_in_fan_out, cpeft_lora_linear_args *a, cpeft_lora_linear_bwd_in *in)
{
    at::ScalarType dtype = x.scalar_type();
    if (dtype != at::kFloat && dtype != at::kDouble)
        return false;
    for (const at::Tensor *t : {&x, &weight, &lora_a, &lora_b, &xa, &grad_out}) {
        if (!t->defined() || t->layout() != at::kStrided || !t->device().is_cpu() ||
            t->scalar_type() != dtype || !t->has_storage())
            return false;
    }
    if (!linear_views(x, weight, lora_a, lora_b, fan_in_fan_out, a) || !xa.is_contiguous() ||
        !grad_out.is_contiguous() || xa.dim() < 1 || xa.size(-1) != a->r ||
        xa.numel() != a->m * a->r || grad_out.dim() < 1 || grad_out.size(-1) != a->out ||
        grad_out.numel() != a->m * a->out)
        return false;
    *in = {rows_view(grad_out, a->out), rows_view(xa, a->r)};
    return true;
}

void raise_status(int code, const cpeft_status &st)
{
    TORCH_CHECK_WITH(OutOfMemoryError, code != CPEFT_ERR_NOMEM, "cpeft: ", st.message);
    TORCH_CHECK(false, "cpeft: ", st.message);
}

class LoraLinearNode : public torch::autograd::Function<LoraLinearNode> {
public:
    /* The caller (lora_linear below) has checked every operand; args holds their views. */
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &weight,
                              const std::optional<at::Tensor> &bias, const at::Tensor &lora_a,
                              const at::Tensor &lora_b, Settings settings,
                              const cpeft_lora_linear_args *args)
    {
        c10::SmallVector<int64_t, 5> shape(x.sizes().begin(), x.sizes().end());
        shape.back() = args->out;
        at::Tensor y = at::empty(shape, x.options());
        shape.back() = args->r;
        at::Tensor xa = at::empty(shape, x.options());
        cpeft_lora_linear_fwd_out out = {rows_view(y, args->out), rows_view(xa, args->r)};
        cpeft_status st;
        int rc = compute->lora_linear_fwd_cpu(args, &out, &st);
        if (rc != CPEFT_OK)
            raise_status(rc, st);
        ctx->save_for_backward({x, weight, lora_a, lora_b, xa});
        ctx->saved_data["scale"] = settings.scale;
        ctx->saved_data["fan_in_fan_out"] = settings.fan_in_fan_out;
        ctx->saved_data["dropout"] = settings.dropout;
        ctx->saved_data["seed"] = static_cast<int64_t>(settings.seed);
        ctx->saved_data["has_bias"] = bias.has_value();
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grad_outputs)
    {
        variable_list saved = ctx->get_saved_variables();
        const at::Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3],
                         &xa = saved[4];
        bool fan_in_fan_out = ctx->saved_data["fan_in_fan_out"].toBool();
        cpeft_lora_linear_args a = {};
        a.scale = ctx->saved_data["scale"].toDouble();
        a.dropout = {ctx->saved_data["dropout"].toDouble(),
                     static_cast<uint64_t>(ctx->saved_data["seed"].toInt()), 0};
        // The gradient of y.sum() or y.mean() is expanded (stride 0): the one copy BLAS needs.
        at::Tensor grad_out = grad_outputs[0].is_contiguous() ? grad_outputs[0]
                                                              : grad_outputs[0].contiguous();
        cpeft_lora_linear_bwd_in in;
        // An in-place write to a saved tensor is refused by get_saved_variables (version
        // counters), but `tensor.data = other` replaces its sizes, strides and memory without
        // one: every view is rebuilt from the tensors as they are now and checked again, so
        // that such a change raises here instead of reading out of bounds.
        TORCH_CHECK(saved_views_agree(x, weight, lora_a, lora_b, xa, grad_out, fan_in_fan_out, &a,
                                      &in),
                    "cpeft LoRA linear backward: a tensor saved by forward (x, weight, lora_a, "
                    "lora_b) no longer has the dtype, device, shape or layout it had then (was "
                    "its .data replaced?)");

        at::Tensor grad_x, grad_weight, grad_bias, grad_a, grad_b;
        cpeft_lora_linear_bwd_out o = {};
        if (ctx->needs_input_grad(0)) {
            grad_x = at::empty(x.sizes(), x.options());
            o.grad_x = rows_view(grad_x, a.in);
        }
        if (ctx->needs_input_grad(1)) {
            grad_weight = at::empty(weight.sizes(), weight.options());
            blas_view(grad_weight, fan_in_fan_out, &o.grad_weight);
        }
        // An absent bias is no input of the node: the adapters' edges come one place earlier.
        bool has_bias = ctx->saved_data["has_bias"].toBool();
        size_t lora_a_edge = has_bias ? 3 : 2, lora_b_edge = lora_a_edge + 1;
        if (has_bias && ctx->needs_input_grad(2)) {
            grad_bias = at::empty({a.out}, x.options());
            o.grad_bias = {grad_bias.data_ptr(), a.out, 1};
        }
        if (ctx->needs_input_grad(lora_a_edge)) {
            grad_a = at::empty(lora_a.sizes(), lora_a.options());
            o.grad_a = rows_view(grad_a, lora_a.size(1));
        }
        if (ctx->needs_input_grad(lora_b_edge)) {
            grad_b = at::empty(lora_b.sizes(), lora_b.options());
            o.grad_b = rows_view(grad_b, lora_b.size(1));
        }
        cpeft_status st;
        int rc = compute->lora_linear_bwd_cpu(&a, &in, &o, &st);
        if (rc != CPEFT_OK)
            raise_status(rc, st);

        variable_list grads = {grad_x, grad_weight, grad_bias, grad_a, grad_b};
        if (torch::autograd::GradMode::is_enabled() && grad_outputs[0].requires_grad()) {
            // create_graph=True: these gradients are not differentiable, so, as Python's
            // once_differentiable does, differentiating them again raises.
            for (at::Tensor &g : grads) {
                if (g.defined()) {
                    g = g.detach();
                    g.set_requires_grad(true);
                }
            }
            grads = torch::autograd::DelayedError("trying to differentiate twice a function that "
                                                  "was marked with @once_differentiable",
                                                  static_cast<int64_t>(grads.size()))
                        .apply(std::move(grads));
        }
        // Settings and the args pointer take no gradient.
        grads.emplace_back();
        grads.emplace_back();
        return grads;
    }
};

/* Releases the GIL for a scope and takes it back on any exit, exceptions included. */
class GilReleased {
public:
    GilReleased() : state_(PyEval_SaveThread()) {}
    ~GilReleased() { PyEval_RestoreThread(state_); }
    GilReleased(const GilReleased &) = delete;
    GilReleased &operator=(const GilReleased &) = delete;

private:
    PyThreadState *state_;
};

PyObject *lora_linear(PyObject *, PyObject *const *args, Py_ssize_t nargs)
{
    HANDLE_TH_ERRORS
    if (nargs != 9) {
        PyErr_Format(PyExc_TypeError,
                     "lora_linear(x, weight, bias, lora_a, lora_b, scale, fan_in_fan_out, dropout, "
                     "seed) takes 9 positional arguments, got %zd",
                     nargs);
        return nullptr;
    }
    PyObject *x_obj = args[0], *weight_obj = args[1], *bias_obj = args[2], *lora_a_obj = args[3],
             *lora_b_obj = args[4];
    // Every Python argument is converted before any tensor is looked at.
    if (!PyFloat_CheckExact(args[5]) || !PyBool_Check(args[6]) || !PyFloat_CheckExact(args[7]) ||
        !PyLong_CheckExact(args[8]))
        Py_RETURN_NONE;
    Settings settings = {PyFloat_AS_DOUBLE(args[5]), args[6] == Py_True, PyFloat_AS_DOUBLE(args[7]),
                         0};
    long long seed = PyLong_AsLongLong(args[8]);
    if (seed == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (seed < 0 || !std::isfinite(settings.scale) || !(settings.dropout >= 0.0) ||
        !(settings.dropout <= 1.0))
        Py_RETURN_NONE;
    settings.seed = static_cast<uint64_t>(seed);

    // A __torch_function__ or __torch_dispatch__ mode sees every op of the Python path; none
    // would see this node's.
    if (!THPVariable_CheckExact(x_obj) || at::impl::torch_function_mode_enabled() ||
        c10::impl::dispatch_mode_enabled())
        Py_RETURN_NONE;
    at::ScalarType dtype = THPVariable_Unpack(x_obj).scalar_type();
    if ((dtype != at::kFloat && dtype != at::kDouble) || !plain_operand(x_obj, dtype) ||
        !plain_operand(weight_obj, dtype) || !plain_operand(lora_a_obj, dtype) ||
        !plain_operand(lora_b_obj, dtype) ||
        (bias_obj != Py_None && !plain_operand(bias_obj, dtype)))
        Py_RETURN_NONE;
    const at::Tensor &x = THPVariable_Unpack(x_obj);
    const at::Tensor &weight = THPVariable_Unpack(weight_obj);
    const at::Tensor &lora_a = THPVariable_Unpack(lora_a_obj);
    const at::Tensor &lora_b = THPVariable_Unpack(lora_b_obj);
    std::optional<at::Tensor> bias;
    if (bias_obj != Py_None)
        bias = THPVariable_Unpack(bias_obj);

    cpeft_lora_linear_args a = {};
    a.scale = settings.scale;
    a.dropout = {settings.dropout, settings.seed, 0};
    if (!linear_views(x, weight, lora_a, lora_b, settings.fan_in_fan_out, &a) || a.m == 0)
        Py_RETURN_NONE;
    if (bias) {
        if (bias->dim() != 1 || bias->size(0) != a.out || (a.out > 1 && bias->stride(0) < 1) ||
            bias->stride(0) > INT32_MAX)
            Py_RETURN_NONE;
        a.bias = {bias->data_ptr(), a.out, a.out > 1 ? bias->stride(0) : 1};
    }

    at::Tensor y;
    {
        GilReleased no_gil;
        y = LoraLinearNode::apply(x, weight, bias, lora_a, lora_b, settings, &a);
    }
    return THPVariable_Wrap(std::move(y));
    END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"lora_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lora_linear)),
     METH_FASTCALL,
     "lora_linear(x, weight, bias, lora_a, lora_b, scale, fan_in_fan_out, dropout, seed)\n--\n\n"
     "cpeft's LoRA linear as a C++ autograd node when every operand is as the CPU core takes it "
     "(see the module's source); None otherwise, for the general path."},
    {nullptr, nullptr, 0, nullptr},
};

int exec_module(PyObject *module)
{
    compute = static_cast<const cpeft_compute_api *>(PyCapsule_Import(CPEFT_COMPUTE_API_CAPSULE,
                                                                      0));
    if (compute == nullptr)
        return -1;
    if (compute->version != CPEFT_COMPUTE_API_VERSION) {
        PyErr_Format(PyExc_ImportError,
                     "cpeft._torch_node was built for version %d of cpeft._C's compute table, "
                     "which has version %d: rebuild cpeft",
                     CPEFT_COMPUTE_API_VERSION, compute->version);
        compute = nullptr;
        return -1;
    }
    return PyModule_AddStringConstant(module, "torch_version", CPEFT_TORCH_VERSION);
}

PyModuleDef_Slot slots[] = {
    {Py_mod_exec, reinterpret_cast<void *>(exec_module)},
    {0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "cpeft._torch_node",
    "LoRA linear as a C++ autograd node over cpeft._C's compute functions (the torch layers' "
    "eager fast path on the CPU).",
    0,
    methods,
    slots,
    nullptr,
    nullptr,
    nullptr,
};

} // namespace

PyMODINIT_FUNC PyInit__torch_node(void) { return PyModuleDef_Init(&module_def); }
