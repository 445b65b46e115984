"""cpeft._torch_node, the C++ autograd node LoRA linear layers take on the CPU (issue 8, item 2).

It is a fast path over the same compute functions as the Python ``LoraLinearFunction``, so the
reference here is that Function itself, bit for bit: outputs, every gradient, what is saved for
backward. Where an operand is not as the core reads it, or a transform, mode or subclass is
involved, the node must decline and leave the call to the Python path (its checks, its messages).
Every other test of the layers runs through the node too, since it is what the layers take.
"""

import threading

import pytest

torch = pytest.importorskip("torch")

import cpeft  # noqa: E402
from cpeft import _autograd  # noqa: E402

pytestmark = pytest.mark.skipif(
    _autograd._lora_linear_node is None,
    reason=f"cpeft._torch_node not in use: {_autograd.TORCH_NODE_UNAVAILABLE}",
)

NODE = "CppNode"  # torch's name for a C++ autograd.Function node


def _node_name(y):
    return y.grad_fn.name()


@pytest.fixture
def python_path(monkeypatch):
    """Runs the block on the Python autograd.Function only."""

    def disable():
        monkeypatch.setattr(_autograd, "_lora_linear_node", None)

    return disable


def _step(layer, x, loss, seed=5):
    """(y, grads of x and of every parameter that requires grad) of one fwd+bwd."""
    params = [p for p in layer.parameters() if p.requires_grad]
    inputs = ([x] if x.requires_grad else []) + params
    for t in inputs:
        t.grad = None
    torch.manual_seed(seed)
    y = layer(x)
    loss(y).backward()
    return y.detach().clone(), [t.grad.clone() for t in inputs], y.grad_fn.name()


LOSSES = {
    # y.sum() hands backward an expanded (stride-0) gradient; mean a scaled one.
    "sum": lambda y: y.sum(),
    "mean": lambda y: y.mean(),
    "cross_entropy": lambda y: torch.nn.functional.cross_entropy(
        y.reshape(-1, y.shape[-1]), torch.arange(y.reshape(-1, y.shape[-1]).shape[0]) % y.shape[-1]
    ),
    "weighted": lambda y: (y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum(),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize(
    "x_shape,in_f,out_f,r",
    [((16, 64), 64, 48, 8), ((2, 7, 33), 33, 17, 3), ((5,), 5, 1, 1), ((1, 1), 1, 9, 1)],
)
def test_node_equals_the_python_function_bit_for_bit(
    python_path, dtype, bias, fan_in_fan_out, dropout, loss, x_shape, in_f, out_f, r
):
    torch.manual_seed(0)
    layer = cpeft.Linear(
        in_f,
        out_f,
        r=r,
        lora_alpha=2 * r,
        bias=bias,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=dropout,
    ).to(dtype)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(*x_shape, dtype=dtype, requires_grad=True)
    y_node, grads_node, name = _step(layer, x, LOSSES[loss])
    assert NODE in name
    python_path()
    y_py, grads_py, name_py = _step(layer, x, LOSSES[loss])
    assert "LoraLinearFunction" in name_py
    assert torch.equal(y_node, y_py)
    assert len(grads_node) == len(grads_py) == (4 if bias else 3)
    for g_node, g_py in zip(grads_node, grads_py):
        assert g_node.dtype == g_py.dtype and g_node.shape == g_py.shape
        assert torch.equal(g_node, g_py)


def test_node_matches_a_float64_torch_formula():
    """Beside the parity above, an independent reference: plain torch in float64."""
    torch.manual_seed(1)
    layer = cpeft.Linear(37, 29, r=5, lora_alpha=7, bias=True)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 11, 37, requires_grad=True)
    y = layer(x)
    assert NODE in y.grad_fn.name()
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    w, b = layer.weight.double(), layer.bias.detach().double().requires_grad_()
    a = layer.lora_A.detach().double().requires_grad_()
    bb = layer.lora_B.detach().double().requires_grad_()
    ref = x64 @ w.T + b + (x64 @ a.T @ bb.T) * layer.scaling
    ref.backward(g.double())
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ref, **tol)
    for got, want in ((x.grad, x64.grad), (layer.bias.grad, b.grad)):
        torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(layer.lora_A.grad.double(), a.grad, **tol)
    torch.testing.assert_close(layer.lora_B.grad.double(), bb.grad, **tol)


def test_only_the_requested_gradients(python_path):
    """Frozen adapters, an x without grad, a trainable base weight: each combination gives the
    Python path's gradients and no others."""
    torch.manual_seed(2)
    for x_grad, adapters, weight in [
        (False, True, False),
        (True, False, False),
        (True, True, True),
    ]:
        layer = cpeft.Linear(12, 10, r=2, lora_alpha=4, bias=True, fan_in_fan_out=weight)
        torch.nn.init.normal_(layer.lora_B)
        layer.lora_A.requires_grad_(adapters)
        layer.lora_B.requires_grad_(adapters)
        layer.weight.requires_grad_(weight)
        x = torch.randn(6, 12, requires_grad=x_grad)
        y_node, grads_node, name = _step(layer, x, LOSSES["weighted"])
        assert NODE in name
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_autograd, "_lora_linear_node", None)
            y_py, grads_py, _ = _step(layer, x, LOSSES["weighted"])
        assert torch.equal(y_node, y_py)
        for a, b in zip(grads_node, grads_py):
            assert torch.equal(a, b)


