"""cpeft.functional.lora_embedding_forward / lora_embedding_backward against the float64
reference (loralib Embedding semantics, torch's padding_idx gradient rule)."""

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

SIZES = [  # (N, V, D)
    (1, 1, 1),
    (3, 113, 3),
    (113, 3, 113),
    (1023, 113, 3),
    (3, 1023, 113),
    (113, 3, 1023),
]
RANKS = [1, 8, 64]
INDEX_DTYPES = (np.int32, np.int64)


def make_problem(rng, dtype, index_shape, vocab, dim, r, index_dtype=np.int64):
    return dict(
        indices=rng.integers(0, vocab, size=index_shape).astype(index_dtype),
        weight=random_array(rng, (vocab, dim), dtype),
        lora_a=random_array(rng, (r, vocab), dtype),
        lora_b=random_array(rng, (dim, r), dtype),
        scale=float(rng.uniform(0.25, 4.0)),
        grad_out=random_array(rng, tuple(index_shape) + (dim,), dtype),
    )


def problem_k(p):
    return p["indices"].size + p["weight"].shape[0] + p["weight"].shape[1] + p["lora_a"].shape[0]


def check_forward(p, dtype, **kw):
    y = F.lora_embedding_forward(
        p["indices"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], **kw
    )
    args = (p["indices"], p["weight"], p["lora_a"], p["lora_b"], p["scale"])
    assert isinstance(y, np.ndarray)
    assert_close(
        y,
        ref.lora_embedding_forward(*args),
        bound_of(ref.lora_embedding_forward, *args),
        dtype,
        problem_k(p),
        "y",
    )
    return y


