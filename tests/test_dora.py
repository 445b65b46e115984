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

from cpeft import functional as F
from conftest import assert_close, random_array, with_layout


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


def ref_linear(x, weight, bias, lora_a, lora_b, magnitude, scale, *, fan_in_fan_out=False,
               mask=None, norm=None):
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
    return (y.reshape(lead + (out,)), xa.reshape(lead + (a.shape[0],)),
            base.reshape(lead + (out,)), n)


def ref_linear_grads(grad_out, x, weight, lora_a, lora_b, magnitude, scale, *,
                     fan_in_fan_out=False, mask=None, norm=None):
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
    return dict(x=gx.reshape(x.shape), lora_a=scale * gb.T @ xd,
                lora_b=scale * (gm * c).T @ xa, magnitude=(gm * base).sum(0) / n,
                bias=gm.sum(0))


def ref_embedding(indices, weight, lora_a, lora_b, magnitude, scale, norm=None):
    w, a, b, m = map(_f64, (weight, lora_a, lora_b, magnitude))
    n = np.linalg.norm(w.T + scale * b @ a, axis=1) if norm is None else _f64(norm)
    idx = np.asarray(indices).reshape(-1)
    y = (m / n) * (w[idx] + scale * a[:, idx].T @ b.T)
    return y.reshape(np.shape(indices) + (w.shape[1],)), n


def ref_embedding_grads(grad_out, indices, weight, lora_a, lora_b, magnitude, scale,
                        padding_idx=None, norm=None):
    w, a, b, m = map(_f64, (weight, lora_a, lora_b, magnitude))
    n = np.linalg.norm(w.T + scale * b @ a, axis=1) if norm is None else _f64(norm)
    c = m / n
    idx = np.asarray(indices).reshape(-1)
    g = _f64(grad_out).reshape(len(idx), -1)
    a_rows = a[:, idx].T
    grad_a = np.zeros_like(a)
    per_row = scale * (g * c) @ b
    for k, i in enumerate(idx):
        if padding_idx is None or i != padding_idx % w.shape[0]:
            grad_a[:, i] += per_row[k]
    base = w[idx] + scale * a_rows @ b.T
    return dict(lora_a=grad_a, lora_b=scale * (g * c).T @ a_rows,
                magnitude=(g * base).sum(0) / n)


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
        assert_close(sq, (_logical(w, fan_in_fan_out) ** 2).sum(1),
                     (_logical(w, fan_in_fan_out) ** 2).sum(1), dtype, 37, "weight_sq_norm")
    n = F.dora_weight_norm(w, a, b, 1.7, fan_in_fan_out=fan_in_fan_out, weight_sq_norm=sq)
    bound = ref_norm(absolute(w), absolute(a), absolute(b), 1.7, fan_in_fan_out)
    assert_close(n, ref_norm(w, a, b, 1.7, fan_in_fan_out), bound, dtype, 37 + 19 + 4, "norm")


