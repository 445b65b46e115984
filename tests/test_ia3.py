"""cpeft.functional IA3 linear (output scaling and feedforward input scaling) and IA3 embedding
against the float64 reference (peft IA3 semantics)."""

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

SIZES = [  # (M, IN, OUT)
    (1, 1, 1),
    (3, 1, 113),
    (113, 3, 1),
    (3, 113, 3),
    (113, 113, 113),
    (1023, 3, 3),
    (3, 1023, 3),
    (3, 3, 1023),
]
L_SHAPES = ["flat", "column", "row"]
MODES = ["output", "feedforward"]


def l_shape(kind, n):
    return {"flat": (n,), "column": (n, 1), "row": (1, n)}[kind]


def make_linear(
    rng,
    dtype,
    lead,
    in_f,
    out_f,
    *,
    feedforward=False,
    fan_in_fan_out=False,
    bias=True,
    l_kind="flat",
):
    n = in_f if feedforward else out_f
    return dict(
        x=random_array(rng, tuple(lead) + (in_f,), dtype),
        weight=random_array(
            rng, (in_f, out_f) if fan_in_fan_out else (out_f, in_f), dtype, 1 / math.sqrt(in_f)
        ),
        bias=random_array(rng, (out_f,), dtype) if bias else None,
        ia3_l=(1 + 0.5 * rng.standard_normal(l_shape(l_kind, n))).astype(dtype),
        grad_out=random_array(rng, tuple(lead) + (out_f,), dtype),
    )


def linear_k(p):
    return p["x"].size // max(p["x"].shape[-1], 1) + p["x"].shape[-1] + p["grad_out"].shape[-1] + 1


def linear_forward(p, **kw):
    return F.ia3_linear_forward(p["x"], p["weight"], p["bias"], p["ia3_l"], **kw)