def check_backward(p, dtype, padding_idx=None, **kw):
    kw.setdefault("grad_weight", True)
    grads = F.lora_embedding_backward(
        p["grad_out"],
        p["indices"],
        p["lora_a"],
        p["lora_b"],
        p["scale"],
        padding_idx=padding_idx,
        **kw,
    )
    args = (p["grad_out"], p["indices"], p["lora_a"], p["lora_b"], p["scale"])
    want = ref.lora_embedding_backward(*args, padding_idx=padding_idx)
    bound = bound_of(ref.lora_embedding_backward, *args, padding_idx=padding_idx)
    for name in ("lora_a", "lora_b", "weight"):
        assert_close(
            getattr(grads, name), want[name], bound[name], dtype, problem_k(p), f"grad {name}"
        )
    return grads


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("n,vocab,dim", SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_forward_matches_reference(rng, dtype, n, vocab, dim, r, index_dtype):
    check_forward(make_problem(rng, dtype, (n,), vocab, dim, r, index_dtype), dtype)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("n,vocab,dim", SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_matches_reference(rng, dtype, n, vocab, dim, r):
    """Random indices with repeats (N > V for most sizes): scatter-adds must accumulate."""
    check_backward(make_problem(rng, dtype, (n,), vocab, dim, r), dtype)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_padding_idx(rng, dtype, index_dtype):
    """The padding row is looked up normally, but gives no gradient to its column of lora_a nor
    to its row of weight; it still counts for lora_b."""
    p = make_problem(rng, dtype, (40,), 7, 5, 3, index_dtype)
    pad = 4
    p["indices"][::3] = pad
    y_plain = check_forward(p, dtype)
    y_pad = check_forward(p, dtype, padding_idx=pad)
    np.testing.assert_array_equal(y_plain, y_pad)
    grads = check_backward(p, dtype, padding_idx=pad)
    assert np.all(grads.lora_a[:, pad] == 0) and np.all(grads.weight[pad] == 0)
    assert np.any(grads.lora_a[:, (pad + 1) % 7] != 0)
    without_pad = check_backward(p, dtype)
    assert np.any(without_pad.lora_a[:, pad] != 0)


@pytest.mark.parametrize("index_shape", [(), (2, 3), (2, 1, 4), (4, 0)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_index_shapes(rng, dtype, index_shape):
    """indices (...) give y (..., D)."""
    p = make_problem(rng, dtype, index_shape, 9, 6, 2)
    y = check_forward(p, dtype)
    assert y.shape == tuple(index_shape) + (6,)
    check_backward(p, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("argument", ["indices", "weight", "lora_a", "lora_b", "grad_out"])
def test_strided_inputs(rng, argument, layout):
    dtype = np.float32
    p = make_problem(rng, dtype, (12, 3), 10, 14, 4)
    p[argument] = with_layout(p[argument], layout)
    check_forward(p, dtype)
    check_backward(p, dtype, padding_idx=2)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_empty_indices(rng, dtype):
    p = make_problem(rng, dtype, (0,), 5, 3, 2)
    y = F.lora_embedding_forward(p["indices"], p["weight"], p["lora_a"], p["lora_b"], p["scale"])
    assert y.shape == (0, 3) and y.dtype == dtype
    buffers = {
        "grad_lora_a": np.full((2, 5), np.nan, dtype),
        "grad_lora_b": np.full((3, 2), np.nan, dtype),
        "grad_weight": np.full((5, 3), np.nan, dtype),
    }
    grads = F.lora_embedding_backward(
        p["grad_out"], p["indices"], p["lora_a"], p["lora_b"], p["scale"], **buffers
    )
    for name in ("lora_a", "lora_b", "weight"):
        got = getattr(grads, name)
        assert np.shares_memory(got, buffers[f"grad_{name}"])
        assert np.array_equal(got, np.zeros_like(got)), name


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_preallocated_outputs_overwritten(rng, dtype):
    """Gradients of vocabulary size are zeroed then scattered into, never accumulated onto
    what the caller's buffer held."""
    p = make_problem(rng, dtype, (6,), 8, 5, 3)
    out = np.full((6, 5), np.nan, dtype)
    y = F.lora_embedding_forward(
        p["indices"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], out=out
    )
    assert np.shares_memory(y, out)
    np.testing.assert_array_equal(out, check_forward(p, dtype))
    buffers = {
        "grad_lora_a": np.full((3, 8), np.nan, dtype),
        "grad_lora_b": np.full((5, 3), np.nan, dtype),
        "grad_weight": np.full((8, 5), 7.0, dtype),
    }
    F.lora_embedding_backward(
        p["grad_out"], p["indices"], p["lora_a"], p["lora_b"], p["scale"], **buffers
    )
    fresh = check_backward(p, dtype)
    for name in ("lora_a", "lora_b", "weight"):
        np.testing.assert_array_equal(buffers[f"grad_{name}"], getattr(fresh, name))


def test_default_and_requested_gradients(rng):
    p = make_problem(rng, np.float64, (6,), 8, 5, 3)
    args = (p["grad_out"], p["indices"], p["lora_a"], p["lora_b"], p["scale"])
    grads = F.lora_embedding_backward(*args)
    assert grads.lora_a is not None and grads.lora_b is not None and grads.weight is None
    only_b = F.lora_embedding_backward(*args, grad_lora_a=False)
    assert only_b.lora_a is None
    np.testing.assert_array_equal(only_b.lora_b, grads.lora_b)
    only_w = F.lora_embedding_backward(
        *args, grad_lora_a=False, grad_lora_b=False, grad_weight=True
    )
    assert only_w.lora_a is None and only_w.lora_b is None and only_w.weight.shape == (8, 5)


@pytest.mark.parametrize("padding_idx", [None, 1])
def test_finite_differences(rng, padding_idx):
    p = make_problem(rng, np.float64, (7,), 4, 3, 2)
    p["indices"][:3] = 1
    grads = check_backward(p, np.float64, padding_idx=padding_idx)

    def loss():
        y = F.lora_embedding_forward(
            p["indices"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], padding_idx=padding_idx
        )
        return float(np.sum(y * p["grad_out"]))

    for name in ("lora_a", "lora_b", "weight"):
        numeric = central_difference(loss, p[name])
        if padding_idx is not None and name == "lora_a":
            numeric[:, padding_idx] = 0
        if padding_idx is not None and name == "weight":
            numeric[padding_idx] = 0
        np.testing.assert_allclose(
            getattr(grads, name), numeric, rtol=1e-6, atol=1e-7, err_msg=name
        )


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_reference_matches_loralib(rng, padding_idx):
    """The NumPy reference agrees with real loralib.Embedding (torch float64 autograd)."""
    torch = pytest.importorskip("torch")
    loralib = pytest.importorskip("loralib")
    layer = loralib.Embedding(6, 4, r=3, lora_alpha=5, padding_idx=padding_idx).double()
    with torch.no_grad():
        layer.lora_A.normal_()
    layer.weight.requires_grad_(True)
    idx = rng.integers(0, 6, size=(3, 4))
    idx[0, :2] = 2
    g = rng.standard_normal((3, 4, 4))
    y = layer(torch.tensor(idx))
    y.backward(torch.tensor(g))

    def npy(t):
        return t.detach().numpy()

    args = (npy(layer.lora_A), npy(layer.lora_B), layer.scaling)
    np.testing.assert_allclose(
        ref.lora_embedding_forward(idx, npy(layer.weight), *args), npy(y), rtol=1e-12, atol=1e-12
    )
    want = ref.lora_embedding_backward(g, idx, *args, padding_idx=padding_idx)
    for name, tensor in [
        ("lora_a", layer.lora_A),
        ("lora_b", layer.lora_B),
        ("weight", layer.weight),
    ]:
        np.testing.assert_allclose(
            want[name], npy(tensor.grad), rtol=1e-12, atol=1e-12, err_msg=name
        )
