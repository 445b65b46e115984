"""Dropout on the LoRA branch input: the mask cpeft.functional.dropout_mask returns follows the
documented Philox4x32-10 counter scheme bit for bit, forward and backward apply exactly that
mask, and its statistics are right."""

import math

import numpy as np
import pytest

import reference as ref
from conftest import FLOAT_DTYPES, assert_close, bound_of, random_array, with_layout
from cpeft import functional as F

DTYPE_NAMES = {np.float32: "float32", np.float64: "float64"}


@pytest.mark.parametrize(
    "seed,offset",
    [(0, 0), (1, 0), (12345, 3), (2**32 + 7, 0), (2**63 - 1, 2**32 - 5), (99, 2**40 + 1)],
)
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mask_matches_philox_reference(dtype, p, seed, offset):
    """Bit for bit against an independent NumPy Philox4x32-10, including seeds above 2**32 (the
    key's high word) and offsets crossing 2**32 (the counter's high word)."""
    shape = (37, 29)
    got = F.dropout_mask(shape, p, seed, offset, dtype=DTYPE_NAMES[dtype])
    want = ref.dropout_mask(shape, p, seed, offset, dtype)
    assert isinstance(got, np.ndarray) and got.dtype == dtype
    np.testing.assert_array_equal(got.reshape(shape), want)


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5), (30,), (0, 5)])
def test_mask_shapes_flatten_to_rows(shape):
    """A (..., IN) shape numbers its elements in row-major order of the flattened rows."""
    got = F.dropout_mask(shape, 0.3, 7, 11)
    assert got.size == math.prod(shape)
    want = ref.dropout_mask(shape, 0.3, 7, 11)
    np.testing.assert_array_equal(got.reshape(-1), want.reshape(-1))


def test_mask_default_dtype_and_offset():
    np.testing.assert_array_equal(
        F.dropout_mask((4, 9), 0.5, 3), ref.dropout_mask((4, 9), 0.5, 3, 0, np.float32)
    )
    assert F.dropout_mask((4, 9), 0.5, 3).dtype == np.float32


def test_same_seed_and_offset_same_mask():
    a = F.dropout_mask((64, 33), 0.4, 5, 17)
    b = F.dropout_mask((64, 33), 0.4, 5, 17)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change", ["offset", "seed"])
def test_different_offset_or_seed_different_mask(change):
    a = F.dropout_mask((64, 33), 0.5, 5, 0)
    b = F.dropout_mask(
        (64, 33), 0.5, 5 if change == "offset" else 6, 64 * 33 if change == "offset" else 0
    )
    assert np.mean(a != b) > 0.3


def test_consecutive_offsets_continue_the_stream():
    """A layer advances offset by M*IN per call: two calls of M rows see exactly the mask one
    call of 2M rows would."""
    whole = F.dropout_mask((10, 7), 0.3, 42, 5)
    first = F.dropout_mask((4, 7), 0.3, 42, 5)
    second = F.dropout_mask((6, 7), 0.3, 42, 5 + 4 * 7)
    np.testing.assert_array_equal(whole, np.concatenate([first, second]))


@pytest.mark.parametrize("seed", [1, 2**40 + 3])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_keep_rate_and_kept_value(p, seed):
    """Kept fraction within 5 binomial standard deviations of 1 - p; kept values are 1/(1-p)."""
    n_rows, n_cols = 500, 400
    mask = F.dropout_mask((n_rows, n_cols), p, seed, 0, dtype="float64")
    n = mask.size
    kept = mask != 0
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept.mean() - (1 - p)) < 5 * sigma, (kept.mean(), 1 - p, sigma)
    assert np.all(mask[kept] == 1.0 / (1.0 - p))
    column_rate = kept.mean(axis=0)
    column_sigma = math.sqrt(p * (1 - p) / n_rows)
    assert np.all(np.abs(column_rate - (1 - p)) < 6 * column_sigma), "a column is biased"


def test_extreme_rates():
    np.testing.assert_array_equal(F.dropout_mask((20, 30), 0.0, 3), np.ones((20, 30), np.float32))
    np.testing.assert_array_equal(F.dropout_mask((20, 30), 1.0, 3), np.zeros((20, 30), np.float32))


def make_problem(rng, dtype, lead=(9,), in_f=13, out_f=11, r=4, enable_lora=None):
    k = 1 if enable_lora is None else sum(enable_lora)
    seg = out_f if enable_lora is None else out_f // len(enable_lora)
    return dict(
        x=random_array(rng, tuple(lead) + (in_f,), dtype),
        weight=random_array(rng, (out_f, in_f), dtype, 1 / math.sqrt(in_f)),
        bias=random_array(rng, (out_f,), dtype),
        lora_a=random_array(rng, (r * k, in_f), dtype),
        lora_b=random_array(rng, (seg * k, r), dtype),
        scale=1.5,
        grad_out=random_array(rng, tuple(lead) + (out_f,), dtype),
    )


