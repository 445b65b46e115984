"""DoRA: cpeft.functional against NumPy float64 references written from peft 0.21's formulas
(tuners/lora/dora.py and variants.py), bad input, and parity with the real peft.

The references take n (the row norms) as an argument where a bound is evaluated: with n fixed
every DoRA output is multilinear in the remaining inputs, so conftest's tolerance rule (bound =
the reference on absolute values) applies unchanged; n itself is checked against the norm of
|W| + |s|·|B|·|A|.
"""

import math

import numpy as np
import pytest

from conftest import assert_close, random_array, with_layout
from cpeft import functional as F

# ---- float64 references ---------------------------------------------------------------------


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _logical(weight, fan_in_fan_out):
    w = _f64(weight)
    return w.T if fan_in_fan_out else w


def ref_norm(weight, lora_a, lora_b, scale, fan_in_fan_out=False):
    """‖w_j + s·b_j·A‖ per row of the (OUT, IN) view, from the dense sum (what peft does)."""
    w = _logical(weight, fan_in_fan_out)
    return np.linalg.norm(w + scale * _f64(lora_b) @ _f64(lora_a), axis=1)


def ref_linear(
    x, weight, bias, lora_a, lora_b, magnitude, scale, *, fan_in_fan_out=False, mask=None, norm=None
):
    """(y, xa, base, norm) of peft's DoRA linear (see cpeft/dora.h)."""
    x = _f64(x)
    lead = x.shape[:-1]
    w = _logical(weight, fan_in_fan_out)
    a, b, m = _f64(lora_a), _f64(lora_b), _f64(magnitude)
    n = ref_norm(weight, lora_a, lora_b, scale, fan_in_fan_out) if norm is None else _f64(norm)
    c = m / n
    xm = x.reshape(-1, w.shape[1])
    xd = xm if mask is None else xm * _f64(mask).reshape(xm.shape)
    xa = xd @ a.T
    lora = scale * (xa @ b.T)
    base = xd @ w.T + lora
    if mask is None:
        y = c * base
    else:
        y = xm @ w.T + (c - 1) * (xd @ w.T) + c * lora
    if bias is not None:
        y = y + _f64(bias)
    out = w.shape[0]
    return (
        y.reshape(lead + (out,)),
        xa.reshape(lead + (a.shape[0],)),
        base.reshape(lead + (out,)),
        n,
    )


def ref_linear_grads(
    grad_out,
    x,
    weight,
    lora_a,
    lora_b,
    magnitude,
    scale,
    *,
    fan_in_fan_out=False,
    mask=None,
    norm=None,
):
    """dict of the gradients of ref_linear with n held constant."""
    x, g = _f64(x), _f64(grad_out)
    w = _logical(weight, fan_in_fan_out)
    a, b, m = _f64(lora_a), _f64(lora_b), _f64(magnitude)
    n = ref_norm(weight, lora_a, lora_b, scale, fan_in_fan_out) if norm is None else _f64(norm)
    c = m / n
    xm = x.reshape(-1, w.shape[1])
    gm = g.reshape(-1, w.shape[0])
    maskm = None if mask is None else _f64(mask).reshape(xm.shape)
    xd = xm if maskm is None else xm * maskm
    xa = xd @ a.T
    base = xd @ w.T + scale * (xa @ b.T)
    gb = (gm * c) @ b
    if maskm is None:
        gx = (gm * c) @ w + scale * gb @ a
    else:
        gx = gm @ w + maskm * ((gm * (c - 1)) @ w + scale * gb @ a)
    return dict(
        x=gx.reshape(x.shape),
        lora_a=scale * gb.T @ xd,
        lora_b=scale * (gm * c).T @ xa,
        magnitude=(gm * base).sum(0) / n,
        bias=gm.sum(0),
    )


def ref_embedding(indices, weight, lora_a, lora_b, magnitude, scale, norm=None):
    w, a, b, m = map(_f64, (weight, lora_a, lora_b, magnitude))
    n = np.linalg.norm(w.T + scale * b @ a, axis=1) if norm is None else _f64(norm)
    idx = np.asarray(indices).reshape(-1)
    y = (m / n) * (w[idx] + scale * a[:, idx].T @ b.T)
    return y.reshape(np.shape(indices) + (w.shape[1],)), n


