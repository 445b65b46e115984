"""NumPy float64 references for every cpeft op, written from the formulas in docs/design.md and
the compute headers, independently of the C code.

Every function takes the arguments the way cpeft.functional does (weights in their stored
layout, ``fan_in_fan_out``, ``enable_lora``), converts all floats to float64 and returns float64
results. Dimension letters: M rows (all leading dims of x flattened), IN / OUT features, R the
LoRA rank, G output groups (``len(enable_lora)``), K enabled groups, SEG = OUT / G, N looked-up
indices, V vocabulary size, D embedding width. Dropout is an explicit ``mask`` array of x's shape
holding 0 or 1/(1-p) (``None``: no dropout); ``dropout_mask`` rebuilds it from the documented
Philox4x32-10 counter scheme.
"""

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _logical_weight(weight, fan_in_fan_out):
    w = _f64(weight)
    return w.T if fan_in_fan_out else w


def _groups(out_features, enable_lora):
    enable = [True] if enable_lora is None else [bool(e) for e in enable_lora]
    seg = out_features // len(enable)
    return seg, [g for g, on in enumerate(enable) if on]


# ---------------------------------------------------------------------------------------------
# LoRA linear (loralib Linear / MergedLinear)
# ---------------------------------------------------------------------------------------------


def lora_linear_forward(
    x, weight, bias, lora_a, lora_b, scale, *, fan_in_fan_out=False, enable_lora=None, mask=None
):
    """y = x·Wᵀ + b + s · scatter_K(xa_k · B_kᵀ),  xa = (x ⊙ mask)·Aᵀ.

    x (..., IN); weight (OUT, IN), or (IN, OUT) with fan_in_fan_out; bias (OUT,) or None;
    lora_a (R*K, IN); lora_b (SEG*K, R); mask like x or None.
    Returns y (..., OUT) and xa (..., R*K).
    """
    x = _f64(x)
    lead = x.shape[:-1]
    w = _logical_weight(weight, fan_in_fan_out)
    a, b = _f64(lora_a), _f64(lora_b)
    out_features, in_features = w.shape
    r = b.shape[1]
    xm = x.reshape(-1, in_features)
    xd = xm if mask is None else xm * _f64(mask).reshape(xm.shape)
    xa = xd @ a.T
    y = xm @ w.T
    if bias is not None:
        y = y + _f64(bias)
    seg, enabled = _groups(out_features, enable_lora)
    for k, g in enumerate(enabled):
        y[:, g * seg : (g + 1) * seg] += scale * (
            xa[:, k * r : (k + 1) * r] @ b[k * seg : (k + 1) * seg].T
        )
    return y.reshape(lead + (out_features,)), xa.reshape(lead + (a.shape[0],))


def lora_linear_backward(
    grad_out, x, weight, lora_a, lora_b, scale, *, fan_in_fan_out=False, enable_lora=None, mask=None
):
    """Gradients of lora_linear_forward for upstream gradient grad_out (..., OUT).

    With g = grad_out as (M, OUT), xd = x ⊙ mask, xa = xd·Aᵀ and gb_k = g_k·B_k (M, R):
      x      (..., IN)      = g·W + s · mask ⊙ (gb·A)
      lora_a (R*K, IN)      = s · gbᵀ·xd
      lora_b (SEG*K, R)     = s · g_kᵀ·xa_k per enabled block
      bias   (OUT,)         = Σ_rows g
      weight (OUT, IN), or (IN, OUT) with fan_in_fan_out = gᵀ·x in the stored layout
    Returns a dict with those keys.
    """
    x = _f64(x)
    w = _logical_weight(weight, fan_in_fan_out)
    a, b = _f64(lora_a), _f64(lora_b)
    out_features, in_features = w.shape
    r = b.shape[1]
    xm = x.reshape(-1, in_features)
    g = _f64(grad_out).reshape(-1, out_features)
    mk = None if mask is None else _f64(mask).reshape(xm.shape)
    xd = xm if mk is None else xm * mk
    xa = xd @ a.T
    seg, enabled = _groups(out_features, enable_lora)
    gb = np.zeros_like(xa)
    grad_b = np.zeros_like(b)
    for k, grp in enumerate(enabled):
        g_k = g[:, grp * seg : (grp + 1) * seg]
        gb[:, k * r : (k + 1) * r] = g_k @ b[k * seg : (k + 1) * seg]
        grad_b[k * seg : (k + 1) * seg] = scale * (g_k.T @ xa[:, k * r : (k + 1) * r])
    lora_x = gb @ a
    if mk is not None:
        lora_x = lora_x * mk
    grad_x = g @ w + scale * lora_x
    grad_w = g.T @ xm
    return {
        "x": grad_x.reshape(x.shape),
        "lora_a": scale * (gb.T @ xd),
        "lora_b": grad_b,
        "bias": g.sum(axis=0),
        "weight": grad_w.T if fan_in_fan_out else grad_w,
    }