def test_weight_norm_uses_the_given_squared_norms(rng):
    """The cached ‖w‖² really is what the norm is built from (a stale cache shows)."""
    _, w, _, a, b, _ = linear_inputs(rng, np.float64, (1,), 8, 5, 2)
    sq = F.dora_weight_sq_norm(w) + 1.0
    n = F.dora_weight_norm(w, a, b, 0.5, weight_sq_norm=sq)
    np.testing.assert_allclose(n ** 2, ref_norm(w, a, b, 0.5) ** 2 + 1.0, rtol=1e-12)


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
    y, xa, base, n = F.dora_linear_forward(x, w, b, a, bb, m, scale,
                                           fan_in_fan_out=fan_in_fan_out, dropout=p, seed=seed,
                                           keep_base=True)
    k = in_f + out_f + r + int(np.prod(lead))
    ref = ref_linear(x, w, b, a, bb, m, scale, fan_in_fan_out=fan_in_fan_out, mask=mask)
    bound_mask = None if mask is None else np.abs(mask)
    bound = ref_linear(absolute(x), absolute(w), absolute(b), absolute(a), absolute(bb),
                       absolute(m), scale, fan_in_fan_out=fan_in_fan_out, mask=bound_mask,
                       norm=ref[3])
    # With dropout y has a (c - 1) term: its bound is |c| + 1, i.e. add the undropped base.
    if mask is not None:
        bound_y = bound[0] + absolute(x).reshape(-1, in_f).dot(
            np.abs(_logical(w, fan_in_fan_out)).T).reshape(bound[0].shape) * 2
    else:
        bound_y = bound[0]
    norm_bound = ref_norm(absolute(w), absolute(a), absolute(bb), scale, fan_in_fan_out)
    assert_close(n, ref[3], norm_bound, dtype, k, "norm")
    assert_close(y, ref[0], bound_y, dtype, k, "y")
    assert_close(xa, ref[1], bound[1], dtype, k, "xa")
    assert_close(base, ref[2], bound[2], dtype, k, "base")

    g = random_array(rng, y.shape, dtype)
    grads = F.dora_linear_backward(g, x, w, a, bb, m, n, xa, base, scale,
                                   fan_in_fan_out=fan_in_fan_out, dropout=p, seed=seed,
                                   grad_bias=bias)
    want = ref_linear_grads(g, x, w, a, bb, m, scale, fan_in_fan_out=fan_in_fan_out, mask=mask,
                            norm=ref[3])
    bound_g = ref_linear_grads(absolute(g), absolute(x), absolute(w), absolute(a), absolute(bb),
                               absolute(m), scale, fan_in_fan_out=fan_in_fan_out,
                               mask=bound_mask, norm=ref[3])
    if mask is not None:
        bound_g["x"] = bound_g["x"] + 2 * (np.abs(_f64(g)).reshape(-1, out_f) @ np.abs(
            _logical(w, fan_in_fan_out))).reshape(x.shape)
    for name in ("x", "lora_a", "lora_b", "magnitude") + (("bias",) if bias else ()):
        assert_close(getattr(grads, name), want[name], bound_g[name], dtype, k, f"grad {name}")
    if not bias:
        assert grads.bias is None


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_linear_without_kept_base_matches(rng, p):
    """Without keep_base the forward computes the same y; backward without grad_magnitude
    needs no base."""
    x, w, b, a, bb, m = linear_inputs(rng, np.float64, (9,), 10, 6, 3)
    y_keep, xa, base, n = F.dora_linear_forward(x, w, b, a, bb, m, 0.5, dropout=p, seed=2,
                                                keep_base=True)
    y, xa2, none, n2 = F.dora_linear_forward(x, w, b, a, bb, m, 0.5, dropout=p, seed=2)
    assert none is None
    np.testing.assert_array_equal(xa, xa2)
    np.testing.assert_array_equal(n, n2)
    np.testing.assert_allclose(y, y_keep, rtol=1e-13, atol=1e-13)
    g = random_array(rng, y.shape, np.float64)
    full = F.dora_linear_backward(g, x, w, a, bb, m, n, xa, base, 0.5, dropout=p, seed=2)
    part = F.dora_linear_backward(g, x, w, a, bb, m, n, xa, None, 0.5, dropout=p, seed=2,
                                  grad_magnitude=False, grad_x=False)
    assert part.magnitude is None and part.x is None
    np.testing.assert_allclose(part.lora_a, full.lora_a, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(part.lora_b, full.lora_b, rtol=1e-13, atol=1e-13)
    only_m = F.dora_linear_backward(g, x, w, a, bb, m, n, xa, base, 0.5, dropout=p, seed=2,
                                    grad_x=False, grad_lora_a=False, grad_lora_b=False)
    np.testing.assert_array_equal(only_m.magnitude, full.magnitude)


@pytest.mark.parametrize("layout", ["f", "transposed", "offset", "strided_last", "reversed"])
def test_linear_input_layouts(rng, layout):
    x, w, b, a, bb, m = linear_inputs(rng, np.float64, (6,), 9, 7, 3)
    scale = 1.25
    y, xa, base, n = F.dora_linear_forward(with_layout(x, layout), with_layout(w, layout),
                                           with_layout(b, layout), with_layout(a, layout),
                                           with_layout(bb, layout), with_layout(m, layout),
                                           scale, keep_base=True)
    ref = ref_linear(x, w, b, a, bb, m, scale)
    np.testing.assert_allclose(y, ref[0], rtol=1e-12, atol=1e-12)
    g = random_array(rng, y.shape, np.float64)
    grads = F.dora_linear_backward(with_layout(g, layout), with_layout(x, layout), w, a, bb, m,
                                   n, with_layout(xa, layout), with_layout(base, layout), scale)
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
    res = F.dora_linear_forward(x, w, b, a, bb, m, 0.5, out=out, out_xa=out_xa,
                                out_base=out_base, out_norm=out_norm)
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
    bound_y, _ = ref_embedding(idx, absolute(w), absolute(a), absolute(b), absolute(m), scale,
                               norm=ref_n)
    assert_close(y, ref_y, bound_y, dtype, k, "y")
    g = random_array(rng, y.shape, dtype)
    grads = F.dora_embedding_backward(g, idx, w, a, b, m, n, scale, padding_idx=padding_idx)
    want = ref_embedding_grads(g, idx, w, a, b, m, scale, padding_idx, norm=ref_n)
    bound = ref_embedding_grads(absolute(g), idx, absolute(w), absolute(a), absolute(b),
                                absolute(m), scale, padding_idx, norm=ref_n)
    for name in ("lora_a", "lora_b", "magnitude"):
        assert_close(getattr(grads, name), want[name], bound[name], dtype, k, f"grad {name}")


def test_embedding_cached_sq_norm(rng):
    w = random_array(rng, (9, 4), np.float64)
    a, b = random_array(rng, (2, 9), np.float64), random_array(rng, (4, 2), np.float64)
    m = rng.random(4) + 0.5
    sq = F.dora_weight_sq_norm(w, fan_in_fan_out=True)
    np.testing.assert_allclose(sq, (w ** 2).sum(0), rtol=1e-14)
    y, n = F.dora_embedding_forward(np.array([1, 8]), w, a, b, m, 0.3, weight_sq_norm=sq)
    y2, n2 = F.dora_embedding_forward(np.array([1, 8]), w, a, b, m, 0.3)
    np.testing.assert_allclose(n, n2, rtol=1e-14)
    np.testing.assert_allclose(y, y2, rtol=1e-14)


# ---- bad input -------------------------------------------------------------------------------

M_, IN_, OUT_, R_, V_, D_ = 4, 5, 6, 2, 7, 3


def _arr(*shape, dtype=np.float32):
    return np.random.default_rng(sum(shape) + len(shape)).standard_normal(shape).astype(dtype)


def _linear_args(entry):
    base = dict(x=_arr(M_, IN_), weight=_arr(OUT_, IN_), bias=_arr(OUT_), lora_a=_arr(R_, IN_),
                lora_b=_arr(OUT_, R_), magnitude=_arr(OUT_) ** 2 + 0.5, scale=0.5)
    if entry == "dora_linear_forward":
        return base
    base.pop("bias")
    return dict(base, grad_out=_arr(M_, OUT_), norm=_arr(OUT_) ** 2 + 0.5, xa=_arr(M_, R_),
                base=_arr(M_, OUT_))


def _embedding_args(entry):
    base = dict(indices=np.array([0, 3, 6, 3]), weight=_arr(V_, D_), lora_a=_arr(R_, V_),
                lora_b=_arr(D_, R_), magnitude=_arr(D_) ** 2 + 0.5, scale=0.5)
    if entry == "dora_embedding_forward":
        return base
    return dict(base, grad_out=_arr(4, D_), norm=_arr(D_) ** 2 + 0.5)


POSITIONAL = {
    "dora_linear_forward": ("x", "weight", "bias", "lora_a", "lora_b", "magnitude", "scale"),
    "dora_linear_backward": ("grad_out", "x", "weight", "lora_a", "lora_b", "magnitude", "norm",
                             "xa", "base", "scale"),
    "dora_embedding_forward": ("indices", "weight", "lora_a", "lora_b", "magnitude", "scale"),
    "dora_embedding_backward": ("grad_out", "indices", "weight", "lora_a", "lora_b", "magnitude",
                                "norm", "scale"),
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
    return getattr(F, entry)(*[args[n] for n in names],
                             **{k: v for k, v in args.items() if k not in names})


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
    bad(_e, {"magnitude": _arr(OUT_).astype(np.float64)}, ValueError, "magnitude",
        "magnitude_mixed")
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
bad(E, {"grad_magnitude": np.zeros(OUT_ + 1, np.float32)}, ValueError, "grad_magnitude",
    "grad_magnitude_shape")
bad(E, {"grad_lora_b": np.zeros((OUT_, R_), np.float64)}, ValueError, "grad_lora_b",
    "grad_b_dtype")
for _e in ("dora_embedding_forward", "dora_embedding_backward"):
    bad(_e, {"indices": np.array([0, 7])}, IndexError, "indices|7", "index_range")
    bad(_e, {"indices": np.array([0.0, 1.0])}, ValueError, "indices", "index_float")
    bad(_e, {"magnitude": _arr(D_ + 1)}, ValueError, "magnitude", "magnitude_length")
    bad(_e, {"lora_a": _arr(R_, V_ + 1)}, ValueError, "lora_a", "lora_a_shape")
    bad(_e, {"lora_b": _arr(D_ + 1, R_)}, ValueError, "lora_b", "lora_b_shape")
    bad(_e, {"weight": _arr(V_, D_).astype(np.float64)}, ValueError, "lora_a|weight",
        "weight_mixed")
E = "dora_embedding_backward"
bad(E, {"norm": _arr(D_ + 1)}, ValueError, "norm", "norm_length")
bad(E, {"grad_out": _arr(4, D_ + 1)}, ValueError, "grad_out", "grad_out_shape")
bad(E, {"padding_idx": V_}, ValueError, "padding_idx", "padding_range")
bad("dora_weight_norm", {"weight_sq_norm": _arr(OUT_, 1)}, ValueError, "weight_sq_norm",
    "sq_norm_2d")
bad("dora_weight_norm", {"lora_b": _arr(OUT_, R_ + 1)}, ValueError, "lora_[ab]", "rank")
bad("dora_weight_sq_norm", {"weight": _arr(OUT_)}, ValueError, "weight", "weight_1d")
bad("dora_weight_sq_norm", {"out": np.zeros(OUT_ + 1, np.float32)}, ValueError, "out",
    "out_shape")


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


# ---- torch layers (loralib API) --------------------------------------------------------------

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import cpeft  # noqa: E402


def _peft_dora(base: "torch.nn.Module", target: str, r=4, alpha=8, dropout=0.0, **config):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=[target], use_dora=True, **config))
    return model, model.base_model.model._modules[target]