def ref_embedding_grads(
    grad_out, indices, weight, lora_a, lora_b, magnitude, scale, padding_idx=None, norm=None
):
    w, a, b, m = map(_f64, (weight, lora_a, lora_b, magnitude))
    n = np.linalg.norm(w.T + scale * b @ a, axis=1) if norm is None else _f64(norm)
    c = m / n
    idx = np.asarray(indices).reshape(-1)
    g = _f64(grad_out).reshape(len(idx), w.shape[1])
    a_rows = a[:, idx].T
    grad_a = np.zeros_like(a)
    per_row = scale * (g * c) @ b
    for k, i in enumerate(idx):
        if padding_idx is None or i != padding_idx % w.shape[0]:
            grad_a[:, i] += per_row[k]
    base = w[idx] + scale * a_rows @ b.T
    return dict(lora_a=grad_a, lora_b=scale * (g * c).T @ a_rows, magnitude=(g * base).sum(0) / n)


# ---- helpers ---------------------------------------------------------------------------------


def linear_inputs(rng, dtype, lead, in_f, out_f, r, fan_in_fan_out=False, bias=True):
    x = random_array(rng, lead + (in_f,), dtype)
    w = random_array(rng, (out_f, in_f), dtype, 1 / math.sqrt(in_f))
    stored = np.ascontiguousarray(w.T) if fan_in_fan_out else w
    b = random_array(rng, (out_f,), dtype) if bias else None
    a = random_array(rng, (r, in_f), dtype, 1 / math.sqrt(in_f))
    bb = random_array(rng, (out_f, r), dtype, 0.3)
    m = (rng.random(out_f) + 0.5).astype(dtype)
    return x, stored, b, a, bb, m


def absolute(v):
    return None if v is None else np.abs(np.asarray(v, dtype=np.float64))


def mask_for(shape, p, seed, dtype):
    return F.dropout_mask(shape, p, seed, dtype="float64") if p > 0 else None


# ---- norms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("cached", [False, True])
def test_weight_norm(rng, dtype, fan_in_fan_out, cached):
    _, w, _, a, b, _ = linear_inputs(rng, dtype, (1,), 37, 19, 4, fan_in_fan_out)
    sq = F.dora_weight_sq_norm(w, fan_in_fan_out=fan_in_fan_out) if cached else None
    if cached:
        assert_close(
            sq,
            (_logical(w, fan_in_fan_out) ** 2).sum(1),
            (_logical(w, fan_in_fan_out) ** 2).sum(1),
            dtype,
            37,
            "weight_sq_norm",
        )
    n = F.dora_weight_norm(w, a, b, 1.7, fan_in_fan_out=fan_in_fan_out, weight_sq_norm=sq)
    bound = ref_norm(absolute(w), absolute(a), absolute(b), 1.7, fan_in_fan_out)
    assert_close(n, ref_norm(w, a, b, 1.7, fan_in_fan_out), bound, dtype, 37 + 19 + 4, "norm")


def test_weight_norm_uses_the_given_squared_norms(rng):
    """The cached ‖w‖² really is what the norm is built from (a stale cache shows)."""
    _, w, _, a, b, _ = linear_inputs(rng, np.float64, (1,), 8, 5, 2)
    sq = F.dora_weight_sq_norm(w) + 1.0
    n = F.dora_weight_norm(w, a, b, 0.5, weight_sq_norm=sq)
    np.testing.assert_allclose(n**2, ref_norm(w, a, b, 0.5) ** 2 + 1.0, rtol=1e-12)


# ---- linear ----------------------------------------------------------------------------------