def lora_delta(lora_a, lora_b, scale, out_features, *, enable_lora=None):
    """ΔW = s · B_k·A_k on each enabled block of rows, zero elsewhere: (OUT, IN) logical view.

    lora_a (R*K, IN); lora_b (SEG*K, R).
    """
    a, b = _f64(lora_a), _f64(lora_b)
    r = b.shape[1]
    delta = np.zeros((out_features, a.shape[1]))
    seg, enabled = _groups(out_features, enable_lora)
    for k, g in enumerate(enabled):
        delta[g * seg : (g + 1) * seg] = scale * (
            b[k * seg : (k + 1) * seg] @ a[k * r : (k + 1) * r]
        )
    return delta


def lora_merged_weight(weight, lora_a, lora_b, scale, *, fan_in_fan_out=False, enable_lora=None):
    """weight + ΔW in weight's stored layout: (OUT, IN), or (IN, OUT) with fan_in_fan_out."""
    w = _f64(weight)
    out_features = w.shape[1] if fan_in_fan_out else w.shape[0]
    delta = lora_delta(lora_a, lora_b, scale, out_features, enable_lora=enable_lora)
    return w + (delta.T if fan_in_fan_out else delta)


# ---------------------------------------------------------------------------------------------
# LoRA embedding (loralib Embedding)
# ---------------------------------------------------------------------------------------------


def lora_embedding_forward(indices, weight, lora_a, lora_b, scale):
    """y[n] = W[idx[n]] + s · Aᵀ[idx[n]]·Bᵀ.

    indices (...) integers in [0, V); weight (V, D); lora_a (R, V); lora_b (D, R).
    Returns y (..., D). padding_idx does not change the forward value.
    """
    idx = np.asarray(indices)
    flat = idx.reshape(-1)
    w, a, b = _f64(weight), _f64(lora_a), _f64(lora_b)
    y = w[flat] + scale * (a.T[flat] @ b.T)
    return y.reshape(idx.shape + (w.shape[1],))


def lora_embedding_backward(grad_out, indices, lora_a, lora_b, scale, *, padding_idx=None):
    """Gradients for upstream grad_out (..., D); rows whose index is padding_idx give nothing to
    lora_a and weight (torch's padding_idx semantics) but do count for lora_b.

      lora_a (R, V):  column idx[n] += s · (g[n]·B)ᵀ
      lora_b (D, R):  s · gᵀ·Aᵀ[idx]
      weight (V, D):  row idx[n] += g[n]
    Returns a dict with those keys.
    """
    flat = np.asarray(indices).reshape(-1)
    a, b = _f64(lora_a), _f64(lora_b)
    g = _f64(grad_out).reshape(flat.size, b.shape[0])
    keep = np.ones(flat.size, dtype=bool) if padding_idx is None else flat != padding_idx
    grad_a_t = np.zeros((a.shape[1], a.shape[0]))
    np.add.at(grad_a_t, flat[keep], scale * (g[keep] @ b))
    grad_w = np.zeros((a.shape[1], b.shape[0]))
    np.add.at(grad_w, flat[keep], g[keep])
    return {"lora_a": grad_a_t.T, "lora_b": scale * (g.T @ a.T[flat]), "weight": grad_w}


def lora_embedding_merged_weight(weight, lora_a, lora_b, scale):
    """weight (V, D) + (s · B·A)ᵀ."""
    return _f64(weight) + scale * (_f64(lora_b) @ _f64(lora_a)).T


# ---------------------------------------------------------------------------------------------
# IA3 (peft): output scaling, input scaling (feedforward), embedding
# ---------------------------------------------------------------------------------------------


def ia3_linear_forward(x, weight, bias, ia3_l, *, feedforward=False, fan_in_fan_out=False):
    """Output scaling: y = (x·Wᵀ + b) ⊙ l, l with OUT entries; also returns base = x·Wᵀ + b.
    Input scaling (feedforward): y = (x ⊙ l)·Wᵀ + b, l with IN entries; base is None.

    x (..., IN); weight (OUT, IN) or (IN, OUT) with fan_in_fan_out; bias (OUT,) or None;
    ia3_l of shape (n,), (n, 1) or (1, n). Returns (y (..., OUT), base (..., OUT) or None).
    """
    x = _f64(x)
    w = _logical_weight(weight, fan_in_fan_out)
    l = _f64(ia3_l).reshape(-1)
    b = 0.0 if bias is None else _f64(bias)
    if feedforward:
        return (x * l) @ w.T + b, None
    base = x @ w.T + b
    return base * l, base