class _FixedMask(torch.nn.Module):
    """Stands in for peft's nn.Dropout so peft sees cpeft's Philox mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def _randomize(*tensors, scale=0.3):
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn_like(t) * scale)


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("bias", [True, False])
def test_functional_matches_peft_linear(p, bias):
    """cpeft's op against peft's own DoRA forward and autograd, dropout included (peft's
    dropout module replaced by the same mask cpeft regenerates from its seed)."""
    torch.manual_seed(0)
    m_rows, in_f, out_f, seed = 7, 12, 9, 5
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64))
    model, layer = _peft_dora(base, "lin", dropout=p)
    _randomize(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(
            1 + 0.2 * torch.rand(out_f, dtype=torch.float64))
    if bias:
        layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(m_rows, in_f, dtype=torch.float64, requires_grad=True)
    if p > 0:
        mask = torch.from_numpy(F.dropout_mask((m_rows, in_f), p, seed, dtype="float64"))
        layer.lora_dropout["default"] = _FixedMask(mask)
    model.train()
    y_peft = model(x)
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    w, bb = layer.base_layer.weight, layer.base_layer.bias
    scale = layer.scaling["default"]
    y, xa, kept, n = F.dora_linear_forward(x, w, bb, a, b, mag, scale, dropout=p, seed=seed,
                                           keep_base=True)
    grads = F.dora_linear_backward(g, x, w, a, b, mag, n, xa, kept, scale, dropout=p, seed=seed,
                                   grad_bias=bias)
    torch.testing.assert_close(y, y_peft.detach(), rtol=1e-12, atol=1e-12)
    for name, want in (("x", x.grad), ("lora_a", a.grad), ("lora_b", b.grad),
                       ("magnitude", mag.grad)) + ((("bias", bb.grad),) if bias else ()):
        torch.testing.assert_close(getattr(grads, name), want, rtol=1e-11, atol=1e-12,
                                   msg=f"grad {name}")


def _copy_into(ours, layer, embedding=False):
    with torch.no_grad():
        if embedding:
            ours.weight.copy_(layer.base_layer.weight)
            ours.lora_A.copy_(layer.lora_embedding_A["default"])
            ours.lora_B.copy_(layer.lora_embedding_B["default"])
        else:
            ours.weight.copy_(layer.base_layer.weight)
            if ours.bias is not None:
                ours.bias.copy_(layer.base_layer.bias)
            ours.lora_A.copy_(layer.lora_A["default"].weight)
            ours.lora_B.copy_(layer.lora_B["default"].weight)
        ours.lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)


def test_linear_layer_matches_peft_and_merges_exactly():
    torch.manual_seed(1)
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(16, 10, dtype=torch.float64))
    model, layer = _peft_dora(base, "lin", r=4, alpha=8)
    ours = cpeft.Linear(16, 10, r=4, lora_alpha=8, use_dora=True, dtype=torch.float64)
    # peft initializes m = ‖W + s·B·A‖ = ‖W‖ (B = 0); cpeft does the same from its own W.
    with torch.no_grad():
        ours.weight.copy_(layer.base_layer.weight)
    with torch.no_grad():
        ours.lora_magnitude_vector.copy_(torch.linalg.norm(ours.weight, dim=1))
    torch.testing.assert_close(ours.lora_magnitude_vector,
                               layer.lora_magnitude_vector["default"].weight, rtol=1e-14,
                               atol=0)
    _randomize(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    _copy_into(ours, layer)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    model.train()
    ours.train()
    y_peft, y = model(x), ours(x)
    torch.testing.assert_close(y, y_peft, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y_peft.backward(g)
    y.backward(g)
    torch.testing.assert_close(ours.lora_magnitude_vector.grad,
                               layer.lora_magnitude_vector["default"].weight.grad)
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_B["default"].weight.grad)
    # merge: cpeft's merged W equals peft's merged W; unmerge restores the bits
    original = ours.weight.detach().clone()
    ours.eval()
    merged = model.merge_and_unload()
    torch.testing.assert_close(ours.weight, merged.lin.weight, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(ours(x), y.detach(), rtol=1e-12, atol=1e-12)
    ours.train()
    assert torch.equal(ours.weight, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_layer_merge_cycles_bit_exact(dtype, fan_in_fan_out):
    torch.manual_seed(2)
    layer = cpeft.Linear(24, 18, r=4, lora_alpha=16, use_dora=True,
                         fan_in_fan_out=fan_in_fan_out, dtype=dtype)
    _randomize(layer.lora_B)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(18, dtype=dtype) + 0.5)
    original = layer.weight.detach().clone()
    x = torch.randn(6, 24, dtype=dtype)
    y = layer(x).detach()
    for _ in range(5):
        layer.eval()
        torch.testing.assert_close(layer(x), y)
        layer.train()
    assert torch.equal(layer.weight, original)


def test_magnitude_is_an_adapter_parameter():
    model = torch.nn.Sequential(cpeft.Linear(8, 4, r=2, use_dora=True),
                                torch.nn.Linear(4, 3))
    cpeft.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "0.lora_magnitude_vector"}
    assert set(cpeft.lora_state_dict(model)) == trainable
    assert set(cpeft.lora_state_dict(model, bias="lora_only")) == trainable | {"0.bias"}


def test_magnitude_initialized_to_norm():
    """m = ‖W + s·B·A‖ per output row at creation (B = 0, so ‖W‖) and again after
    reset_parameters, on the stored layout."""
    torch.manual_seed(3)
    layer = cpeft.Linear(10, 7, r=3, use_dora=True, fan_in_fan_out=True, dtype=torch.float64)
    torch.testing.assert_close(layer.lora_magnitude_vector,
                               torch.linalg.norm(layer.weight.T, dim=1), rtol=1e-14, atol=0)
    before = layer.lora_magnitude_vector.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.lora_magnitude_vector)
    torch.testing.assert_close(layer.lora_magnitude_vector,
                               torch.linalg.norm(layer.weight.T, dim=1), rtol=1e-14, atol=0)
    x = torch.randn(4, 10, dtype=torch.float64)
    plain = cpeft.Linear(10, 7, r=3, fan_in_fan_out=True, dtype=torch.float64)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items()
                           if k != "lora_magnitude_vector"})
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-13, atol=1e-13)


def test_weight_change_invalidates_cached_sq_norm():
    torch.manual_seed(4)
    layer = cpeft.Linear(9, 5, r=2, use_dora=True, dtype=torch.float64)
    _randomize(layer.lora_B)
    x = torch.randn(3, 9, dtype=torch.float64)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    y = layer(x)
    w = layer.weight
    n = torch.linalg.norm(w + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    want = layer.lora_magnitude_vector / n * (
        x @ w.T + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T) + layer.bias
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_dora_refuses_trainable_weight_and_zero_rank():
    layer = cpeft.Linear(4, 3, r=2, use_dora=True)
    layer.weight.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="weight"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="use_dora"):
        cpeft.Linear(4, 3, r=0, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        cpeft.Embedding(4, 3, r=0, use_dora=True)


def test_embedding_layer_matches_peft_and_merges_exactly():
    torch.manual_seed(5)
    base = torch.nn.Sequential()
    base.add_module("emb", torch.nn.Embedding(13, 6, padding_idx=2, dtype=torch.float64))
    model, layer = _peft_dora(base, "emb", r=3, alpha=6)
    ours = cpeft.Embedding(13, 6, r=3, lora_alpha=6, use_dora=True, padding_idx=2,
                           dtype=torch.float64)
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    _copy_into(ours, layer, embedding=True)
    idx = torch.tensor([[0, 2, 12, 5], [5, 5, 1, 2]])
    model.train()
    y_peft, y = model(idx), ours(idx)
    torch.testing.assert_close(y, y_peft, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y_peft.backward(g)
    y.backward(g)
    torch.testing.assert_close(ours.lora_magnitude_vector.grad,
                               layer.lora_magnitude_vector["default"].weight.grad)
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_embedding_A["default"].grad)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_embedding_B["default"].grad)
    original = ours.weight.detach().clone()
    ours.eval()
    merged = model.merge_and_unload()
    torch.testing.assert_close(ours.weight, merged.emb.weight, rtol=1e-13, atol=1e-14)
    ours.train()
    assert torch.equal(ours.weight, original)


# ---- peft-style API: LoraConfig(use_dora=True), files both ways ------------------------------

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from cpeft.peft import ADAPTER_WEIGHTS_NAME, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_peft import bert, gpt2, output, tokens  # noqa: E402

DORA_CASES = {
    # c_attn / mlp.c_proj are transformers' Conv1D, wte an Embedding
    "gpt2-conv1d-embedding": (gpt2, dict(r=4, lora_alpha=16,
                                         target_modules=["c_attn", "mlp.c_proj", "wte"])),
    "bert-linear": (bert, dict(r=2, lora_alpha=4, target_modules=["query", "value"])),
}


def _randomize_dora(model, seed=7):
    """Non-trivial adapters: A and B random, the magnitude moved off its initial norm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.0 + 0.2 * noise)
            elif "lora_" in name:
                parameter.copy_(0.2 * noise)


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_peft_api_dora_layout_and_initial_magnitude_match_peft(case, tmp_path):
    make, kwargs = DORA_CASES[case]
    ours = get_peft_model(make(), LoraConfig(use_dora=True, **kwargs))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, **kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    our_tensors = safetensors_torch.load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME)
    their_tensors = safetensors_torch.load_file(tmp_path / "theirs" / ADAPTER_WEIGHTS_NAME)
    assert {k: tuple(v.shape) for k, v in our_tensors.items()} == \
        {k: tuple(v.shape) for k, v in their_tensors.items()}
    magnitudes = [k for k in their_tensors if k.endswith(".lora_magnitude_vector")]
    assert magnitudes
    for key in magnitudes:  # m = ‖W + s·B·A‖ at creation, B = 0 (embedding: A = 0)
        torch.testing.assert_close(our_tensors[key], their_tensors[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_dora_adapter_written_by_peft_loads_in_cpeft_with_equal_outputs(case, tmp_path):
    make, kwargs = DORA_CASES[case]
    ids = tokens()
    theirs = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, **kwargs))
    _randomize_dora(theirs)
    theirs.eval()
    expected = output(theirs, ids)
    assert not torch.allclose(expected, output(make(), ids), rtol=1e-4, atol=1e-4)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(output(ours, ids), expected, rtol=1e-5, atol=1e-5)
    # merged as peft merges (with GPT-2's tied wte the merge also reaches lm_head, in both
    # libraries), and unmerge restores the base weights bit for bit
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items()}
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(output(ours, ids), output(theirs, ids), rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    after = ours.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_dora_adapter_written_by_cpeft_loads_in_peft_with_equal_outputs(case, tmp_path):
    make, kwargs = DORA_CASES[case]
    ids = tokens()
    ours = get_peft_model(make(), LoraConfig(use_dora=True, **kwargs))
    _randomize_dora(ours)
    ours.eval()
    expected = output(ours, ids)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    theirs.eval()
    torch.testing.assert_close(output(theirs, ids), expected, rtol=1e-5, atol=1e-5)
    merged = theirs.merge_and_unload()
    ours_merged = ours.merge_and_unload()
    torch.testing.assert_close(output(ours_merged, ids), output(merged, ids), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_dora_training_gradients_match_peft(case, tmp_path):
    make, kwargs = DORA_CASES[case]
    ids = tokens()
    theirs = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, **kwargs))
    _randomize_dora(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path, is_trainable=True)
    grads = []
    for model in (theirs, ours):
        model.train()
        result = model(ids)
        logits = result.logits if hasattr(result, "logits") else result.last_hidden_state
        (logits.double() ** 2).sum().backward()
        grads.append({n.replace(".default", ""): p.grad for n, p in model.named_parameters()
                      if p.requires_grad})
    assert set(grads[0]) == set(grads[1])
    assert any("lora_magnitude_vector" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=2e-4, atol=1e-5,
                                   msg=name)