def check_linear(p, dtype, *, feedforward=False, fan_in_fan_out=False):
    mode = dict(feedforward=feedforward, fan_in_fan_out=fan_in_fan_out)
    k = linear_k(p)
    keep_base = not feedforward
    y, base = linear_forward(p, keep_base=keep_base, **mode)
    fargs = (p["x"], p["weight"], p["bias"], p["ia3_l"])
    y_ref, base_ref = ref.ia3_linear_forward(*fargs, **mode)
    y_bound, base_bound = bound_of(ref.ia3_linear_forward, *fargs, **mode)
    assert_close(y, y_ref, y_bound, dtype, k, "y")
    if keep_base:
        assert_close(base, base_ref, base_bound, dtype, k, "base")
    else:
        assert base is None
    grads = F.ia3_linear_backward(
        p["grad_out"],
        p["x"],
        p["weight"],
        p["ia3_l"],
        base,
        grad_bias=p["bias"] is not None,
        grad_weight=True,
        **mode,
    )
    bargs = (p["grad_out"], p["x"], p["weight"], p["bias"], p["ia3_l"])
    want = ref.ia3_linear_backward(*bargs, **mode)
    bound = bound_of(ref.ia3_linear_backward, *bargs, **mode)
    for name in ("x", "ia3_l", "bias", "weight"):
        got = getattr(grads, name)
        if name == "bias" and p["bias"] is None:
            assert got is None
            continue
        assert_close(got, want[name], bound[name], dtype, k, f"grad {name}")
    return y, base, grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,in_f,out_f", SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_matches_reference(rng, dtype, m, in_f, out_f, mode):
    ff = mode == "feedforward"
    check_linear(make_linear(rng, dtype, (m,), in_f, out_f, feedforward=ff), dtype, feedforward=ff)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("l_kind", L_SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_variants(rng, dtype, mode, l_kind, fan_in_fan_out, bias):
    """ia3_l as (n,), (n, 1) or (1, n) (its gradient keeps that shape); weight stored (IN, OUT)
    with fan_in_fan_out; with and without bias."""
    ff = mode == "feedforward"
    p = make_linear(
        rng,
        dtype,
        (2, 5),
        7,
        9,
        feedforward=ff,
        fan_in_fan_out=fan_in_fan_out,
        bias=bias,
        l_kind=l_kind,
    )
    y, _, grads = check_linear(p, dtype, feedforward=ff, fan_in_fan_out=fan_in_fan_out)
    assert y.shape == (2, 5, 9)
    assert grads.ia3_l.shape == p["ia3_l"].shape
    assert grads.weight.shape == p["weight"].shape


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("argument", ["x", "weight", "ia3_l", "bias", "grad_out"])
@pytest.mark.parametrize("mode", MODES)
def test_linear_strided_inputs(rng, mode, argument, layout):
    ff = mode == "feedforward"
    p = make_linear(rng, np.float32, (12,), 10, 14, feedforward=ff)
    p[argument] = with_layout(p[argument], layout)
    check_linear(p, np.float32, feedforward=ff)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_empty_batch(rng, dtype, mode):
    ff = mode == "feedforward"
    p = make_linear(rng, dtype, (0,), 6, 4, feedforward=ff)
    y, base = linear_forward(p, keep_base=not ff, feedforward=ff)
    assert y.shape == (0, 4)
    buffers = {
        "grad_ia3_l": np.full(p["ia3_l"].shape, np.nan, dtype),
        "grad_bias": np.full((4,), np.nan, dtype),
        "grad_weight": np.full((4, 6), np.nan, dtype),
    }
    grads = F.ia3_linear_backward(
        p["grad_out"], p["x"], p["weight"], p["ia3_l"], base, feedforward=ff, **buffers
    )
    assert grads.x.shape == (0, 6)
    for name in ("ia3_l", "bias", "weight"):
        assert np.array_equal(getattr(grads, name), np.zeros_like(buffers[f"grad_{name}"]))


def test_linear_keep_base_and_requested_gradients(rng):
    p = make_linear(rng, np.float64, (5,), 6, 4)
    y, base = linear_forward(p)
    assert base is None
    y_kept, base = linear_forward(p, keep_base=True)
    np.testing.assert_array_equal(y, y_kept)
    args = (p["grad_out"], p["x"], p["weight"], p["ia3_l"], base)
    grads = F.ia3_linear_backward(*args)
    assert grads.x is not None and grads.ia3_l is not None
    assert grads.bias is None and grads.weight is None
    only_x = F.ia3_linear_backward(
        p["grad_out"], p["x"], p["weight"], p["ia3_l"], None, grad_ia3_l=False
    )
    assert only_x.ia3_l is None
    np.testing.assert_array_equal(only_x.x, grads.x)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_linear_finite_differences(rng, mode, fan_in_fan_out):
    ff = mode == "feedforward"
    mode_kw = dict(feedforward=ff, fan_in_fan_out=fan_in_fan_out)
    p = make_linear(rng, np.float64, (3,), 4, 5, l_kind="column", **mode_kw)
    _, _, grads = check_linear(p, np.float64, **mode_kw)

    def loss():
        y, _ = linear_forward(p, **mode_kw)
        return float(np.sum(y * p["grad_out"]))

    for name in ("x", "weight", "bias", "ia3_l"):
        numeric = central_difference(loss, p[name])
        np.testing.assert_allclose(
            getattr(grads, name), numeric, rtol=1e-6, atol=1e-7, err_msg=name
        )


# ------------------------------------------------------------------------------- embedding

EMB_SIZES = [(1, 1, 1), (3, 113, 3), (113, 3, 113), (1023, 113, 3), (3, 1023, 1023)]


def make_embedding(rng, dtype, index_shape, vocab, dim, index_dtype=np.int64, l_kind="flat"):
    return dict(
        indices=rng.integers(0, vocab, size=index_shape).astype(index_dtype),
        weight=random_array(rng, (vocab, dim), dtype),
        ia3_l=(1 + 0.5 * rng.standard_normal(l_shape(l_kind, dim))).astype(dtype),
        grad_out=random_array(rng, tuple(index_shape) + (dim,), dtype),
    )


def check_embedding(p, dtype, padding_idx=None):
    k = p["indices"].size + p["weight"].shape[0] + p["weight"].shape[1]
    y = F.ia3_embedding_forward(p["indices"], p["weight"], p["ia3_l"])
    fargs = (p["indices"], p["weight"], p["ia3_l"])
    assert_close(
        y,
        ref.ia3_embedding_forward(*fargs),
        bound_of(ref.ia3_embedding_forward, *fargs),
        dtype,
        k,
        "y",
    )
    grads = F.ia3_embedding_backward(
        p["grad_out"],
        p["indices"],
        p["weight"],
        p["ia3_l"],
        padding_idx=padding_idx,
        grad_weight=True,
    )
    bargs = (p["grad_out"], p["indices"], p["weight"], p["ia3_l"])
    want = ref.ia3_embedding_backward(*bargs, padding_idx=padding_idx)
    bound = bound_of(ref.ia3_embedding_backward, *bargs, padding_idx=padding_idx)
    for name in ("ia3_l", "weight"):
        assert_close(getattr(grads, name), want[name], bound[name], dtype, k, f"grad {name}")
    return y, grads


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("n,vocab,dim", EMB_SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_embedding_matches_reference(rng, dtype, n, vocab, dim, index_dtype):
    check_embedding(make_embedding(rng, dtype, (n,), vocab, dim, index_dtype), dtype)


@pytest.mark.parametrize("l_kind", L_SHAPES)
@pytest.mark.parametrize("index_shape", [(), (2, 3), (4, 0)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_embedding_shapes(rng, dtype, index_shape, l_kind):
    p = make_embedding(rng, dtype, index_shape, 6, 5, l_kind=l_kind)
    y, grads = check_embedding(p, dtype)
    assert y.shape == tuple(index_shape) + (5,)
    assert grads.ia3_l.shape == p["ia3_l"].shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_embedding_padding_idx(rng, dtype):
    """padding rows count for ia3_l's gradient but give nothing to weight's."""
    p = make_embedding(rng, dtype, (30,), 6, 4)
    p["indices"][::2] = 3
    _, grads = check_embedding(p, dtype, padding_idx=3)
    assert np.all(grads.weight[3] == 0)
    _, plain = check_embedding(p, dtype)
    np.testing.assert_array_equal(grads.ia3_l, plain.ia3_l)
    assert np.any(plain.weight[3] != 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("argument", ["indices", "weight", "ia3_l", "grad_out"])
def test_embedding_strided_inputs(rng, argument, layout):
    p = make_embedding(rng, np.float32, (8, 3), 10, 12)
    p[argument] = with_layout(p[argument], layout)
    check_embedding(p, np.float32, padding_idx=1)


def test_embedding_defaults_and_finite_differences(rng):
    p = make_embedding(rng, np.float64, (6,), 4, 3)
    p["indices"][:2] = 0
    grads = F.ia3_embedding_backward(p["grad_out"], p["indices"], p["weight"], p["ia3_l"])
    assert grads.ia3_l is not None and grads.weight is None
    _, grads = check_embedding(p, np.float64, padding_idx=0)

    def loss():
        return float(
            np.sum(F.ia3_embedding_forward(p["indices"], p["weight"], p["ia3_l"]) * p["grad_out"])
        )

    for name in ("ia3_l", "weight"):
        numeric = central_difference(loss, p[name])
        if name == "weight":
            numeric[0] = 0
        np.testing.assert_allclose(
            getattr(grads, name), numeric, rtol=1e-6, atol=1e-7, err_msg=name
        )


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_peft(rng, mode, fan_in_fan_out):
    """The NumPy reference agrees with real peft IA3 Linear (torch float64 autograd)."""
    torch = pytest.importorskip("torch")
    ia3 = pytest.importorskip("peft.tuners.ia3")
    ff = mode == "feedforward"
    in_f, out_f = 5, 4
    base = torch.nn.Linear(in_f, out_f).double()
    if fan_in_fan_out:
        base.weight = torch.nn.Parameter(base.weight.detach().T.contiguous())
    config = ia3.IA3Config(
        target_modules=["x"], feedforward_modules=["x"] if ff else [], fan_in_fan_out=fan_in_fan_out
    )
    layer = ia3.layer.Linear(
        base, "default", config, is_feedforward=ff, fan_in_fan_out=fan_in_fan_out
    )
    layer.double()
    l_param = layer.ia3_l["default"]
    with torch.no_grad():
        l_param.normal_()
    base.weight.requires_grad_(True)
    if fan_in_fan_out:
        layer.base_layer.forward = lambda t: torch.nn.functional.linear(t, base.weight.T, base.bias)
    x = torch.tensor(rng.standard_normal((3, in_f)), requires_grad=True)
    g = rng.standard_normal((3, out_f))
    y = layer(x)
    y.backward(torch.tensor(g))

    def npy(t):
        return t.detach().numpy()

    mode_kw = dict(feedforward=ff, fan_in_fan_out=fan_in_fan_out)
    y_ref, _ = ref.ia3_linear_forward(
        npy(x), npy(base.weight), npy(base.bias), npy(l_param), **mode_kw
    )
    np.testing.assert_allclose(y_ref, npy(y), rtol=1e-12, atol=1e-12)
    want = ref.ia3_linear_backward(
        g, npy(x), npy(base.weight), npy(base.bias), npy(l_param), **mode_kw
    )
    for name, tensor in [
        ("x", x),
        ("weight", base.weight),
        ("bias", base.bias),
        ("ia3_l", l_param),
    ]:
        np.testing.assert_allclose(
            want[name], npy(tensor.grad), rtol=1e-12, atol=1e-12, err_msg=name
        )