def ia3_linear_backward(
    grad_out, x, weight, bias, ia3_l, *, feedforward=False, fan_in_fan_out=False
):
    """Gradients for upstream grad_out (..., OUT) (x (..., IN) as in the forward):

    output scaling: x = (g ⊙ l)·W;  ia3_l = Σ_rows g ⊙ (x·Wᵀ + b);  bias = Σ_rows g ⊙ l;
                    weight = (g ⊙ l)ᵀ·x
    input scaling:  x = (g·W) ⊙ l;  ia3_l = Σ_rows x ⊙ (g·W);  bias = Σ_rows g;
                    weight = gᵀ·(x ⊙ l)
    weight's gradient is in the stored layout, ia3_l's has ia3_l's shape. Returns a dict.
    """
    w = _logical_weight(weight, fan_in_fan_out)
    out_features, in_features = w.shape
    xm = _f64(x).reshape(-1, in_features)
    g = _f64(grad_out).reshape(-1, out_features)
    l = _f64(ia3_l).reshape(-1)
    if feedforward:
        gw = g @ w
        grad = {
            "x": gw * l,
            "ia3_l": (xm * gw).sum(axis=0),
            "bias": g.sum(axis=0),
            "weight": g.T @ (xm * l),
        }
    else:
        b = 0.0 if bias is None else _f64(bias)
        gl = g * l
        grad = {
            "x": gl @ w,
            "ia3_l": (g * (xm @ w.T + b)).sum(axis=0),
            "bias": gl.sum(axis=0),
            "weight": gl.T @ xm,
        }
    grad["x"] = grad["x"].reshape(np.shape(x))
    grad["ia3_l"] = grad["ia3_l"].reshape(np.shape(ia3_l))
    if fan_in_fan_out:
        grad["weight"] = grad["weight"].T
    return grad


def ia3_embedding_forward(indices, weight, ia3_l):
    """y[n] = W[idx[n]] ⊙ l.  indices (...); weight (V, D); ia3_l with D entries. y (..., D)."""
    idx = np.asarray(indices)
    return _f64(weight)[idx.reshape(-1)].reshape(idx.shape + (np.shape(weight)[1],)) * _f64(
        ia3_l
    ).reshape(-1)


def ia3_embedding_backward(grad_out, indices, weight, ia3_l, *, padding_idx=None):
    """ia3_l (its own shape) = Σ_n g[n] ⊙ W[idx[n]] over all rows;
    weight (V, D): row idx[n] += g[n] ⊙ l, skipping rows at padding_idx. Returns a dict."""
    flat = np.asarray(indices).reshape(-1)
    w = _f64(weight)
    l = _f64(ia3_l).reshape(-1)
    g = _f64(grad_out).reshape(flat.size, w.shape[1])
    keep = np.ones(flat.size, dtype=bool) if padding_idx is None else flat != padding_idx
    grad_w = np.zeros_like(w)
    np.add.at(grad_w, flat[keep], g[keep] * l)
    return {"ia3_l": (g * w[flat]).sum(axis=0).reshape(np.shape(ia3_l)), "weight": grad_w}


def ia3_merged(weight, ia3_l, *, bias=None, feedforward=False, fan_in_fan_out=False):
    """Merged (weight, bias) in their stored layouts: output scaling multiplies row o of the
    logical (OUT, IN) weight and bias[o] by l[o]; input scaling multiplies column i by l[i] and
    leaves the bias alone."""
    w = _f64(weight)
    l = _f64(ia3_l).reshape(-1)
    scale_logical_rows = not feedforward
    scale_stored_rows = scale_logical_rows != fan_in_fan_out
    merged_w = w * (l[:, None] if scale_stored_rows else l[None, :])
    merged_b = None
    if bias is not None:
        merged_b = _f64(bias) * l if scale_logical_rows else _f64(bias)
    return merged_w, merged_b


def ia3_embedding_merged_weight(weight, ia3_l):
    """weight (V, D) with column d scaled by l[d]."""
    return _f64(weight) * _f64(ia3_l).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Dropout mask: Philox4x32-10 counter scheme of csrc/include/cpeft/core.h
# ---------------------------------------------------------------------------------------------

_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter_lo, counter_hi, seed):
    """Philox4x32-10 of 128-bit counters (counter_lo, counter_hi, 0, 0) under key = seed
    (low word, high word). counter_* are uint64 arrays of 32-bit values. Returns 4 uint64 arrays."""
    c0 = np.asarray(counter_lo, dtype=np.uint64)
    c1 = np.asarray(counter_hi, dtype=np.uint64)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        n0 = (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0)
        n2 = (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1)
        c0, c1, c2, c3 = n0, p1 & _MASK32, n2, p0 & _MASK32
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def dropout_mask(shape, p, seed, offset=0, dtype=np.float32):
    """Mask of the given shape (..., IN): element number c of its row-major flattening uses
    counter offset + c, drawn as uniform = (lane >> 8) * 2^-24 from Philox block counter // 4,
    lane counter % 4; kept (value 1/(1-p) in dtype) when uniform >= float32(p), else 0."""
    n = int(np.prod(shape, dtype=np.int64))
    counters = np.uint64(offset) + np.arange(n, dtype=np.uint64)
    block = counters >> np.uint64(2)
    lanes = philox4x32_10(block & _MASK32, block >> np.uint64(32), int(seed))
    lane_of = (counters & np.uint64(3)).astype(np.intp)
    bits = np.choose(lane_of, lanes) if n else np.zeros(0, dtype=np.uint64)
    uniform = (bits >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    keep = uniform >= np.float32(p)
    keep_scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return np.where(keep, keep_scale, 0.0).astype(dtype).reshape(shape)