def test_peft_api_refuses_several_active_adapters_with_dora():
    model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="DoRA"):
        model(tokens())


def test_layer_releases_every_dlpack_export():
    """The DoRA Functions hand tensors to C as torch capsules: after many steps no parameter,
    input or cached norm holds an extra reference."""
    import gc
    from test_leaks import holders
    layer = cpeft.Linear(6, 5, r=2, use_dora=True, lora_dropout=0.2)
    x = torch.randn(4, 6, requires_grad=True)
    layer(x).sum().backward()
    watched = dict(layer.named_parameters(), x=x)
    before = {k: holders(v) for k, v in watched.items()}
    for _ in range(50):
        layer(x).sum().backward()
    gc.collect()
    assert {k: holders(v) for k, v in watched.items()} == before


def test_peft_api_dora_merged_after_another_adapter_unmerges_exactly():
    """n is taken on the pretrained weight even when another adapter is merged first, and
    unmerging both restores the weights bit for bit."""
    ids = tokens()
    model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    _randomize_dora(model)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()
              if "base_layer" in k}
    model.set_adapter("dora")
    model.eval()
    expected = output(model, ids)
    model.merge_adapter(["default"])
    model.merge_adapter(["dora"])
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.merge_adapter(["dora"])
    torch.testing.assert_close(output(model, ids), expected, rtol=1e-5, atol=1e-5)