def test_no_grad_and_inference_mode_build_no_node():
    layer = cpeft.Linear(8, 6, r=2)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    with torch.inference_mode():
        y = layer(x)
    assert y.grad_fn is None and y.is_inference()


def test_saves_what_the_python_function_saves(python_path):
    """Memory kept for backward: the same tensors (x, weight, A, B and xa), nothing more."""

    def saved(layer, x):
        packed = []

        def pack(t):
            packed.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return sorted(packed, key=str)

    layer = cpeft.Linear(20, 14, r=3, lora_dropout=0.2)
    x = torch.randn(9, 20, requires_grad=True)
    node = saved(layer, x)
    python_path()
    assert node == saved(layer, x)
    assert len(node) == 5


def test_double_backward_raises_as_once_differentiable(python_path):
    layer = cpeft.Linear(8, 6, r=2, lora_alpha=4)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8, requires_grad=True)
    results = []
    for use_python in (False, True):
        if use_python:
            python_path()
        y = layer(x)
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        results.append(gx.detach())
        with pytest.raises(RuntimeError, match="differentiate twice"):
            gx.sum().backward()
    assert torch.equal(*results)


def test_input_changed_in_place_before_backward_is_refused():
    layer = cpeft.Linear(8, 6, r=2)
    x = torch.randn(5, 8, requires_grad=True)
    x2 = x * 1.0
    y = layer(x2)
    assert NODE in y.grad_fn.name()
    with torch.no_grad():
        x2.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize(
    "which,replacement",
    [
        ("weight", lambda t: torch.randn(t.shape[0] + 3, t.shape[1])),
        ("lora_A", lambda t: torch.randn(t.shape[0], t.shape[1] + 5)),
        ("lora_B", lambda t: torch.randn(t.shape[0], t.shape[1] + 1)),
        ("lora_B", lambda t: t.detach().double()),
        ("weight", lambda t: t.detach().t().contiguous().t()[:, :-1]),
    ],
)
def test_saved_tensor_data_replaced_before_backward_raises(which, replacement):
    """``param.data = other`` changes a saved tensor without a version bump: backward must see
    it and raise, never read the new memory with the old sizes."""
    layer = cpeft.Linear(12, 10, r=3, bias=True)
    x = torch.randn(7, 12, requires_grad=True)
    y = layer(x)
    assert NODE in y.grad_fn.name()
    param = getattr(layer, which)
    param.data = replacement(param)
    with pytest.raises(RuntimeError, match="no longer has the dtype, device, shape or layout"):
        y.sum().backward()


def test_gradcheck_through_the_node():
    torch.manual_seed(3)
    layer = cpeft.Linear(6, 5, r=2, lora_alpha=3, bias=True).double()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert NODE in layer(x).grad_fn.name()

    def f(x, a, b, bias):
        return _autograd.lora_linear(
            x,
            layer.weight,
            bias,
            a,
            b,
            scale=layer.scaling,
            fan_in_fan_out=False,
            enable_lora=None,
            dropout=0.0,
        )

    assert torch.autograd.gradcheck(f, (x, layer.lora_A, layer.lora_B, layer.bias))


def test_checkpointing_recomputes_the_same_dropout_mask():
    torch.manual_seed(4)
    layer = cpeft.Linear(16, 12, r=4, lora_dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(9)
    layer(x).pow(2).sum().backward()
    plain = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    torch.manual_seed(9)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).pow(2).sum().backward()
    for got, want in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), plain):
        assert torch.equal(got, want)


class _Tagged(torch.Tensor):
    """A tensor subclass: it may give an op another meaning, so the node must not take it."""


def _declined_cases():
    base = cpeft.Linear(10, 8, r=2)
    merged = cpeft.MergedLinear(10, 12, r=2, enable_lora=[True, False, True])
    return {
        "non-contiguous x": (base, lambda: torch.randn(10, 6).t()),
        "strided x": (base, lambda: torch.randn(6, 20)[:, ::2]),
        "empty batch": (base, lambda: torch.randn(0, 10)),
        "grouped adapters (MergedLinear)": (merged, lambda: torch.randn(6, 10)),
        "tensor subclass": (base, lambda: torch.randn(6, 10).as_subclass(_Tagged)),
    }


@pytest.mark.parametrize("case", list(_declined_cases()))
def test_declined_calls_take_the_python_path_with_the_same_result(python_path, case):
    layer, make_x = _declined_cases()[case]
    torch.manual_seed(6)
    x = make_x().requires_grad_()
    y = layer(x)
    assert NODE not in y.grad_fn.name()
    y.sum().backward()
    got = (y.detach().clone(), x.grad.clone())
    x.grad = None
    python_path()
    y2 = layer(x)
    y2.sum().backward()
    assert torch.equal(got[0], y2.detach()) and torch.equal(got[1], x.grad)