SHAPES = [((1,), 1, 1, 1), ((5,), 7, 3, 2), ((2, 3), 16, 12, 4), ((33,), 40, 24, 8)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lead,in_f,out_f,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_backward(rng, dtype, lead, in_f, out_f, r, p, fan_in_fan_out, bias):
    x, w, b, a, bb, m = linear_inputs(rng, dtype, lead, in_f, out_f, r, fan_in_fan_out, bias)
    scale, seed = 0.75, 11
    mask = mask_for(x.shape, p, seed, dtype)
    y, xa, base, n = F.dora_linear_forward(
        x,
        w,
        b,
        a,
        bb,
        m,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        dropout=p,
        seed=seed,
        keep_base=True,
    )
    k = in_f + out_f + r + int(np.prod(lead))
    ref = ref_linear(x, w, b, a, bb, m, scale, fan_in_fan_out=fan_in_fan_out, mask=mask)
    bound_mask = None if mask is None else np.abs(mask)
    bound = ref_linear(
        absolute(x),
        absolute(w),
        absolute(b),
        absolute(a),
        absolute(bb),
        absolute(m),
        scale,
        fan_in_fan_out=fan_in_fan_out,
        mask=bound_mask,
        norm=ref[3],
    )
    # With dropout y has a (c - 1) term: its bound is |c| + 1, i.e. add the undropped base.
    if mask is not None:
        bound_y = (
            bound[0]
            + absolute(x)
            .reshape(-1, in_f)
            .dot(np.abs(_logical(w, fan_in_fan_out)).T)
            .reshape(bound[0].shape)
            * 2
        )
    else:
        bound_y = bound[0]
    norm_bound = ref_norm(absolute(w), absolute(a), absolute(bb), scale, fan_in_fan_out)
    assert_close(n, ref[3], norm_bound, dtype, k, "norm")
    assert_close(y, ref[0], bound_y, dtype, k, "y")
    assert_close(xa, ref[1], bound[1], dtype, k, "xa")
    assert_close(base, ref[2], bound[2], dtype, k, "base")

    g = random_array(rng, y.shape, dtype)
    grads = F.dora_linear_backward(
        g,
        x,
        w,
        a,
        bb,
        m,
        n,
        xa,
        base,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        dropout=p,
        seed=seed,
        grad_bias=bias,
    )
    want = ref_linear_grads(
        g, x, w, a, bb, m, scale, fan_in_fan_out=fan_in_fan_out, mask=mask, norm=ref[3]
    )
    bound_g = ref_linear_grads(
        absolute(g),
        absolute(x),
        absolute(w),
        absolute(a),
        absolute(bb),
        absolute(m),
        scale,
        fan_in_fan_out=fan_in_fan_out,
        mask=bound_mask,
        norm=ref[3],
    )
    if mask is not None:
        bound_g["x"] = bound_g["x"] + 2 * (
            np.abs(_f64(g)).reshape(-1, out_f) @ np.abs(_logical(w, fan_in_fan_out))
        ).reshape(x.shape)
    for name in ("x", "lora_a", "lora_b", "magnitude") + (("bias",) if bias else ()):
        assert_close(getattr(grads, name), want[name], bound_g[name], dtype, k, f"grad {name}")
    if not bias:
        assert grads.bias is None


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("rows", [9, 30])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_without_kept_base_matches(rng, p, rows, bias, fan_in_fan_out):
    """Without keep_base the forward computes the same y (M > IN folds m/n into copies of W and
    B, M <= IN scales y in place); backward without grad_magnitude needs no base."""
    x, w, b, a, bb, m = linear_inputs(rng, np.float64, (rows,), 10, 6, 3, fan_in_fan_out, bias)
    kw = dict(fan_in_fan_out=fan_in_fan_out)
    y_keep, xa, base, n = F.dora_linear_forward(
        x, w, b, a, bb, m, 0.5, dropout=p, seed=2, keep_base=True, **kw
    )
    y, xa2, none, n2 = F.dora_linear_forward(x, w, b, a, bb, m, 0.5, dropout=p, seed=2, **kw)
    assert none is None
    np.testing.assert_array_equal(xa, xa2)
    np.testing.assert_array_equal(n, n2)
    np.testing.assert_allclose(y, y_keep, rtol=1e-13, atol=1e-13)
    ref = ref_linear(
        x,
        w,
        b,
        a,
        bb,
        m,
        0.5,
        fan_in_fan_out=fan_in_fan_out,
        mask=mask_for(x.shape, p, 2, np.float64),
    )
    np.testing.assert_allclose(y, ref[0], rtol=1e-12, atol=1e-12)
    g = random_array(rng, y.shape, np.float64)
    full = F.dora_linear_backward(g, x, w, a, bb, m, n, xa, base, 0.5, dropout=p, seed=2, **kw)
    part = F.dora_linear_backward(
        g,
        x,
        w,
        a,
        bb,
        m,
        n,
        xa,
        None,
        0.5,
        dropout=p,
        seed=2,
        grad_magnitude=False,
        grad_x=False,
        **kw,
    )
    assert part.magnitude is None and part.x is None
    np.testing.assert_allclose(part.lora_a, full.lora_a, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(part.lora_b, full.lora_b, rtol=1e-13, atol=1e-13)
    only_m = F.dora_linear_backward(
        g,
        x,
        w,
        a,
        bb,
        m,
        n,
        xa,
        base,
        0.5,
        dropout=p,
        seed=2,
        grad_x=False,
        grad_lora_a=False,
        grad_lora_b=False,
        **kw,
    )
    np.testing.assert_array_equal(only_m.magnitude, full.magnitude)


@pytest.mark.parametrize("layout", ["f", "transposed", "offset", "strided_last", "reversed"])
def test_linear_input_layouts(rng, layout):
    x, w, b, a, bb, m = linear_inputs(rng, np.float64, (6,), 9, 7, 3)
    scale = 1.25
    y, xa, base, n = F.dora_linear_forward(
        with_layout(x, layout),
        with_layout(w, layout),
        with_layout(b, layout),
        with_layout(a, layout),
        with_layout(bb, layout),
        with_layout(m, layout),
        scale,
        keep_base=True,
    )
    ref = ref_linear(x, w, b, a, bb, m, scale)
    np.testing.assert_allclose(y, ref[0], rtol=1e-12, atol=1e-12)
    g = random_array(rng, y.shape, np.float64)
    grads = F.dora_linear_backward(
        with_layout(g, layout),
        with_layout(x, layout),
        w,
        a,
        bb,
        m,
        n,
        with_layout(xa, layout),
        with_layout(base, layout),
        scale,
    )
    want = ref_linear_grads(g, x, w, a, bb, m, scale)
    for name in ("x", "lora_a", "lora_b", "magnitude"):
        np.testing.assert_allclose(getattr(grads, name), want[name], rtol=1e-11, atol=1e-12)


def test_linear_large_batch_uses_scaled_weight(rng):
    """M >= IN takes the scaled-W branch of grad_x, M < IN the scaled-g one; both agree."""
    for rows in (3, 50):
        x, w, b, a, bb, m = linear_inputs(rng, np.float64, (rows,), 20, 11, 2)
        y, xa, base, n = F.dora_linear_forward(x, w, b, a, bb, m, 0.9, keep_base=True)
        g = random_array(rng, y.shape, np.float64)
        grads = F.dora_linear_backward(g, x, w, a, bb, m, n, xa, base, 0.9)
        want = ref_linear_grads(g, x, w, a, bb, m, 0.9)
        np.testing.assert_allclose(grads.x, want["x"], rtol=1e-12, atol=1e-12)


def test_linear_outputs_written_in_place(rng):
    x, w, b, a, bb, m = linear_inputs(rng, np.float32, (4,), 5, 6, 2)
    out, out_xa = np.full((4, 6), np.nan, np.float32), np.full((4, 2), np.nan, np.float32)
    out_base, out_norm = np.full((4, 6), np.nan, np.float32), np.full(6, np.nan, np.float32)
    res = F.dora_linear_forward(
        x, w, b, a, bb, m, 0.5, out=out, out_xa=out_xa, out_base=out_base, out_norm=out_norm
    )
    assert res[0] is out and res[1] is out_xa and res[2] is out_base and res[3] is out_norm
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(out_base))


def test_magnitude_equal_to_norm_gives_lora(rng):
    """peft initializes m = n, so a fresh DoRA layer computes exactly what LoRA does."""
    x, w, b, a, bb, m = linear_inputs(rng, np.float64, (8,), 12, 10, 4)
    n = F.dora_weight_norm(w, a, bb, 0.5)
    y, *_ = F.dora_linear_forward(x, w, b, a, bb, n, 0.5)
    y_lora, _ = F.lora_linear_forward(x, w, b, a, bb, 0.5)
    np.testing.assert_allclose(y, y_lora, rtol=1e-13, atol=1e-13)


# ---- embedding -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("padding_idx", [None, 3, -1])
def test_embedding_forward_backward(rng, dtype, index_dtype, padding_idx):
    v, d, r = 11, 6, 3
    w = random_array(rng, (v, d), dtype)
    a = random_array(rng, (r, v), dtype, 0.5)
    b = random_array(rng, (d, r), dtype, 0.5)
    m = (rng.random(d) + 0.5).astype(dtype)
    idx = np.array([[0, 3, 10], [3, 7, 3]], index_dtype)
    scale = 0.6
    y, n = F.dora_embedding_forward(idx, w, a, b, m, scale)
    ref_y, ref_n = ref_embedding(idx, w, a, b, m, scale)
    k = v + d + r + idx.size
    bound_n = np.linalg.norm(np.abs(_f64(w)).T + scale * np.abs(_f64(b)) @ np.abs(_f64(a)), axis=1)
    assert_close(n, ref_n, bound_n, dtype, k, "norm")
    bound_y, _ = ref_embedding(
        idx, absolute(w), absolute(a), absolute(b), absolute(m), scale, norm=ref_n
    )
    assert_close(y, ref_y, bound_y, dtype, k, "y")
    g = random_array(rng, y.shape, dtype)
    grads = F.dora_embedding_backward(g, idx, w, a, b, m, n, scale, padding_idx=padding_idx)
    want = ref_embedding_grads(g, idx, w, a, b, m, scale, padding_idx, norm=ref_n)
    bound = ref_embedding_grads(
        absolute(g),
        idx,
        absolute(w),
        absolute(a),
        absolute(b),
        absolute(m),
        scale,
        padding_idx,
        norm=ref_n,
    )
    for name in ("lora_a", "lora_b", "magnitude"):
        assert_close(getattr(grads, name), want[name], bound[name], dtype, k, f"grad {name}")


def test_embedding_cached_sq_norm(rng):
    w = random_array(rng, (9, 4), np.float64)
    a, b = random_array(rng, (2, 9), np.float64), random_array(rng, (4, 2), np.float64)
    m = rng.random(4) + 0.5
    sq = F.dora_weight_sq_norm(w, fan_in_fan_out=True)
    np.testing.assert_allclose(sq, (w**2).sum(0), rtol=1e-14)
    y, n = F.dora_embedding_forward(np.array([1, 8]), w, a, b, m, 0.3, weight_sq_norm=sq)
    y2, n2 = F.dora_embedding_forward(np.array([1, 8]), w, a, b, m, 0.3)
    np.testing.assert_allclose(n, n2, rtol=1e-14)
    np.testing.assert_allclose(y, y2, rtol=1e-14)


# ---- bad input -------------------------------------------------------------------------------

M_, IN_, OUT_, R_, V_, D_ = 4, 5, 6, 2, 7, 3


def _arr(*shape, dtype=np.float32):
    return np.random.default_rng(sum(shape) + len(shape)).standard_normal(shape).astype(dtype)


def _linear_args(entry):
    base = dict(
        x=_arr(M_, IN_),
        weight=_arr(OUT_, IN_),
        bias=_arr(OUT_),
        lora_a=_arr(R_, IN_),
        lora_b=_arr(OUT_, R_),
        magnitude=_arr(OUT_) ** 2 + 0.5,
        scale=0.5,
    )
    if entry == "dora_linear_forward":
        return base
    base.pop("bias")
    return dict(
        base,
        grad_out=_arr(M_, OUT_),
        norm=_arr(OUT_) ** 2 + 0.5,
        xa=_arr(M_, R_),
        base=_arr(M_, OUT_),
    )


def _embedding_args(entry):
    base = dict(
        indices=np.array([0, 3, 6, 3]),
        weight=_arr(V_, D_),
        lora_a=_arr(R_, V_),
        lora_b=_arr(D_, R_),
        magnitude=_arr(D_) ** 2 + 0.5,
        scale=0.5,
    )
    if entry == "dora_embedding_forward":
        return base
    return dict(base, grad_out=_arr(4, D_), norm=_arr(D_) ** 2 + 0.5)


# The DoRA entry points' positional arguments, in order (tests/fuzz/generator.py reads it too).
POSITIONAL = {
    "dora_linear_forward": ("x", "weight", "bias", "lora_a", "lora_b", "magnitude", "scale"),
    "dora_linear_backward": (
        "grad_out",
        "x",
        "weight",
        "lora_a",
        "lora_b",
        "magnitude",
        "norm",
        "xa",
        "base",
        "scale",
    ),
    "dora_embedding_forward": ("indices", "weight", "lora_a", "lora_b", "magnitude", "scale"),
    "dora_embedding_backward": (
        "grad_out",
        "indices",
        "weight",
        "lora_a",
        "lora_b",
        "magnitude",
        "norm",
        "scale",
    ),
    "dora_weight_norm": ("weight", "lora_a", "lora_b", "scale"),
    "dora_weight_sq_norm": ("weight",),
}


def _valid(entry):
    if entry.startswith("dora_linear"):
        return _linear_args(entry)
    if entry.startswith("dora_embedding"):
        return _embedding_args(entry)
    args = dict(weight=_arr(OUT_, IN_), lora_a=_arr(R_, IN_), lora_b=_arr(OUT_, R_), scale=0.5)
    return args if entry == "dora_weight_norm" else {"weight": args["weight"]}


def _call(entry, args):
    names = POSITIONAL[entry]
    return getattr(F, entry)(
        *[args[n] for n in names], **{k: v for k, v in args.items() if k not in names}
    )


BAD = []


def bad(entry, change, exc, match, name):
    BAD.append(pytest.param(entry, change, exc, match, id=f"{entry}-{name}"))


for _e in ("dora_linear_forward", "dora_linear_backward"):
    bad(_e, {"x": object()}, TypeError, r"\bx\b", "x_object")
    bad(_e, {"x": _arr(M_, IN_).astype(np.float16)}, ValueError, r"\bx\b", "x_float16")
    bad(_e, {"weight": _arr(OUT_, IN_ + 1)}, ValueError, r"weight|\bx\b", "weight_in")
    bad(_e, {"weight": _arr(OUT_, IN_).astype(np.float64)}, ValueError, "weight", "weight_mixed")
    bad(_e, {"lora_a": _arr(R_, IN_ + 1)}, ValueError, "lora_a", "lora_a_shape")
    bad(_e, {"lora_b": _arr(OUT_ + 1, R_)}, ValueError, "lora_b", "lora_b_shape")
    bad(_e, {"magnitude": _arr(OUT_ + 1)}, ValueError, "magnitude", "magnitude_length")
    bad(_e, {"magnitude": _arr(OUT_, 1)}, ValueError, "magnitude", "magnitude_2d")
    bad(
        _e, {"magnitude": _arr(OUT_).astype(np.float64)}, ValueError, "magnitude", "magnitude_mixed"
    )
    bad(_e, {"magnitude": "m"}, TypeError, "magnitude", "magnitude_str")
    bad(_e, {"scale": float("nan")}, ValueError, "scale", "scale_nan")
    bad(_e, {"dropout": 1.5}, ValueError, "dropout", "dropout_range")
    bad(_e, {"seed": -1}, ValueError, "seed", "seed_negative")
    bad(_e, {"fan_in_fan_out": True}, ValueError, r"weight|\bx\b", "fan_in_fan_out_layout")
E = "dora_linear_forward"
bad(E, {"bias": _arr(OUT_ + 1)}, ValueError, "bias", "bias_length")
bad(E, {"weight_sq_norm": _arr(OUT_ - 1)}, ValueError, "weight_sq_norm", "sq_norm_length")
bad(E, {"out": np.zeros((M_, OUT_ + 1), np.float32)}, ValueError, "out", "out_shape")
bad(E, {"out_base": np.zeros((M_, OUT_), np.float64)}, ValueError, "out_base", "base_dtype")
bad(E, {"out_norm": np.zeros(OUT_ + 1, np.float32)}, ValueError, "out_norm", "norm_shape")
bad(E, {"out_xa": np.zeros((M_, R_ + 1), np.float32)}, ValueError, "out_xa", "xa_shape")
E = "dora_linear_backward"
bad(E, {"grad_out": _arr(M_, OUT_ + 1)}, ValueError, "grad_out", "grad_out_shape")
bad(E, {"norm": _arr(OUT_ + 2)}, ValueError, "norm", "norm_length")
bad(E, {"xa": _arr(M_, R_ + 1)}, ValueError, "xa", "xa_shape")
bad(E, {"base": None}, ValueError, "base", "base_missing")
bad(E, {"base": _arr(M_, OUT_ - 1)}, ValueError, "base", "base_shape")
bad(
    E,
    {"grad_magnitude": np.zeros(OUT_ + 1, np.float32)},
    ValueError,
    "grad_magnitude",
    "grad_magnitude_shape",
)
bad(E, {"grad_lora_b": np.zeros((OUT_, R_), np.float64)}, ValueError, "grad_lora_b", "grad_b_dtype")
for _e in ("dora_embedding_forward", "dora_embedding_backward"):
    bad(_e, {"indices": np.array([0, 7, 6, 3])}, IndexError, "indices|7", "index_range")
    bad(_e, {"indices": np.array([0.0, 1.0])}, ValueError, "indices", "index_float")
    bad(_e, {"magnitude": _arr(D_ + 1)}, ValueError, "magnitude", "magnitude_length")
    bad(_e, {"lora_a": _arr(R_, V_ + 1)}, ValueError, "lora_a", "lora_a_shape")
    bad(_e, {"lora_b": _arr(D_ + 1, R_)}, ValueError, "lora_b", "lora_b_shape")
    bad(
        _e, {"weight": _arr(V_, D_).astype(np.float64)}, ValueError, "lora_a|weight", "weight_mixed"
    )
E = "dora_embedding_backward"
bad(E, {"norm": _arr(D_ + 1)}, ValueError, "norm", "norm_length")
bad(E, {"grad_out": _arr(4, D_ + 1)}, ValueError, "grad_out", "grad_out_shape")
bad(E, {"padding_idx": V_}, ValueError, "padding_idx", "padding_range")
bad(
    "dora_weight_norm",
    {"weight_sq_norm": _arr(OUT_, 1)},
    ValueError,
    "weight_sq_norm",
    "sq_norm_2d",
)
bad("dora_weight_norm", {"lora_b": _arr(OUT_, R_ + 1)}, ValueError, "lora_[ab]", "rank")
bad("dora_weight_sq_norm", {"weight": _arr(OUT_)}, ValueError, "weight", "weight_1d")
bad("dora_weight_sq_norm", {"out": np.zeros(OUT_ + 1, np.float32)}, ValueError, "out", "out_shape")


@pytest.mark.parametrize("entry,change,exc,match", BAD)
def test_bad_input(entry, change, exc, match):
    args = _valid(entry)
    args.update(change)
    before = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc, match=match):
        _call(entry, args)
    for k, v in before.items():
        np.testing.assert_array_equal(args[k], v, err_msg=f"{k} was modified")


