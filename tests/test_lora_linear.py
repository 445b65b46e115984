"""cpeft.functional.lora_linear_forward / lora_linear_backward against the float64 reference."""

import math

import numpy as np
import pytest

import reference as ref
from conftest import (
    FLOAT_DTYPES,
    LAYOUTS,
    assert_close,
    bound_of,
    central_difference,
    random_array,
    with_layout,
)
from cpeft import functional as F

SIZES = [  # (M, IN, OUT): every awkward size, 1023 only once per problem
    (1, 1, 1),
    (3, 1, 3),
    (1, 3, 113),
    (113, 3, 1),
    (3, 113, 3),
    (113, 113, 113),
    (1023, 3, 3),
    (3, 1023, 3),
    (3, 3, 1023),
    (1, 113, 1023),
]
RANKS = [1, 8, 64]
GRAD_NAMES = ("x", "lora_a", "lora_b", "bias", "weight")


def make_problem(
    rng, dtype, lead, in_f, out_f, r, *, enable_lora=None, fan_in_fan_out=False, bias=True
):
    groups = 1 if enable_lora is None else len(enable_lora)
    enabled = 1 if enable_lora is None else sum(map(bool, enable_lora))
    seg = out_f // groups
    weight_shape = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    return dict(
        x=random_array(rng, tuple(lead) + (in_f,), dtype),
        weight=random_array(rng, weight_shape, dtype, 1 / math.sqrt(in_f)),
        bias=random_array(rng, (out_f,), dtype) if bias else None,
        lora_a=random_array(rng, (r * enabled, in_f), dtype, 1 / math.sqrt(in_f)),
        lora_b=random_array(rng, (seg * enabled, r), dtype, 0.5),
        scale=float(rng.uniform(0.25, 4.0)),
        grad_out=random_array(rng, tuple(lead) + (out_f,), dtype),
    )


def problem_k(p):
    """The K of the tolerance rule: the sum of all problem dimensions."""
    m = int(np.prod(p["x"].shape[:-1]))
    return m + p["x"].shape[-1] + p["grad_out"].shape[-1] + p["lora_a"].shape[0] + 1


def forward(p, **kw):
    return F.lora_linear_forward(
        p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["scale"], **kw
    )


def backward(p, xa, **kw):
    kw.setdefault("grad_bias", p["bias"] is not None)
    kw.setdefault("grad_weight", True)
    return F.lora_linear_backward(
        p["grad_out"], p["x"], p["weight"], p["lora_a"], p["lora_b"], xa, p["scale"], **kw
    )


def check_forward(p, dtype, **kw):
    y, xa = forward(p, **kw)
    ref_kw = {k: v for k, v in kw.items() if k in ("fan_in_fan_out", "enable_lora")}
    args = (p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["scale"])
    y_ref, xa_ref = ref.lora_linear_forward(*args, **ref_kw)
    y_bound, xa_bound = bound_of(ref.lora_linear_forward, *args, **ref_kw)
    assert isinstance(y, np.ndarray) and isinstance(xa, np.ndarray)
    assert_close(y, y_ref, y_bound, dtype, problem_k(p), "y")
    assert_close(xa, xa_ref, xa_bound, dtype, problem_k(p), "xa")
    return y, xa