def check_with_mask(p, dtype, mask, **kw):
    """Forward and backward with dropout settings kw against the reference with mask."""
    ref_kw = {"enable_lora": kw["enable_lora"]} if "enable_lora" in kw else {}
    k = p["x"].size // p["x"].shape[-1] + sum(p["x"].shape[-1:]) + p["grad_out"].shape[-1] + 5
    y, xa = F.lora_linear_forward(
        p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["scale"], **kw
    )
    fargs = (p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["scale"])
    y_ref, xa_ref = ref.lora_linear_forward(*fargs, mask=mask, **ref_kw)
    y_bound, xa_bound = bound_of(ref.lora_linear_forward, *fargs, mask=mask, **ref_kw)
    assert_close(xa, xa_ref, xa_bound, dtype, k, "xa = (x * mask) @ A.T")
    assert_close(y, y_ref, y_bound, dtype, k, "y")
    grads = F.lora_linear_backward(
        p["grad_out"], p["x"], p["weight"], p["lora_a"], p["lora_b"], xa, p["scale"], **kw
    )
    bargs = (p["grad_out"], p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"])
    want = ref.lora_linear_backward(*bargs, mask=mask, **ref_kw)
    bound = bound_of(ref.lora_linear_backward, *bargs, mask=mask, **ref_kw)
    for name in ("x", "lora_a", "lora_b"):
        assert_close(getattr(grads, name), want[name], bound[name], dtype, k, f"grad {name}")
    return xa, grads


@pytest.mark.parametrize("p_drop", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_forward_and_backward_use_the_mask(rng, dtype, p_drop):
    p = make_problem(rng, dtype)
    seed, offset = 1234, 77
    mask = F.dropout_mask(p["x"].shape, p_drop, seed, offset, dtype=DTYPE_NAMES[dtype])
    np.testing.assert_array_equal(mask, ref.dropout_mask(p["x"].shape, p_drop, seed, offset, dtype))
    check_with_mask(p, dtype, mask, dropout=p_drop, seed=seed, offset=offset)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grouped_with_dropout(rng, dtype):
    enable = [True, False, True]
    p = make_problem(rng, dtype, out_f=12, enable_lora=enable)
    mask = ref.dropout_mask(p["x"].shape, 0.25, 9, 3, dtype)
    check_with_mask(p, dtype, mask, dropout=0.25, seed=9, offset=3, enable_lora=enable)


@pytest.mark.parametrize("layout", ["f", "strided_last", "reversed", "offset"])
def test_mask_follows_logical_elements_of_strided_x(rng, layout):
    """Counter (m, i) belongs to the logical element, whatever x's memory layout."""
    dtype = np.float64
    p = make_problem(rng, dtype, lead=(2, 5))
    mask = ref.dropout_mask(p["x"].shape, 0.5, 21, 0, dtype)
    p["x"] = with_layout(p["x"], layout)
    check_with_mask(p, dtype, mask, dropout=0.5, seed=21)


def test_backward_with_other_offset_differs(rng):
    """Backward regenerates the mask from (seed, offset): a different offset changes grad_a."""
    p = make_problem(rng, np.float64)
    kw = dict(dropout=0.5, seed=3)
    _, xa = F.lora_linear_forward(
        p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["scale"], offset=0, **kw
    )
    args = (p["grad_out"], p["x"], p["weight"], p["lora_a"], p["lora_b"], xa, p["scale"])
    same = F.lora_linear_backward(*args, offset=0, **kw)
    other = F.lora_linear_backward(*args, offset=1000, **kw)
    assert not np.allclose(same.lora_a, other.lora_a)
    assert not np.allclose(same.x, other.x)
    _, xa_other = F.lora_linear_forward(
        p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["scale"], offset=1000, **kw
    )
    assert not np.allclose(xa, xa_other)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_rate_is_identity(rng, dtype):
    p = make_problem(rng, dtype)
    args = (p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["scale"])
    y0, xa0 = F.lora_linear_forward(*args)
    y, xa = F.lora_linear_forward(*args, dropout=0.0, seed=5, offset=9)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(xa, xa0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_full_rate_drops_everything(rng, dtype):
    """p = 1: xa = 0, y = base, grad_a = 0, grad_x = g·W, while grad_b = 0 too (xa is 0)."""
    p = make_problem(rng, dtype)
    mask = np.zeros(p["x"].shape, dtype)
    xa, grads = check_with_mask(p, dtype, mask, dropout=1.0, seed=5)
    assert np.all(xa == 0)
    assert np.all(grads.lora_a == 0) and np.all(grads.lora_b == 0)