@pytest.mark.parametrize("entry", list(POSITIONAL))
def test_valid_args_pass(entry):
    """The baseline of the bad-input cases is itself valid."""
    _call(entry, _valid(entry))


# ---- reference counts and heap (tests/test_leaks.py's checks, for the DoRA entry points) ------

DORA_BAD_CHANGE = {
    "dora_linear_forward": {"magnitude": _arr(OUT_ + 1)},
    "dora_linear_backward": {"base": None},
    "dora_embedding_forward": {"indices": np.array([0, 9])},
    "dora_embedding_backward": {"norm": _arr(D_ + 2)},
    "dora_weight_norm": {"scale": float("inf")},
    "dora_weight_sq_norm": {"weight": _arr(OUT_)},
}


def _run_many(entry, args, failing, times):
    for _ in range(times):
        if failing:
            with pytest.raises((ValueError, TypeError, IndexError)):
                _call(entry, args)
        else:
            _call(entry, args)


@pytest.mark.parametrize("failing", [False, True], ids=["success", "error"])
@pytest.mark.parametrize("entry", sorted(POSITIONAL))
def test_refcounts_and_heap_stable(entry, failing):
    import gc
    import sys
    import tracemalloc

    args = _valid(entry)
    if failing:
        args.update(DORA_BAD_CHANGE[entry])
    watched = {k: v for k, v in args.items() if v is not None and not isinstance(v, (bool, int))}
    _run_many(entry, args, failing, 5)
    before = {k: sys.getrefcount(v) for k, v in watched.items()}
    tracemalloc.start()
    try:
        gc.collect()
        start, _ = tracemalloc.get_traced_memory()
        _run_many(entry, args, failing, 200)
        gc.collect()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert {k: sys.getrefcount(v) for k, v in watched.items()} == before
    assert end - start < 4096, f"heap grew by {end - start} bytes over 200 calls"