def check_backward(p, dtype, xa, **kw):
    grads = backward(p, xa, **kw)
    ref_kw = {k: v for k, v in kw.items() if k in ("fan_in_fan_out", "enable_lora")}
    args = (p["grad_out"], p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"])
    want = ref.lora_linear_backward(*args, **ref_kw)
    bound = bound_of(ref.lora_linear_backward, *args, **ref_kw)
    for name in GRAD_NAMES:
        got = getattr(grads, name)
        if name == "bias" and p["bias"] is None:
            assert got is None
            continue
        assert_close(got, want[name], bound[name], dtype, problem_k(p), f"grad {name}")
    return grads


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m,in_f,out_f", SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_forward_matches_reference(rng, dtype, m, in_f, out_f, r):
    p = make_problem(rng, dtype, (m,), in_f, out_f, r)
    check_forward(p, dtype)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m,in_f,out_f", SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_matches_reference(rng, dtype, m, in_f, out_f, r):
    p = make_problem(rng, dtype, (m,), in_f, out_f, r)
    _, xa = forward(p)
    check_backward(p, dtype, xa)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize(
    "enable_lora",
    [[True, False, True], [False, True, False], [True, True, True], [True, False], [True]],
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grouped_matches_reference(rng, dtype, enable_lora, fan_in_fan_out):
    groups = len(enable_lora)
    p = make_problem(
        rng, dtype, (7,), 37, 5 * groups, 4, enable_lora=enable_lora, fan_in_fan_out=fan_in_fan_out
    )
    kw = dict(enable_lora=enable_lora, fan_in_fan_out=fan_in_fan_out)
    _, xa = check_forward(p, dtype, **kw)
    grads = check_backward(p, dtype, xa, **kw)
    assert grads.weight.shape == p["weight"].shape


@pytest.mark.parametrize("storage", ["contiguous", "transposed_view"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fan_in_fan_out_weight_storage(rng, dtype, storage):
    """weight stored (IN, OUT): contiguous like GPT-2 Conv1D, or loralib's transposed view of an
    (OUT, IN) buffer (strides (1, IN))."""
    p = make_problem(rng, dtype, (9,), 17, 23, 8, fan_in_fan_out=True)
    if storage == "transposed_view":
        p["weight"] = with_layout(p["weight"], "transposed")
        assert p["weight"].strides[0] == p["weight"].itemsize
    _, xa = check_forward(p, dtype, fan_in_fan_out=True)
    grads = check_backward(p, dtype, xa, fan_in_fan_out=True)
    assert grads.weight.shape == (17, 23)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_no_bias(rng, dtype):
    p = make_problem(rng, dtype, (11,), 13, 19, 8, bias=False)
    _, xa = check_forward(p, dtype)
    check_backward(p, dtype, xa, grad_bias=False)


@pytest.mark.parametrize("lead", [(), (2, 3), (2, 1, 3), (1,), (4, 0)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_leading_dims(rng, dtype, lead):
    """x (..., IN) gives y (..., OUT), xa (..., R) and grad_x (..., IN)."""
    p = make_problem(rng, dtype, lead, 10, 6, 4)
    y, xa = check_forward(p, dtype)
    assert y.shape == tuple(lead) + (6,) and xa.shape == tuple(lead) + (4,)
    grads = check_backward(p, dtype, xa)
    assert grads.x.shape == tuple(lead) + (10,)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("argument", ["x", "weight", "lora_a", "lora_b", "grad_out", "xa"])
def test_strided_inputs(rng, argument, layout):
    """Any strided view of any input gives the same result as a compact copy."""
    dtype = np.float32
    p = make_problem(rng, dtype, (12,), 10, 14, 4)
    _, xa = forward(p)
    xa = np.array(xa)
    if argument == "xa":
        xa = with_layout(xa, layout)
    else:
        p[argument] = with_layout(p[argument], layout)
    check_forward(p, dtype)
    check_backward(p, dtype, xa)


@pytest.mark.parametrize("layout", ["bias_strided", "bias_offset", "x_3d_strided"])
def test_strided_vectors_and_batched_views(rng, layout):
    dtype = np.float64
    p = make_problem(rng, dtype, (4, 5), 10, 14, 4)
    if layout == "bias_strided":
        p["bias"] = with_layout(p["bias"], "strided_last")
    elif layout == "bias_offset":
        p["bias"] = with_layout(p["bias"], "offset")
    else:
        big = random_array(rng, (8, 5, 20), dtype)
        p["x"] = big[::2, :, ::2]
    _, xa = check_forward(p, dtype)
    check_backward(p, dtype, xa)


@pytest.mark.parametrize("layout", ["c", "f", "strided_first", "offset"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_preallocated_outputs_any_blas_layout(rng, dtype, layout):
    """out= / out_xa= / grad_*= arrays in any BLAS-able layout are fully overwritten (prefilled
    with NaN so a skipped element shows) and returned as the result."""
    p = make_problem(rng, dtype, (6,), 9, 7, 3)
    out = with_layout(np.full((6, 7), np.nan, dtype), layout)
    out_xa = with_layout(np.full((6, 3), np.nan, dtype), layout)
    y, xa = forward(p, out=out, out_xa=out_xa)
    assert np.shares_memory(y, out) and np.shares_memory(xa, out_xa)
    args = (p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["scale"])
    for got, want, bound, name in zip(
        (out, out_xa),
        ref.lora_linear_forward(*args),
        bound_of(ref.lora_linear_forward, *args),
        ("y", "xa"),
    ):
        assert_close(got, want, bound, dtype, problem_k(p), name)
    buffers = {
        "grad_x": with_layout(np.full((6, 9), np.nan, dtype), layout),
        "grad_lora_a": with_layout(np.full((3, 9), np.nan, dtype), layout),
        "grad_lora_b": with_layout(np.full((7, 3), np.nan, dtype), layout),
        "grad_bias": with_layout(np.full((7,), np.nan, dtype), "offset"),
        "grad_weight": with_layout(np.full((7, 9), np.nan, dtype), layout),
    }
    grads = backward(p, xa, **buffers)
    bargs = (p["grad_out"], p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"])
    want = ref.lora_linear_backward(*bargs)
    bound = bound_of(ref.lora_linear_backward, *bargs)
    for name, key in zip(GRAD_NAMES, buffers):
        assert np.shares_memory(getattr(grads, name), buffers[key]), name
        assert_close(buffers[key], want[name], bound[name], dtype, problem_k(p), key)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_empty_batch(rng, dtype, dropout):
    """M = 0: empty outputs, and the parameter gradients are sums over no rows, i.e. zero."""
    p = make_problem(rng, dtype, (0,), 8, 6, 4)
    y, xa = forward(p, dropout=dropout, seed=3)
    assert y.shape == (0, 6) and xa.shape == (0, 4)
    buffers = {
        k: np.full(s, np.nan, dtype)
        for k, s in [
            ("grad_lora_a", (4, 8)),
            ("grad_lora_b", (6, 4)),
            ("grad_bias", (6,)),
            ("grad_weight", (6, 8)),
        ]
    }
    grads = backward(p, xa, dropout=dropout, seed=3, **buffers)
    assert grads.x.shape == (0, 8)
    for name in ("lora_a", "lora_b", "bias", "weight"):
        got = getattr(grads, name)
        assert np.array_equal(got, np.zeros_like(got)), name


@pytest.mark.parametrize("requested", ["x", "lora_a", "lora_b", "bias", "weight"])
def test_only_requested_gradients(rng, requested):
    p = make_problem(rng, np.float64, (5,), 6, 4, 2)
    _, xa = forward(p)
    flags = {f"grad_{name}": name == requested for name in GRAD_NAMES}
    grads = F.lora_linear_backward(
        p["grad_out"], p["x"], p["weight"], p["lora_a"], p["lora_b"], xa, p["scale"], **flags
    )
    full = backward(p, xa)
    for name in GRAD_NAMES:
        got = getattr(grads, name)
        if name == requested:
            np.testing.assert_allclose(got, getattr(full, name), rtol=1e-12, atol=1e-14)
        else:
            assert got is None, name


def test_default_gradients_are_x_and_lora(rng):
    p = make_problem(rng, np.float64, (5,), 6, 4, 2)
    _, xa = forward(p)
    grads = F.lora_linear_backward(
        p["grad_out"], p["x"], p["weight"], p["lora_a"], p["lora_b"], xa, p["scale"]
    )
    assert grads.x is not None and grads.lora_a is not None and grads.lora_b is not None
    assert grads.bias is None and grads.weight is None


def loss(p, grad_out, **kw):
    y, _ = forward(p, **kw)
    return float(np.sum(np.asarray(y, dtype=np.float64) * grad_out))


@pytest.mark.parametrize("case", ["plain", "grouped_fan_in_fan_out", "dropout"])
def test_finite_differences(rng, case):
    """Central differences of sum(y * grad_out) in float64 (conftest.central_difference)."""
    kw = {}
    if case == "plain":
        p = make_problem(rng, np.float64, (3,), 4, 5, 2)
    elif case == "grouped_fan_in_fan_out":
        kw = dict(enable_lora=[True, False, True], fan_in_fan_out=True)
        p = make_problem(rng, np.float64, (3,), 4, 6, 2, **kw)
    else:
        kw = dict(dropout=0.4, seed=11, offset=5)
        p = make_problem(rng, np.float64, (3,), 4, 5, 2)
    _, xa = forward(p, **kw)
    grads = backward(p, xa, **kw)
    for name in ("x", "weight", "bias", "lora_a", "lora_b"):
        numeric = central_difference(lambda: loss(p, p["grad_out"], **kw), p[name])
        np.testing.assert_allclose(
            getattr(grads, name), numeric, rtol=1e-6, atol=1e-7, err_msg=f"{case}: grad {name}"
        )


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("enable_lora", [None, [True, False, True]])
def test_reference_matches_loralib(rng, enable_lora, fan_in_fan_out):
    """The NumPy reference itself agrees with real loralib (torch float64 autograd)."""
    torch = pytest.importorskip("torch")
    loralib = pytest.importorskip("loralib")
    in_f, out_f, r, alpha = 5, 6, 2, 3
    if enable_lora is None:
        layer = loralib.Linear(in_f, out_f, r=r, lora_alpha=alpha, fan_in_fan_out=fan_in_fan_out)
    else:
        layer = loralib.MergedLinear(
            in_f,
            out_f,
            r=r,
            lora_alpha=alpha,
            enable_lora=enable_lora,
            fan_in_fan_out=fan_in_fan_out,
        )
    layer = layer.double()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.weight.requires_grad_(True)
    x = torch.tensor(rng.standard_normal((4, in_f)), requires_grad=True)
    g = rng.standard_normal((4, out_f))
    y = layer(x)
    y.backward(torch.tensor(g))

    def npy(t):
        return t.detach().numpy()

    args = (npy(layer.weight), npy(layer.bias), npy(layer.lora_A), npy(layer.lora_B), layer.scaling)
    kw = dict(fan_in_fan_out=fan_in_fan_out, enable_lora=enable_lora)
    y_ref, _ = ref.lora_linear_forward(npy(x), *args, **kw)
    np.testing.assert_allclose(y_ref, npy(y), rtol=1e-12, atol=1e-12)
    want = ref.lora_linear_backward(g, npy(x), args[0], args[2], args[3], args[4], **kw)
    for name, tensor in [
        ("x", x),
        ("weight", layer.weight),
        ("bias", layer.bias),
        ("lora_a", layer.lora_A),
        ("lora_b", layer.lora_B),
    ]:
        np.testing.assert_allclose(
            want[name], npy(tensor.grad), rtol=1e-12, atol=1e-12, err_msg=name
        )
