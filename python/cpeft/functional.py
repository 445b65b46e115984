"""cpeft's framework-free API: LoRA and IA3 forward, backward and merge on NumPy arrays, torch
tensors, CuPy arrays, or anything else that speaks DLPack.

Every function validates its arguments once in C and raises ``TypeError`` (wrong kind of object),
``ValueError`` (shape, dtype, value, layout, aliasing), ``IndexError`` (embedding index out of
range), ``BufferError`` (DLPack export), ``cpeft.CudaError`` or ``RuntimeError``; messages name the
argument.

Dtypes: on the CPU float32 or float64; on CUDA also float16 and bfloat16. All float tensors of one
call share one dtype, with one exception: on CUDA, ``lora_linear_forward`` / ``_backward`` take
float32 ``lora_a`` and ``lora_b`` (and then return float32 gradients for them) beside float16 or
bfloat16 activations and weight (peft's float32 adapters on a 16-bit model; the products use
16-bit copies of A and B with fp32 accumulation). ``indices`` are int32 or int64. Leading dimensions ``...`` of activations are
flattened into M rows (they must collapse to one stride; CPU inputs that do not are copied).

Outputs: an output argument may be an array to write in place (it must already have the exact
shape, dtype and device, be writeable, have a BLAS-able layout and share no memory with any
input), ``True`` to allocate one, or ``None``/``False`` where the output is optional and not
wanted. Allocation uses the inputs' own framework (``x.new_empty`` for torch, ``cupy.empty`` for
CuPy, NumPy for NumPy), so importing cpeft never imports torch. Torch tensors that require grad
are detached (zero-copy) before crossing into C.

``stream`` is an int CUDA stream handle used for CUDA tensors (``None`` or 0: the legacy default
stream); the caller's pending work on the tensors is ordered before it through DLPack.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from . import _C

__all__ = [
    "LoraLinearGrads",
    "LoraEmbeddingGrads",
    "IA3LinearGrads",
    "IA3EmbeddingGrads",
    "MergeRecord",
    "lora_linear_forward",
    "lora_linear_backward",
    "lora_embedding_forward",
    "lora_embedding_backward",
    "ia3_linear_forward",
    "ia3_linear_backward",
    "ia3_embedding_forward",
    "ia3_embedding_backward",
    "lora_merge",
    "lora_unmerge",
    "lora_embedding_merge",
    "lora_embedding_unmerge",
    "ia3_merge",
    "ia3_unmerge",
    "ia3_embedding_merge",
    "ia3_embedding_unmerge",
    "dropout_mask",
    "lora_grouped_forward",
    "lora_grouped_backward",
    "DoraLinearGrads",
    "DoraEmbeddingGrads",
    "dora_weight_sq_norm",
    "dora_weight_norm",
    "dora_linear_forward",
    "dora_linear_backward",
    "dora_embedding_forward",
    "dora_embedding_backward",
]


class LoraLinearGrads(NamedTuple):
    """Gradients of lora_linear_forward; None where not requested."""

    x: Any
    lora_a: Any
    lora_b: Any
    bias: Any
    weight: Any


class LoraEmbeddingGrads(NamedTuple):
    """Gradients of lora_embedding_forward; None where not requested."""

    lora_a: Any
    lora_b: Any
    weight: Any


class IA3LinearGrads(NamedTuple):
    """Gradients of ia3_linear_forward; None where not requested."""

    x: Any
    ia3_l: Any
    bias: Any
    weight: Any


class IA3EmbeddingGrads(NamedTuple):
    """Gradients of ia3_embedding_forward; None where not requested."""

    ia3_l: Any
    weight: Any


class DoraLinearGrads(NamedTuple):
    """Gradients of dora_linear_forward; None where not requested."""

    x: Any
    lora_a: Any
    lora_b: Any
    magnitude: Any
    bias: Any


class DoraEmbeddingGrads(NamedTuple):
    """Gradients of dora_embedding_forward; None where not requested."""

    lora_a: Any
    lora_b: Any
    magnitude: Any


class MergeRecord(NamedTuple):
    """What an exact unmerge needs besides the adapter: ``index`` (int64, (n,)) linear indices
    into the merged tensor's logical 2-D view of the elements whose merge/unmerge round trip
    would not restore them bit for bit, and ``value`` (the weight's dtype, (n,)) their original
    values. Same framework and device as the weight; usually a tiny fraction of its size."""

    index: Any
    value: Any


# ---- framework plumbing (no framework is imported here: torch/CuPy are found in sys.modules
# through the tensors the caller passed, which proves they are already imported) ---------------


def _framework(obj) -> str:
    return type(obj).__module__.split(".", 1)[0]


def _detached(obj):
    """Torch refuses to export tensors that require grad; detach() is a zero-copy alias."""
    if _framework(obj) == "torch" and getattr(obj, "requires_grad", False):
        return obj.detach()
    return obj


def _c_allocates(ref) -> bool:
    """Whether True is left for C to resolve: NumPy inputs get NumPy outputs there, and objects of
    unknown frameworks (raw capsules, JAX) get C's error explaining that an output is needed."""
    return _framework(ref) not in ("torch", "cupy")


def _empty(ref, shape, dtype=None):
    """A new uninitialized array of ref's framework and device; dtype None means ref's dtype,
    "int64" the framework's int64."""
    framework = _framework(ref)
    if framework == "torch":
        torch = sys.modules["torch"]
        return ref.new_empty(tuple(shape), dtype=torch.int64 if dtype == "int64" else ref.dtype)
    cupy = sys.modules["cupy"]
    with ref.device:
        return cupy.empty(tuple(shape), dtype=dtype or ref.dtype)


def _output(request, ref, shape_fn, required=False):
    """Resolve an output argument: True (or None when required) becomes an array of ref's
    framework for torch/CuPy; everything else is passed on for C to check or allocate."""
    wants_new = request is True or (request is None and required)
    if not wants_new or _c_allocates(ref):
        return True if wants_new else request
    try:
        shape = shape_fn()
    except (AttributeError, IndexError, TypeError):
        return True  # malformed inputs: C reports them before it looks at the outputs
    return _empty(ref, shape)


def _out_features(weight, fan_in_fan_out):
    """OUT of a linear weight stored (OUT, IN), or (IN, OUT) with ``fan_in_fan_out``: the one
    place Python reads it, to size outputs (the C boundary checks every shape it is given)."""
    return weight.shape[1] if fan_in_fan_out else weight.shape[0]


def _record(record, name):
    if not (isinstance(record, tuple) and len(record) == 2):
        raise TypeError(
            f"{name} must be the MergeRecord(index, value) returned by the merge, "
            f"got {type(record).__name__}"
        )
    return _detached(record[0]), _detached(record[1])


def _new_record(weight, count):
    return _empty(weight, (count,), "int64"), _empty(weight, (count,))


# ---- LoRA linear -----------------------------------------------------------------------------


def lora_linear_forward(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    enable_lora: Optional[Sequence[bool]] = None,
    dropout: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    out=None,
    out_xa=None,
    stream=None,
):
    """LoRA linear forward (loralib ``Linear``; ``MergedLinear`` with ``enable_lora``).

    ``y = x·Wᵀ + bias + scale · scatter_K(drop(x)·A_kᵀ·B_kᵀ)``, with ``xa = drop(x)·Aᵀ`` kept for
    the backward pass. No dense ΔW is formed.

    Args:
        x: (..., IN) float.
        weight: (OUT, IN), or (IN, OUT) when ``fan_in_fan_out`` (transformers' Conv1D layout).
        bias: (OUT,) or None.
        lora_a: (R*K, IN), K the number of enabled groups (1 for plain LoRA).
        lora_b: (OUT/G*K, R), G = len(enable_lora) (1 for plain LoRA).
        scale: finite float, usually lora_alpha / r.
        enable_lora: None, or G bools (G divides OUT, at most 64, at least one True): output
            block g of OUT/G rows carries an adapter when enable_lora[g].
        dropout: probability p in [0, 1] of dropping an element of x on the LoRA branch; the mask
            is Philox(seed) at counter offset + m*IN + i (see ``dropout_mask``).
        seed, offset: ints >= 0.
        out: (..., OUT) = x.shape[:-1] + (OUT,), x's dtype; None/True allocates.
        out_xa: (..., R*K), x's dtype; None/True allocates.

    Returns:
        (y, xa): y (..., OUT) and xa (..., R*K), both x's dtype.
    """
    x, weight, bias, lora_a, lora_b = map(_detached, (x, weight, bias, lora_a, lora_b))
    out = _output(
        out, x, lambda: x.shape[:-1] + (_out_features(weight, fan_in_fan_out),), required=True
    )
    out_xa = _output(out_xa, x, lambda: x.shape[:-1] + (lora_a.shape[0],), required=True)
    return _C.lora_linear_forward(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        enable_lora=enable_lora,
        dropout=dropout,
        seed=seed,
        offset=offset,
        out=out,
        out_xa=out_xa,
        stream=stream,
    )


def lora_linear_backward(
    grad_out,
    x,
    weight,
    lora_a,
    lora_b,
    xa,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    enable_lora: Optional[Sequence[bool]] = None,
    dropout: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    grad_x=True,
    grad_lora_a=True,
    grad_lora_b=True,
    grad_bias=False,
    grad_weight=False,
    stream=None,
) -> LoraLinearGrads:
    """Gradients of ``lora_linear_forward`` (same weight layout, groups, dropout, seed, offset).

    Args:
        grad_out: (..., OUT) = x.shape[:-1] + (OUT,), x's dtype.
        x: (..., IN), the forward's input.
        weight, lora_a, lora_b, scale, fan_in_fan_out, enable_lora, dropout, seed, offset: as in
            the forward.
        xa: (..., R*K), the forward's second result.
        grad_x: (..., IN) | True | False/None.
        grad_lora_a: (R*K, IN) | True | False/None.
        grad_lora_b: (OUT/G*K, R) | True | False/None.
        grad_bias: (OUT,) | True | False/None.
        grad_weight: weight's stored shape ((IN, OUT) with fan_in_fan_out) | True | False/None.
        grad_lora_a and grad_lora_b have lora_a's dtype, the others x's; all are overwritten,
        not accumulated into.

    Returns:
        LoraLinearGrads(x, lora_a, lora_b, bias, weight), None where not requested.
    """
    grad_out, x, weight, lora_a, lora_b, xa = map(
        _detached, (grad_out, x, weight, lora_a, lora_b, xa)
    )
    grads = _C.lora_linear_backward(
        grad_out,
        x,
        weight,
        lora_a,
        lora_b,
        xa,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        enable_lora=enable_lora,
        dropout=dropout,
        seed=seed,
        offset=offset,
        grad_x=_output(grad_x, x, lambda: x.shape),
        grad_lora_a=_output(grad_lora_a, lora_a, lambda: lora_a.shape),
        grad_lora_b=_output(grad_lora_b, lora_b, lambda: lora_b.shape),
        grad_bias=_output(grad_bias, x, lambda: (_out_features(weight, fan_in_fan_out),)),
        grad_weight=_output(grad_weight, x, lambda: weight.shape),
        stream=stream,
    )
    return LoraLinearGrads(*grads)


# ---- LoRA linear over mixed-adapter batches -----------------------------------------------------


def _grouped_r_max(ranks, lora_a) -> int:
    """max(ranks), only to size out_xa, kept within what valid ranks allow ([1, lora_a.shape[0]],
    or 0): a bad rank (negative, or past the packed rank) then reaches C, which names it, instead
    of failing in the allocation with the framework's own error."""
    try:
        r_max = max(int(r) for r in ranks)
        packed = int(lora_a.shape[0])
    except (TypeError, ValueError, AttributeError, IndexError):
        return 0  # malformed ranks or lora_a: C reports them before it looks at the outputs
    return min(max(r_max, 0), packed)


def lora_grouped_forward(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    index,
    ranks: Sequence[int],
    scales: Sequence[float],
    *,
    fan_in_fan_out: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    out=None,
    out_xa=None,
    stream=None,
):
    """LoRA linear where each row uses its own adapter (peft's mixed-adapter batches), every
    adapter of the layer in one call: ``y[m] = x[m]·Wᵀ + bias + s_g · drop(x[m])·A_gᵀ·B_gᵀ`` with
    ``g = index[m]`` (-1: the base layer only). Rows are grouped by adapter inside the call, so
    each adapter costs one pair of GEMMs over its own rows, in any row order.

    Args:
        x: (..., IN) float.
        weight: (OUT, IN), or (IN, OUT) with ``fan_in_fan_out``.
        bias: (OUT,) or None.
        lora_a: (ΣR, IN), the A_g stacked (rows [off_g, off_g + R_g)).
        lora_b: (OUT, ΣR), the B_g side by side (columns [off_g, off_g + R_g)).
        index: int32/int64 with one entry per row of x (x.shape[:-1] or flat), in [-1, G).
        ranks: G ints R_g >= 1 summing to ΣR; scales: G finite floats s_g.
        dropout, seed, offset: as in ``lora_linear_forward`` (one probability for all adapters).
        out: (..., OUT); out_xa: (..., max(ranks)); None/True allocates.

    Returns:
        (y, xa): xa[m, :R_g] = drop(x[m])·A_gᵀ (unscaled), zero elsewhere; kept for backward.
    """
    x, weight, bias, lora_a, lora_b, index = map(
        _detached, (x, weight, bias, lora_a, lora_b, index)
    )
    out = _output(
        out, x, lambda: x.shape[:-1] + (_out_features(weight, fan_in_fan_out),), required=True
    )
    out_xa = _output(
        out_xa, x, lambda: x.shape[:-1] + (_grouped_r_max(ranks, lora_a),), required=True
    )
    return _C.lora_grouped_forward(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        index,
        ranks,
        scales,
        fan_in_fan_out=fan_in_fan_out,
        dropout=dropout,
        seed=seed,
        offset=offset,
        out=out,
        out_xa=out_xa,
        stream=stream,
    )


def lora_grouped_backward(
    grad_out,
    x,
    weight,
    lora_a,
    lora_b,
    xa,
    index,
    ranks: Sequence[int],
    scales: Sequence[float],
    *,
    fan_in_fan_out: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    grad_x=True,
    grad_lora_a=True,
    grad_lora_b=True,
    grad_bias=False,
    grad_weight=False,
    stream=None,
) -> LoraLinearGrads:
    """Gradients of ``lora_grouped_forward`` (same arguments; ``xa`` its second result), as
    LoraLinearGrads(x, lora_a, lora_b, bias, weight): grad_lora_a (ΣR, IN) and grad_lora_b
    (OUT, ΣR) are packed like the adapters, zero for adapters without rows in the batch. All
    gradients are overwritten, not accumulated into."""
    grad_out, x, weight, lora_a, lora_b, xa, index = map(
        _detached, (grad_out, x, weight, lora_a, lora_b, xa, index)
    )
    grads = _C.lora_grouped_backward(
        grad_out,
        x,
        weight,
        lora_a,
        lora_b,
        xa,
        index,
        ranks,
        scales,
        fan_in_fan_out=fan_in_fan_out,
        dropout=dropout,
        seed=seed,
        offset=offset,
        grad_x=_output(grad_x, x, lambda: x.shape),
        grad_lora_a=_output(grad_lora_a, x, lambda: lora_a.shape),
        grad_lora_b=_output(grad_lora_b, x, lambda: lora_b.shape),
        grad_bias=_output(grad_bias, x, lambda: (_out_features(weight, fan_in_fan_out),)),
        grad_weight=_output(grad_weight, x, lambda: weight.shape),
        stream=stream,
    )
    return LoraLinearGrads(*grads)


# ---- LoRA embedding --------------------------------------------------------------------------


def lora_embedding_forward(
    indices,
    weight,
    lora_a,
    lora_b,
    scale: float,
    *,
    padding_idx: Optional[int] = None,
    out=None,
    stream=None,
):
    """LoRA embedding forward (loralib ``Embedding``):
    ``y[n] = weight[indices[n]] + scale · (lora_a[:, indices[n]]ᵀ·lora_bᵀ)``.

    Args:
        indices: (...) int32 or int64, every value in [0, V).
        weight: (V, D) float.
        lora_a: (R, V); lora_b: (D, R); weight's dtype.
        scale: finite float.
        padding_idx: None or an int in [-V, V); only affects the backward pass.
        out: (..., D) = indices.shape + (D,), weight's dtype; None/True allocates.

    Returns:
        y (..., D), weight's dtype.
    """
    weight, lora_a, lora_b = map(_detached, (weight, lora_a, lora_b))
    out = _output(out, weight, lambda: tuple(indices.shape) + (weight.shape[1],), required=True)
    return _C.lora_embedding_forward(
        indices, weight, lora_a, lora_b, scale, padding_idx=padding_idx, out=out, stream=stream
    )


def lora_embedding_backward(
    grad_out,
    indices,
    lora_a,
    lora_b,
    scale: float,
    *,
    padding_idx: Optional[int] = None,
    grad_lora_a=True,
    grad_lora_b=True,
    grad_weight=False,
    stream=None,
) -> LoraEmbeddingGrads:
    """Gradients of ``lora_embedding_forward``. Rows whose index equals padding_idx contribute
    nothing to grad_lora_a and grad_weight (torch's padding_idx semantics).

    Args:
        grad_out: (..., D) = indices.shape + (D,), lora_a's dtype.
        indices: (...) int32 or int64 in [0, V).
        lora_a: (R, V); lora_b: (D, R).
        grad_lora_a: (R, V) | True | False/None.
        grad_lora_b: (D, R) | True | False/None.
        grad_weight: (V, D) | True | False/None.

    Returns:
        LoraEmbeddingGrads(lora_a, lora_b, weight), None where not requested.
    """
    grad_out, lora_a, lora_b = map(_detached, (grad_out, lora_a, lora_b))
    grads = _C.lora_embedding_backward(
        grad_out,
        indices,
        lora_a,
        lora_b,
        scale,
        padding_idx=padding_idx,
        grad_lora_a=_output(grad_lora_a, lora_a, lambda: lora_a.shape),
        grad_lora_b=_output(grad_lora_b, lora_a, lambda: lora_b.shape),
        grad_weight=_output(grad_weight, lora_a, lambda: (lora_a.shape[1], lora_b.shape[0])),
        stream=stream,
    )
    return LoraEmbeddingGrads(*grads)


# ---- IA3 -------------------------------------------------------------------------------------


def ia3_linear_forward(
    x,
    weight,
    bias,
    ia3_l,
    *,
    feedforward: bool = False,
    fan_in_fan_out: bool = False,
    keep_base: bool = False,
    out=None,
    out_base=None,
    stream=None,
):
    """IA3 linear forward (peft ``IA3`` Linear).

    Output scaling: ``y = (x·Wᵀ + bias) ⊙ l``; input scaling (``feedforward``):
    ``y = (x ⊙ l)·Wᵀ + bias``.

    Args:
        x: (..., IN) float.
        weight: (OUT, IN), or (IN, OUT) when ``fan_in_fan_out``.
        bias: (OUT,) or None.
        ia3_l: OUT entries (IN with feedforward) in shape (n,), (n, 1) or (1, n).
        keep_base: with output scaling, also return ``base = x·Wᵀ + bias`` (needed by the
            backward pass for the gradient of l).
        out: (..., OUT), x's dtype; None/True allocates.
        out_base: (..., OUT) to write base into (implies keep_base), or None.

    Returns:
        (y, base): y (..., OUT); base (..., OUT) or None.
    """
    x, weight, bias, ia3_l = map(_detached, (x, weight, bias, ia3_l))

    def y_shape():
        return x.shape[:-1] + (_out_features(weight, fan_in_fan_out),)

    out = _output(out, x, y_shape, required=True)
    if out_base is True or (out_base is None and keep_base and not feedforward):
        out_base = _output(True, x, y_shape)
    return _C.ia3_linear_forward(
        x,
        weight,
        bias,
        ia3_l,
        feedforward=feedforward,
        fan_in_fan_out=fan_in_fan_out,
        keep_base=keep_base,
        out=out,
        out_base=out_base,
        stream=stream,
    )


def ia3_linear_backward(
    grad_out,
    x,
    weight,
    ia3_l,
    base,
    *,
    feedforward: bool = False,
    fan_in_fan_out: bool = False,
    grad_x=True,
    grad_ia3_l=True,
    grad_bias=False,
    grad_weight=False,
    stream=None,
) -> IA3LinearGrads:
    """Gradients of ``ia3_linear_forward``.

    Args:
        grad_out: (..., OUT), x's dtype.
        x: (..., IN); weight, ia3_l, feedforward, fan_in_fan_out: as in the forward.
        base: (..., OUT) from the forward with keep_base=True; required for grad_ia3_l with
            output scaling, else may be None.
        grad_x: (..., IN) | True | False/None.
        grad_ia3_l: ia3_l's shape | True | False/None.
        grad_bias: (OUT,) | True | False/None.
        grad_weight: weight's stored shape | True | False/None.

    Returns:
        IA3LinearGrads(x, ia3_l, bias, weight), None where not requested.
    """
    grad_out, x, weight, ia3_l, base = map(_detached, (grad_out, x, weight, ia3_l, base))
    grads = _C.ia3_linear_backward(
        grad_out,
        x,
        weight,
        ia3_l,
        base,
        feedforward=feedforward,
        fan_in_fan_out=fan_in_fan_out,
        grad_x=_output(grad_x, x, lambda: x.shape),
        grad_ia3_l=_output(grad_ia3_l, x, lambda: ia3_l.shape),
        grad_bias=_output(grad_bias, x, lambda: (_out_features(weight, fan_in_fan_out),)),
        grad_weight=_output(grad_weight, x, lambda: weight.shape),
        stream=stream,
    )
    return IA3LinearGrads(*grads)


def ia3_embedding_forward(indices, weight, ia3_l, *, out=None, stream=None):
    """IA3 embedding forward: ``y[n] = weight[indices[n]] ⊙ l``.

    Args:
        indices: (...) int32 or int64 in [0, V).
        weight: (V, D) float.
        ia3_l: D entries in shape (D,), (D, 1) or (1, D), weight's dtype.
        out: (..., D) = indices.shape + (D,); None/True allocates.

    Returns:
        y (..., D), weight's dtype.
    """
    weight, ia3_l = _detached(weight), _detached(ia3_l)
    out = _output(out, weight, lambda: tuple(indices.shape) + (weight.shape[1],), required=True)
    return _C.ia3_embedding_forward(indices, weight, ia3_l, out=out, stream=stream)


def ia3_embedding_backward(
    grad_out,
    indices,
    weight,
    ia3_l,
    *,
    padding_idx: Optional[int] = None,
    grad_ia3_l=True,
    grad_weight=False,
    stream=None,
) -> IA3EmbeddingGrads:
    """Gradients of ``ia3_embedding_forward``; rows at padding_idx are skipped for grad_weight.

    Args:
        grad_out: (..., D) = indices.shape + (D,), weight's dtype.
        indices, weight, ia3_l: as in the forward.
        padding_idx: None or an int in [-V, V).
        grad_ia3_l: ia3_l's shape | True | False/None.
        grad_weight: (V, D) | True | False/None.

    Returns:
        IA3EmbeddingGrads(ia3_l, weight), None where not requested.
    """
    grad_out, weight, ia3_l = map(_detached, (grad_out, weight, ia3_l))
    grads = _C.ia3_embedding_backward(
        grad_out,
        indices,
        weight,
        ia3_l,
        padding_idx=padding_idx,
        grad_ia3_l=_output(grad_ia3_l, weight, lambda: ia3_l.shape),
        grad_weight=_output(grad_weight, weight, lambda: weight.shape),
        stream=stream,
    )
    return IA3EmbeddingGrads(*grads)


# ---- merges ----------------------------------------------------------------------------------
# NumPy weights: one C call counts, allocates the record and merges. Other frameworks: a count
# pass, the record allocated with the weight's framework, then the merge. A LoRA merge also
# passes a weight-sized scratch that keeps ΔW from the count pass for the merge, so its GEMMs run
# once (merges are not a hot path: the temporary is worth the two GEMMs it saves).


# The dtype each float dtype accumulates in, as the C core defines it (cpeft_acc_dtype).
_ACCUMULATION_DTYPES = _C.accumulation_dtypes()


def _delta_scratch(weight):
    """ΔW's scratch for a LoRA merge: as many elements as the weight, in the dtype C computes ΔW
    in (the weight's accumulation dtype; C checks it)."""
    if _framework(weight) == "torch":
        torch = sys.modules["torch"]
        name = str(weight.dtype).removeprefix("torch.")
        dtype = getattr(torch, _ACCUMULATION_DTYPES.get(name, name))
        return weight.new_empty((weight.numel(),), dtype=dtype)
    cupy = sys.modules["cupy"]
    with weight.device:
        name = weight.dtype.name
        return cupy.empty((weight.size,), dtype=_ACCUMULATION_DTYPES.get(name, name))


def _merge(entry, weight, args, kwargs, computes_delta=False):
    if _c_allocates(weight):
        return MergeRecord(*entry(weight, *args, **kwargs))
    if computes_delta:
        kwargs = dict(kwargs, delta=_delta_scratch(weight))
    count = entry(weight, *args, count_only=True, **kwargs)
    index, value = _new_record(weight, count)
    return MergeRecord(*entry(weight, *args, index=index, value=value, **kwargs))


def lora_merge(
    weight,
    lora_a,
    lora_b,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    enable_lora: Optional[Sequence[bool]] = None,
    stream=None,
) -> MergeRecord:
    """Merge a LoRA adapter into its weight in place: ``W_view += scale · B_k·A_k`` on each
    enabled output group, where W_view is the weight's (OUT, IN) view.

    Args:
        weight: (OUT, IN), or (IN, OUT) with fan_in_fan_out; float; written in place.
        lora_a: (R*K, IN); lora_b: (OUT/G*K, R); scale, enable_lora: as in the forward.

    Returns:
        MergeRecord(index, value) for ``lora_unmerge``; index into the (OUT, IN) view.
    """
    weight, lora_a, lora_b = map(_detached, (weight, lora_a, lora_b))
    return _merge(
        _C.lora_merge,
        weight,
        (lora_a, lora_b, scale),
        dict(fan_in_fan_out=fan_in_fan_out, enable_lora=enable_lora, stream=stream),
        computes_delta=True,
    )


def lora_unmerge(
    weight,
    lora_a,
    lora_b,
    scale: float,
    record: MergeRecord,
    *,
    fan_in_fan_out: bool = False,
    enable_lora: Optional[Sequence[bool]] = None,
    stream=None,
) -> None:
    """Undo ``lora_merge`` in place, restoring the weight bit for bit (the adapter must be the
    one that was merged)."""
    weight, lora_a, lora_b = map(_detached, (weight, lora_a, lora_b))
    index, value = _record(record, "record")
    _C.lora_unmerge(
        weight,
        lora_a,
        lora_b,
        scale,
        index,
        value,
        fan_in_fan_out=fan_in_fan_out,
        enable_lora=enable_lora,
        stream=stream,
    )


def lora_embedding_merge(weight, lora_a, lora_b, scale: float, *, stream=None) -> MergeRecord:
    """Merge a LoRA embedding adapter in place: ``weight += scale · (B·A)ᵀ``.

    Args:
        weight: (V, D) float, written in place; lora_a: (R, V); lora_b: (D, R).

    Returns:
        MergeRecord(index, value); index into the (D, V) view.
    """
    weight, lora_a, lora_b = map(_detached, (weight, lora_a, lora_b))
    return _merge(
        _C.lora_embedding_merge,
        weight,
        (lora_a, lora_b, scale),
        dict(stream=stream),
        computes_delta=True,
    )


def lora_embedding_unmerge(
    weight, lora_a, lora_b, scale: float, record: MergeRecord, *, stream=None
) -> None:
    """Undo ``lora_embedding_merge`` in place, bit for bit."""
    weight, lora_a, lora_b = map(_detached, (weight, lora_a, lora_b))
    index, value = _record(record, "record")
    _C.lora_embedding_unmerge(weight, lora_a, lora_b, scale, index, value, stream=stream)


def ia3_merge(
    weight,
    ia3_l,
    *,
    bias=None,
    feedforward: bool = False,
    fan_in_fan_out: bool = False,
    stream=None,
):
    """Merge IA3 scaling into the weight in place: rows of the (OUT, IN) view scaled by l
    (columns when ``feedforward``); with output scaling a given bias is scaled by l too
    (peft leaves feedforward biases alone).

    Args:
        weight: (OUT, IN), or (IN, OUT) with fan_in_fan_out; float; written in place.
        ia3_l: OUT entries (IN with feedforward) in shape (n,), (n, 1) or (1, n).
        bias: (OUT,) or None; written in place with output scaling.

    Returns:
        (weight's MergeRecord, bias's MergeRecord or None); indices into each tensor's own
        stored 2-D view, a bias as (1, OUT).
    """
    weight, ia3_l, bias = map(_detached, (weight, ia3_l, bias))
    kwargs = dict(bias=bias, feedforward=feedforward, fan_in_fan_out=fan_in_fan_out, stream=stream)
    if _c_allocates(weight):
        weight_record, bias_record = _C.ia3_merge(weight, ia3_l, **kwargs)
    else:
        counts = _C.ia3_merge(weight, ia3_l, count_only=True, **kwargs)
        index, value = _new_record(weight, counts[0])
        bias_index, bias_value = (
            (None, None) if counts[1] is None else _new_record(weight, counts[1])
        )
        weight_record, bias_record = _C.ia3_merge(
            weight,
            ia3_l,
            index=index,
            value=value,
            bias_index=bias_index,
            bias_value=bias_value,
            **kwargs,
        )
    return MergeRecord(*weight_record), None if bias_record is None else MergeRecord(*bias_record)


def ia3_unmerge(
    weight,
    ia3_l,
    records,
    *,
    bias=None,
    feedforward: bool = False,
    fan_in_fan_out: bool = False,
    stream=None,
) -> None:
    """Undo ``ia3_merge`` in place, bit for bit; ``records`` is what ia3_merge returned."""
    if not (isinstance(records, tuple) and len(records) == 2):
        raise TypeError(
            "records must be the (weight record, bias record or None) pair returned "
            f"by ia3_merge, got {type(records).__name__}"
        )
    weight, ia3_l, bias = map(_detached, (weight, ia3_l, bias))
    index, value = _record(records[0], "records[0]")
    bias_index = bias_value = None
    if bias is not None and not feedforward:
        if records[1] is None:
            raise ValueError(
                "records[1] must be the bias record of ia3_merge when bias is given "
                "with output scaling, got None"
            )
        bias_index, bias_value = _record(records[1], "records[1]")
    elif records[1] is not None:
        raise ValueError(
            "records[1] is a bias record, but no bias is unmerged (bias is None or "
            "feedforward=True)"
        )
    _C.ia3_unmerge(
        weight,
        ia3_l,
        index,
        value,
        bias=bias,
        bias_index=bias_index,
        bias_value=bias_value,
        feedforward=feedforward,
        fan_in_fan_out=fan_in_fan_out,
        stream=stream,
    )


def ia3_embedding_merge(weight, ia3_l, *, stream=None) -> MergeRecord:
    """Merge IA3 embedding scaling in place: ``weight (V, D) *= l`` along D.

    Returns:
        MergeRecord(index, value); index into the (V, D) view.
    """
    weight, ia3_l = _detached(weight), _detached(ia3_l)
    return _merge(_C.ia3_embedding_merge, weight, (ia3_l,), dict(stream=stream))


def ia3_embedding_unmerge(weight, ia3_l, record: MergeRecord, *, stream=None) -> None:
    """Undo ``ia3_embedding_merge`` in place, bit for bit."""
    weight, ia3_l = _detached(weight), _detached(ia3_l)
    index, value = _record(record, "record")
    _C.ia3_embedding_unmerge(weight, ia3_l, index, value, stream=stream)


# ---- DoRA ------------------------------------------------------------------------------------


def dora_weight_sq_norm(weight, *, fan_in_fan_out: bool = False, out=None, stream=None):
    """``‖w_j‖²`` for every row j of the weight's (OUT, IN) view (summed in double): the part of
    DoRA's row norms that changes only when the weight does, so a caller can keep it while the
    weight is frozen and pass it as ``weight_sq_norm``. An embedding weight (V, D) is normed per
    embedding dimension: pass ``fan_in_fan_out=True`` (its (D, V) view).

    Returns:
        (OUT,) in the weight's dtype; ``out`` None/True allocates.
    """
    weight = _detached(weight)
    out = _output(out, weight, lambda: (_out_features(weight, fan_in_fan_out),), required=True)
    return _C.dora_weight_sq_norm(weight, fan_in_fan_out=fan_in_fan_out, out=out, stream=stream)


def dora_weight_norm(
    weight,
    lora_a,
    lora_b,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    weight_sq_norm=None,
    out=None,
    stream=None,
):
    """DoRA's row norms ``n_j = ‖w_j + scale · lora_b[j]·lora_a‖`` of the (OUT, IN) view, from
    ``‖w_j‖² + 2s·b_j·(A·w_jᵀ) + s²·b_j·(A·Aᵀ)·b_jᵀ``: W + s·B·A is never formed.

    Args:
        weight: (OUT, IN), or (IN, OUT) with fan_in_fan_out.
        lora_a: (R, IN); lora_b: (OUT, R); scale: finite float.
        weight_sq_norm: None, or ``dora_weight_sq_norm(weight)`` (OUT,).

    Returns:
        (OUT,) in the weight's dtype.
    """
    weight, lora_a, lora_b, weight_sq_norm = map(
        _detached, (weight, lora_a, lora_b, weight_sq_norm)
    )
    out = _output(out, weight, lambda: (_out_features(weight, fan_in_fan_out),), required=True)
    return _C.dora_weight_norm(
        weight,
        lora_a,
        lora_b,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        weight_sq_norm=weight_sq_norm,
        out=out,
        stream=stream,
    )


def dora_linear_forward(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    magnitude,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    weight_sq_norm=None,
    keep_base: bool = False,
    out=None,
    out_xa=None,
    out_base=None,
    out_norm=None,
    stream=None,
):
    """DoRA linear forward with peft 0.21's semantics (``LoraConfig(use_dora=True)``).

    With ``n = dora_weight_norm(...)`` (a constant for backward, as peft detaches it),
    ``c = magnitude / n``, ``xd = drop(x)`` and ``xa = xd·Aᵀ``:

    * ``dropout == 0``: ``y = c ⊙ (x·Wᵀ + scale · xa·Bᵀ) + bias``
    * ``dropout > 0`` (peft in training): ``y = x·Wᵀ + bias + (c - 1) ⊙ (xd·Wᵀ) +
      c ⊙ scale · xa·Bᵀ``: peft's base layer sees x, its DoRA term the dropped input.

    Args:
        x: (..., IN) float.
        weight: (OUT, IN), or (IN, OUT) when ``fan_in_fan_out`` (transformers' Conv1D).
        bias: (OUT,) or None.
        lora_a: (R, IN); lora_b: (OUT, R); magnitude: (OUT,) (peft's lora_magnitude_vector).
        scale: finite float (lora_alpha / r, or / sqrt(r) with rsLoRA).
        dropout, seed, offset: as in ``lora_linear_forward``.
        weight_sq_norm: None or ``dora_weight_sq_norm(weight)``, to skip its pass over W.
        keep_base: also return ``base = xd·Wᵀ + scale · xa·Bᵀ`` (..., OUT), which the backward
            pass needs for the gradient of magnitude (the one output-sized tensor DoRA keeps).
        out, out_xa, out_base, out_norm: arrays to write, or None/True to allocate
            (out_base given implies keep_base).

    Returns:
        (y, xa, base or None, norm): y (..., OUT), xa (..., R), norm (OUT,).
    """
    x, weight, bias, lora_a, lora_b, magnitude, weight_sq_norm = map(
        _detached, (x, weight, bias, lora_a, lora_b, magnitude, weight_sq_norm)
    )

    def y_shape():
        return x.shape[:-1] + (_out_features(weight, fan_in_fan_out),)

    out = _output(out, x, y_shape, required=True)
    out_xa = _output(out_xa, x, lambda: x.shape[:-1] + (lora_a.shape[0],), required=True)
    if out_base is True or (out_base is None and keep_base):
        out_base = _output(True, x, y_shape)
    out_norm = _output(out_norm, x, lambda: (_out_features(weight, fan_in_fan_out),), required=True)
    return _C.dora_linear_forward(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        magnitude,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        dropout=dropout,
        seed=seed,
        offset=offset,
        weight_sq_norm=weight_sq_norm,
        out=out,
        out_xa=out_xa,
        out_base=out_base,
        out_norm=out_norm,
        stream=stream,
    )


def dora_linear_backward(
    grad_out,
    x,
    weight,
    lora_a,
    lora_b,
    magnitude,
    norm,
    xa,
    base,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    grad_x=True,
    grad_lora_a=True,
    grad_lora_b=True,
    grad_magnitude=True,
    grad_bias=False,
    stream=None,
) -> DoraLinearGrads:
    """Gradients of ``dora_linear_forward`` (the norm is a constant, as in peft).

    Args:
        grad_out: (..., OUT), x's dtype.
        x, weight, lora_a, lora_b, magnitude, scale, fan_in_fan_out, dropout, seed, offset: as
            in the forward.
        norm, xa, base: the forward's results; base may be None unless grad_magnitude is
            requested.
        grad_x: (..., IN) | True | False/None.
        grad_lora_a: (R, IN); grad_lora_b: (OUT, R); grad_magnitude: (OUT,);
        grad_bias: (OUT,); each an array, True or False/None.

    Returns:
        DoraLinearGrads(x, lora_a, lora_b, magnitude, bias), None where not requested.
    """
    grad_out, x, weight, lora_a, lora_b, magnitude, norm, xa, base = map(
        _detached, (grad_out, x, weight, lora_a, lora_b, magnitude, norm, xa, base)
    )
    grads = _C.dora_linear_backward(
        grad_out,
        x,
        weight,
        lora_a,
        lora_b,
        magnitude,
        norm,
        xa,
        base,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        dropout=dropout,
        seed=seed,
        offset=offset,
        grad_x=_output(grad_x, x, lambda: x.shape),
        grad_lora_a=_output(grad_lora_a, x, lambda: lora_a.shape),
        grad_lora_b=_output(grad_lora_b, x, lambda: lora_b.shape),
        grad_magnitude=_output(grad_magnitude, x, lambda: magnitude.shape),
        grad_bias=_output(grad_bias, x, lambda: (_out_features(weight, fan_in_fan_out),)),
        stream=stream,
    )
    return DoraLinearGrads(*grads)


def dora_embedding_forward(
    indices,
    weight,
    lora_a,
    lora_b,
    magnitude,
    scale: float,
    *,
    weight_sq_norm=None,
    out=None,
    out_norm=None,
    stream=None,
):
    """DoRA embedding forward with peft 0.21's semantics:
    ``y[n] = c ⊙ (weight[indices[n]] + scale · lora_a[:, indices[n]]ᵀ·lora_bᵀ)``, ``c =
    magnitude / norm``, ``norm[d] = ‖weight[:, d] + scale · (lora_b·lora_a)[d]‖`` (over the
    vocabulary).

    Args:
        indices: (...) int32 or int64 in [0, V).
        weight: (V, D); lora_a: (R, V); lora_b: (D, R); magnitude: (D,).
        weight_sq_norm: None or ``dora_weight_sq_norm(weight, fan_in_fan_out=True)`` (D,).

    Returns:
        (y, norm): y (..., D), norm (D,), the weight's dtype.
    """
    weight, lora_a, lora_b, magnitude, weight_sq_norm = map(
        _detached, (weight, lora_a, lora_b, magnitude, weight_sq_norm)
    )
    out = _output(out, weight, lambda: tuple(indices.shape) + (weight.shape[1],), required=True)
    out_norm = _output(out_norm, weight, lambda: (weight.shape[1],), required=True)
    return _C.dora_embedding_forward(
        indices,
        weight,
        lora_a,
        lora_b,
        magnitude,
        scale,
        weight_sq_norm=weight_sq_norm,
        out=out,
        out_norm=out_norm,
        stream=stream,
    )


def dora_embedding_backward(
    grad_out,
    indices,
    weight,
    lora_a,
    lora_b,
    magnitude,
    norm,
    scale: float,
    *,
    padding_idx: Optional[int] = None,
    grad_lora_a=True,
    grad_lora_b=True,
    grad_magnitude=True,
    stream=None,
) -> DoraEmbeddingGrads:
    """Gradients of ``dora_embedding_forward``; rows at padding_idx contribute nothing to
    grad_lora_a (peft looks lora_A up with the layer's padding_idx).

    Returns:
        DoraEmbeddingGrads(lora_a, lora_b, magnitude), None where not requested.
    """
    grad_out, weight, lora_a, lora_b, magnitude, norm = map(
        _detached, (grad_out, weight, lora_a, lora_b, magnitude, norm)
    )
    grads = _C.dora_embedding_backward(
        grad_out,
        indices,
        weight,
        lora_a,
        lora_b,
        magnitude,
        norm,
        scale,
        padding_idx=padding_idx,
        grad_lora_a=_output(grad_lora_a, weight, lambda: lora_a.shape),
        grad_lora_b=_output(grad_lora_b, weight, lambda: lora_b.shape),
        grad_magnitude=_output(grad_magnitude, weight, lambda: magnitude.shape),
        stream=stream,
    )
    return DoraEmbeddingGrads(*grads)


# ---- dropout ---------------------------------------------------------------------------------


def dropout_mask(shape, p: float, seed: int, offset: int = 0, dtype="float32") -> np.ndarray:
    """The dropout mask the LoRA ops apply to x, as a NumPy array of ``shape``.

    ``shape`` is (M, IN) or (..., IN) (flattened to M rows). Element (m, i) uses counter
    ``offset + m*IN + i`` and is ``1/(1-p)`` where Philox4x32-10(seed) gives a uniform >= p,
    else 0 (all zeros when p == 1). ``dtype`` is float32 or float64.
    """
    return _C.dropout_mask(shape, p, seed, offset, dtype=dtype)