def test_modes_and_transforms_see_the_python_path():
    layer = cpeft.Linear(10, 8, r=2)
    x = torch.randn(4, 10, requires_grad=True)

    class Seen(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Seen():
        assert NODE not in layer(x).grad_fn.name()

    from torch.utils._python_dispatch import TorchDispatchMode

    class Dispatched(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Dispatched():
        y = layer(x)
    assert NODE not in y.grad_fn.name() and Dispatched.ops

    # A functorch transform reaches the Python Function, which refuses it with torch's own
    # message, as before the node existed (the node never runs under a transform).
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vmap(layer)(torch.randn(3, 4, 10))


def test_dtype_errors_are_the_python_paths():
    layer = cpeft.Linear(10, 8, r=2)
    with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype"):
        layer(torch.randn(3, 10, dtype=torch.float64))


def test_direct_calls_decline_anything_unexpected():
    """cpeft._torch_node.lora_linear returns None (the general path decides) for arguments it
    does not take as they are, and raises TypeError only for a wrong argument count."""
    from cpeft import _torch_node

    x, w, a, b = torch.randn(4, 10), torch.randn(8, 10), torch.randn(2, 10), torch.randn(8, 2)
    fine = (x, w, None, a, b, 2.0, False, 0.0, 0)
    assert isinstance(_torch_node.lora_linear(*fine), torch.Tensor)
    with pytest.raises(TypeError, match="9 positional arguments"):
        _torch_node.lora_linear(*fine[:8])
    bad = {
        "x not a tensor": {0: x.numpy()},
        "weight shape": {1: torch.randn(8, 9)},
        "lora_a rank mismatch": {3: torch.randn(3, 10)},
        "lora_b rows": {4: torch.randn(7, 2)},
        "bias length": {2: torch.randn(7)},
        "bias 2-D": {2: torch.randn(1, 8)},
        "dtype mix": {1: w.double()},
        "float16": {0: x.half(), 1: w.half(), 3: a.half(), 4: b.half()},
        "int scale": {5: 2},
        "nan scale": {5: float("nan")},
        "inf scale": {5: float("inf")},
        "dropout above 1": {7: 1.5},
        "negative dropout": {7: -0.1},
        "nan dropout": {7: float("nan")},
        "negative seed": {8: -1},
        "huge seed": {8: 2**70},
        "fan_in_fan_out not a bool": {6: 1},
        "overlapping weight": {1: torch.randn(10).expand(8, 10)},
        "zero rank": {3: torch.randn(0, 10), 4: torch.randn(8, 0)},
        "sparse weight": {1: w.to_sparse()},
        "meta x": {0: torch.empty(4, 10, device="meta")},
    }
    for what, changes in bad.items():
        args = list(fine)
        for i, v in changes.items():
            args[i] = v
        assert _torch_node.lora_linear(*args) is None, what


def test_threads_share_a_layer_and_get_serial_results():
    torch.manual_seed(7)
    layer = cpeft.Linear(48, 40, r=4, lora_alpha=8, bias=True)
    torch.nn.init.normal_(layer.lora_B)
    xs = [torch.randn(32, 48) for _ in range(8)]

    def run(x):
        x = x.clone().requires_grad_()
        y = layer(x)
        return (y.detach(), *torch.autograd.grad((y * y).sum(), (x, layer.lora_A, layer.lora_B)))

    serial = [run(x) for x in xs]
    results = [None] * len(xs)

    def worker(i):
        for _ in range(20):
            results[i] = run(xs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_no_reference_left_behind():
    """After a step and its output are gone, every tensor the node saw has its references back
    (the node, its saved tensors and the wrapped output are all released)."""
    layer = cpeft.Linear(12, 10, r=3, bias=True)
    x = torch.randn(7, 12, requires_grad=True)
    tensors = (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)
    layer(x).sum().backward()  # the first step creates the .grad tensors
    before = [t._use_count() for t in tensors]
    for _ in range(50):
        y = layer(x)
        assert NODE in y.grad_fn.name()
        y.sum().backward()
        del y
    assert [t._use_count() for t in tensors] == before


def test_loader_refuses_another_torch_and_the_off_switch(monkeypatch):
    """The node links the torch it was compiled against: with any other version (or with
    CPEFT_TORCH_NODE=0) the loader says why and the layers keep the Python Function."""
    monkeypatch.setattr(torch, "__version__", "0.0.1+other")
    node, why = _autograd._load_torch_node()
    assert node is None and "built against torch" in why and "0.0.1+other" in why
    monkeypatch.undo()
    monkeypatch.setenv("CPEFT_TORCH_NODE", "0")
    node, why = _autograd._load_torch_node()
    assert node is None and "CPEFT_TORCH_NODE=0" in why
    monkeypatch.delenv("CPEFT_TORCH_NODE")
    node, why = _autograd._load_torch_node()
    assert node is _autograd._lora_linear_node and why is None
