"""A seeded generator of calls to every cpeft.functional entry point, and the oracle that judges
each call.

``make_case(seed, index)`` builds case ``index`` of stream ``seed`` from its own generator
(``numpy.random.default_rng([seed, index])``), so any case replays alone; ``run_case`` calls
cpeft and returns an ``Outcome`` whose ``kind`` is ``"ok"`` or ``"fail"``, with a ``label``
(what happened: ``valid``, ``raised:ValueError``, ...) and, on failure, a ``failure`` class and
a message that ends with the replay line ``python -m tests.fuzz.replay SEED INDEX``.

Case ``index`` exercises entry point ``ENTRIES[index % 25]``. It starts from a valid problem of
random small dimensions (rows, leading dims and ranks may be 0; IN, OUT, V, D from 1), float32
or float64, random options (bias, fan_in_fan_out, enable_lora groups, dropout with random seed
and offset, padding_idx, keep_base, feedforward, DoRA magnitudes and cached squared norms,
grouped adapter indices with their ranks and scales, which gradients are wanted, outputs given
as arrays, True or None) and random memory layouts for every array: C or Fortran order, transposed
views, offsets into a larger buffer, every other row or column, negative strides on one or all
axes, stride 0 (broadcast), huge strides on dimensions of size 1, read-only inputs. Every array
lives inside a larger buffer filled with a sentinel, so writes outside a view are caught. Then,
by chance, one change is made (the ``mutation``):

* invalid (must raise): wrong kinds of objects, wrong dtypes (ints, float16, complex, bool,
  mixed floats, byte-swapped; float/narrow indices), wrong ndim or a dimension that no longer
  agrees with another argument, non-finite or out-of-range scalars (scale, dropout, seed, offset,
  padding_idx, dropout_mask's p/shape/dtype), bad enable_lora, bad grouped ranks/scales,
  embedding or grouped adapter indices out of range,
  outputs that are read-only or alias an input or another output, merge targets aliasing the
  adapter, unmerge records that do not fit;
* valid (must compute the right result): NaN/inf in float inputs, magnitudes near float32's
  overflow and underflow, empty dimensions, two inputs sharing memory, NumPy integer scalars for
  int arguments;
* either (may raise a documented exception, or must compute the right result): output layouts
  that are not plain, unaligned or byte-swapped views, huge dimensions made with stride tricks
  (never allocated), dropout offsets whose counters wrap past 2**64, flipped fan_in_fan_out /
  feedforward flags, changed ndim of activations, zero-sized IN/OUT/rank, and hostile arguments
  whose ``__bool__``/``__float__``/``__index__`` resizes an input while cpeft converts them.

Oracle (every outcome that is not listed fails):

* a call that returns: its results have the right shapes and dtype, outputs given as arrays are
  the arrays returned, outputs not requested are None, and every result agrees with the NumPy
  float64 reference of tests/reference.py evaluated on the very values passed, under the
  tolerance rule of tests/conftest.py (|ours - ref| <= 8 eps sqrt(K) bound + tiny, ``bound`` the
  reference on absolute values, K the sum of the problem's dimensions; DoRA's references are
  those of tests/test_dora.py, the grouped op's that of tests/test_lora_grouped.py, and where a
  DoRA norm is computed its bound widens as ``_dora_norm_and_spread`` explains), applied to every element
  whose reference is finite and whose bound does not exceed the dtype's largest value (beyond
  it an intermediate may overflow legitimately); dropout masks and unmerges are compared bit for
  bit; merges under the tolerance rule, then the unmerge must restore the weight exactly;
  ``dropout_mask`` is called twice and must give the same bits. Inputs must be bitwise
  unchanged, and nothing outside an output's elements may be written.
* a call that raises: the exception is one of TypeError, ValueError, BufferError, IndexError,
  MemoryError (never SystemError, nor the RuntimeError "cpeft internal error"), its message is
  not empty, and every array passed, inputs and outputs alike, is bitwise as it was.
"""

from __future__ import annotations

import math
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np
import test_dora as td
import test_lora_grouped as tg

import reference as ref
import test_bad_input as tb
from conftest import TOL_FACTOR
from cpeft import functional as F

ENTRIES = (
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
    "dora_weight_sq_norm",
    "dora_weight_norm",
    "dora_linear_forward",
    "dora_linear_backward",
    "dora_embedding_forward",
    "dora_embedding_backward",
    "lora_grouped_forward",
    "lora_grouped_backward",
)
POSITIONAL = {
    **tb.POSITIONAL,  # LoRA, IA3, dropout_mask: as tests/test_bad_input.py calls them
    **td.POSITIONAL,  # the DoRA entry points: tests/test_dora.py calls them the same way
    "lora_grouped_forward": ("x", "weight", "bias", "lora_a", "lora_b", "index", "ranks", "scales"),
    "lora_grouped_backward": (
        "grad_out",
        "x",
        "weight",
        "lora_a",
        "lora_b",
        "xa",
        "index",
        "ranks",
        "scales",
    ),
}
DOCUMENTED = (TypeError, ValueError, BufferError, IndexError, MemoryError)
FLOATS = (np.float32, np.float64)
SENTINEL = -1234.5
HUGE_STRIDE_ELEMENTS = 2**31 + 17  # beyond the 32-bit BLAS range


def replay_line(seed, index):
    return f"python -m tests.fuzz.replay {seed} {index}"


# ---- arrays inside sentinel-filled buffers ---------------------------------------------------

INPUT_LAYOUTS = (
    "c",
    "c",
    "c",
    "f",
    "offset",
    "strided_last",
    "strided_first",
    "reversed",
    "negative_all",
    "size1_huge",
    "readonly",
    "broadcast",
)
# Layouts that keep every value (inputs derived from others, and chosen bad indices).
KEEPING_LAYOUTS = tuple(layout for layout in INPUT_LAYOUTS if layout != "broadcast")
OUTPUT_LAYOUTS_PLAIN = ("c", "c", "offset", "strided_first")
OUTPUT_LAYOUTS_OTHER = (
    "f",
    "strided_last",
    "reversed",
    "negative_all",
    "size1_huge",
    "unaligned",
    "overlapping_self",
)


@dataclass
class Placed:
    """A view and the buffer it lives in."""

    view: np.ndarray
    storage: np.ndarray
    start: int  # element index of view[0, ..., 0] in storage (itemsize units of storage)


class Arrays:
    """Builds arrays with a given logical content and memory layout, and remembers their
    buffers so that a case can check them bit for bit afterwards."""

    def __init__(self, rng, large=False):
        self.rng = rng
        self.large = large
        self.placed: Dict[int, Placed] = {}

    def place(self, values, layout="c"):
        values = np.asarray(values)
        shape, dtype = values.shape, values.dtype
        if layout == "readonly":
            view = self.place(values, "c")
            view.flags.writeable = False
            return view
        if layout == "broadcast":
            if values.ndim == 0 or values.size == 0:
                return self.place(values, "c")
            axis = int(self.rng.integers(values.ndim))
            first = np.take(values, [0], axis=axis)
            small = self.place(first, "c")
            view = np.broadcast_to(small, shape)
            self.placed[id(view)] = self.placed[id(small)]
            return view
        if layout == "unaligned":
            storage = np.zeros(values.nbytes + 2 * dtype.itemsize + 1, np.uint8)
            view = storage[1 : 1 + values.nbytes].view(dtype).reshape(shape)
            view[...] = values
            self.placed[id(view)] = Placed(view, storage, -1)
            return view
        if layout == "byteswapped":
            return self.place(values.astype(dtype.newbyteorder()), "c")
        nd = values.ndim
        order = list(range(nd))
        steps = [1] * nd
        signs = [1] * nd
        huge = [False] * nd
        if layout == "f":
            order = order[::-1]
        elif layout == "strided_last" and nd:
            steps[-1] = 2
        elif layout == "strided_first" and nd:
            steps[0] = 2
        elif layout == "reversed" and nd:
            signs[0] = -1
        elif layout == "negative_all":
            signs = [-1] * nd
        elif layout == "size1_huge":
            huge = [n == 1 for n in shape]
        elif layout == "overlapping_self" and nd:
            # Rows that overlap one another (a writeable output no caller should pass).
            order = order[::-1] if nd > 1 else order
        strides = [0] * nd
        extent = 1
        for axis in reversed(order):  # last in `order` varies fastest
            strides[axis] = extent * steps[axis]
            extent *= max(shape[axis], 1) * steps[axis]
        if layout == "overlapping_self" and nd > 1:
            strides[0] = 1 if shape[0] > 1 else strides[0]
        low = high = 0
        for axis in range(nd):
            if huge[axis]:
                strides[axis] = HUGE_STRIDE_ELEMENTS
                continue
            strides[axis] *= signs[axis]
            reach = strides[axis] * max(shape[axis] - 1, 0)
            low, high = low + min(reach, 0), high + max(reach, 0)
        margin = 3 if layout == "offset" else 2
        storage = np.full(high - low + 1 + 2 * margin, SENTINEL, dtype)
        start = margin - low
        item = dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[start:], shape, [s * item for s in strides], writeable=True
        )
        if values.size:
            view[...] = values
        self.placed[id(view)] = Placed(view, storage, start)
        return view

    def buffers(self, arrays):
        """The buffers of the given arrays, each once (keyed by the storage's address)."""
        seen = {}
        for a in arrays:
            p = self.placed.get(id(a))
            if p is not None:
                seen[p.storage.__array_interface__["data"][0]] = p
        return list(seen.values())

    def coverage(self, placed: Placed):
        """A boolean array over placed.storage: True where the view has an element."""
        if placed.start < 0:  # unaligned: a byte buffer
            mask = np.zeros(placed.storage.shape, bool)
            mask[1 : 1 + placed.view.nbytes] = True
            return mask
        mask = np.zeros(placed.storage.shape, np.uint8)
        v = placed.view
        item = v.dtype.itemsize
        covered = np.lib.stride_tricks.as_strided(
            mask[placed.start :], v.shape, [s // item for s in v.strides], writeable=True
        )
        covered[...] = 1
        return mask.astype(bool)


def raw(a):
    return np.array(a, copy=True)


# ---- hostile arguments -----------------------------------------------------------------------


class Hostile:
    """An argument whose conversion resizes (and so frees the data of) an owning array."""

    def __init__(self, victim, value):
        self.victim = victim
        self.value = value
        self.fired = False

    def _fire(self):
        if not self.fired:
            self.fired = True
            self.victim.resize((self.victim.size * 64 + 4096,), refcheck=False)
        return self.value

    def __bool__(self):
        return bool(self._fire())

    def __float__(self):
        return float(self._fire())

    def __index__(self):
        return int(self._fire())

    def __repr__(self):
        return f"Hostile({self.value!r})"


# ---- cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    seed: int
    index: int
    entry: str
    args: Dict[str, Any]
    expect: str = "valid"  # valid | invalid | either | hostile
    mutation: str = "none"
    # reference(snapshot) -> {result name: (ref, bound, K)}; snapshot maps names to copies
    reference: Optional[Callable] = None
    # name of each element of the result, in order; None: the result itself is one array
    result_names: Optional[tuple] = None
    # result name -> the argument whose request (True/False/None/array) decides whether it
    # comes back
    requested_by: Dict[str, str] = field(default_factory=dict)
    dims: Dict[str, int] = field(default_factory=dict)
    notes: Dict[str, Any] = field(default_factory=dict)
    arrays: Optional[Arrays] = None

    def call(self, args=None):
        args = self.args if args is None else args
        names = POSITIONAL[self.entry]
        keywords = {k: v for k, v in args.items() if k not in names}
        return getattr(F, self.entry)(*[args[n] for n in names], **keywords)

    def describe(self):
        def show(v):
            if isinstance(v, np.ndarray):
                return f"array{v.shape} {v.dtype} strides={v.strides} writeable={v.flags.writeable}"
            if isinstance(v, tuple) and v and isinstance(v[0], np.ndarray):
                return "(" + ", ".join(show(e) for e in v) + ")"
            text = repr(v)
            return text if len(text) < 120 else text[:117] + "..."

        lines = [
            f"case {self.seed}:{self.index} {self.entry} expect={self.expect} "
            f"mutation={self.mutation} dims={self.dims}"
        ]
        lines += [f"  {k} = {show(v)}" for k, v in self.args.items()]
        return "\n".join(lines)


def _k(*dims):
    return int(sum(int(d) for d in dims)) + 1


def _size(rng, arrays, high):
    """A dimension in [1, high), or up to 12 times larger in a large case (which reaches the
    blocked and fused code paths that only start at a few dozen rows)."""
    return int(rng.integers(1, high * 12 if arrays.large else high))


def _lead(rng, arrays):
    """Leading dimensions of an activation: mostly one, sometimes none, two or empty."""
    kind = rng.integers(10)
    if kind == 0:
        return ()
    if kind <= 2:
        return (int(rng.integers(0, 4)), int(rng.integers(0, 4)))
    if kind == 3:
        return (0,)
    return (_size(rng, arrays, 7),)


def _values(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _groups(rng):
    """(enable_lora or None, G, K)."""
    if rng.random() < 0.5:
        return None, 1, 1
    g = int(rng.integers(1, 4))
    enable = [bool(e) for e in rng.integers(0, 2, g)]
    if not any(enable):
        enable[int(rng.integers(g))] = True
    if rng.random() < 0.2:
        enable = tuple(enable)
    return enable, g, sum(enable)


def pick(rng, values):
    """One of values (Python objects kept as they are; rng.choice would make them an array)."""
    return values[int(rng.integers(len(values)))]


def _wraps(offset, count):
    """Whether dropout counters offset .. offset + count - 1 pass 2**64 (issue 12, defect 3:
    cpeft may count modulo 2**64, which the reference does, or refuse such offsets)."""
    return int(offset) + int(count) > 2**64


def _dropout(rng):
    """(p, seed, offset) with the usual and the extreme values."""
    if rng.random() < 0.4:
        return 0.0, 0, 0
    p = pick(rng, [0.1, 0.5, 0.9, 1.0, float(rng.random())])
    seed = pick(rng, [0, 1, 2**32 + 5, 2**64 - 1, int(rng.integers(0, 2**63))])
    offset = pick(
        rng, [0, 7, 2**32 - 3, 2**63, 2**64 - 3, 2**64 - 1000, int(rng.integers(0, 2**40))]
    )
    return p, seed, offset


def _layout(rng, layouts=INPUT_LAYOUTS):
    return str(rng.choice(layouts))


def _request(rng, arrays, shape, dtype, optional=True):
    """An output argument: True, None/False (optional outputs only) or an array to write."""
    r = rng.random()
    if r < 0.35:
        return True
    if optional and r < 0.55:
        return None if rng.random() < 0.5 else False
    values = np.full(shape, -7.25, dtype)
    layout = _layout(rng, OUTPUT_LAYOUTS_PLAIN) if len(shape) <= 2 else "c"
    return arrays.place(values, layout)


def _mask_for(x, p, seed, offset):
    if p == 0.0:
        return None
    x = np.asarray(x)
    in_features = x.shape[-1] if x.ndim else 1
    rows = x.size // in_features if in_features else 0
    return ref.dropout_mask((rows, in_features), float(p), int(seed), int(offset) % 2**64, x.dtype)


# Each builder returns a valid Case for its entry point.


def _lora_linear(rng, entry, arrays):
    dtype = rng.choice(FLOATS)
    lead = _lead(rng, arrays)
    seg = _size(rng, arrays, 5)
    enable, groups, enabled = _groups(rng)
    out_f, in_f, rank = seg * groups, _size(rng, arrays, 10), _size(rng, arrays, 5)
    fan = bool(rng.random() < 0.3)
    p, seed, offset = _dropout(rng)
    scale = float(rng.choice([0.5, 2.0, -1.25, 0.0, float(rng.standard_normal() * 4)]))
    x = arrays.place(_values(rng, lead + (in_f,), dtype), _layout(rng))
    wshape = (in_f, out_f) if fan else (out_f, in_f)
    weight = arrays.place(_values(rng, wshape, dtype), _layout(rng))
    lora_a = arrays.place(_values(rng, (rank * enabled, in_f), dtype), _layout(rng))
    lora_b = arrays.place(_values(rng, (seg * enabled, rank), dtype), _layout(rng))
    options = dict(fan_in_fan_out=fan, enable_lora=enable, dropout=p, seed=seed, offset=offset)
    for name in ("fan_in_fan_out", "enable_lora", "dropout", "seed", "offset"):
        if options[name] in (False, None, 0, 0.0) and rng.random() < 0.5:
            del options[name]  # the default
    dims = dict(
        M=int(np.prod(lead, dtype=np.int64)), IN=in_f, OUT=out_f, R=rank, G=groups, K=enabled
    )
    case = Case(0, 0, entry, {}, dims=dims, arrays=arrays)

    def kw(s):
        return dict(fan_in_fan_out=s.get("fan_in_fan_out", False), enable_lora=s.get("enable_lora"))

    def mask_of(s):
        return _mask_for(s["x"], s.get("dropout", 0.0), s.get("seed", 0), s.get("offset", 0))

    if entry == "lora_linear_forward":
        bias = (
            None
            if rng.random() < 0.4
            else arrays.place(_values(rng, (out_f,), dtype), _layout(rng))
        )
        out = _request(rng, arrays, lead + (out_f,), dtype, optional=False)
        out_xa = _request(rng, arrays, lead + (rank * enabled,), dtype, optional=False)
        case.args = dict(
            x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, scale=scale, **options
        )
        for name, value in (("out", out), ("out_xa", out_xa)):
            if value is not True or rng.random() < 0.5:
                case.args[name] = value
        case.result_names = ("y", "xa")

        def reference(s):
            args = (s["x"], s["weight"], s["bias"], s["lora_a"], s["lora_b"], s["scale"])
            opts = dict(kw(s), mask=mask_of(s))
            y, xa = ref.lora_linear_forward(*args, **opts)
            by, bxa = _bound(ref.lora_linear_forward, args, opts)
            k = _k(*dims.values())
            return {"y": (y, by, k), "xa": (xa, bxa, k)}
    else:
        grad_out = arrays.place(_values(rng, lead + (out_f,), dtype), _layout(rng))
        mask = _mask_for(raw(x), p, seed, offset)
        _, xa_values = ref.lora_linear_forward(
            raw(x),
            raw(weight),
            None,
            raw(lora_a),
            raw(lora_b),
            scale,
            fan_in_fan_out=fan,
            enable_lora=enable,
            mask=mask,
        )
        xa = arrays.place(xa_values.astype(dtype), _layout(rng, KEEPING_LAYOUTS))
        case.args = dict(
            grad_out=grad_out,
            x=x,
            weight=weight,
            lora_a=lora_a,
            lora_b=lora_b,
            xa=xa,
            scale=scale,
            **options,
        )
        shapes = dict(
            grad_x=lead + (in_f,),
            grad_lora_a=(rank * enabled, in_f),
            grad_lora_b=(seg * enabled, rank),
            grad_bias=(out_f,),
            grad_weight=wshape,
        )
        for name, shape in shapes.items():
            if rng.random() < 0.6:
                case.args[name] = _request(rng, arrays, shape, dtype)
        case.result_names = ("x", "lora_a", "lora_b", "bias", "weight")
        case.requested_by = {
            "x": "grad_x",
            "lora_a": "grad_lora_a",
            "lora_b": "grad_lora_b",
            "bias": "grad_bias",
            "weight": "grad_weight",
        }
        case.notes["defaults"] = dict(
            grad_x=True, grad_lora_a=True, grad_lora_b=True, grad_bias=False, grad_weight=False
        )

        def reference(s):
            args = (s["grad_out"], s["x"], s["weight"], s["lora_a"], s["lora_b"], s["scale"])
            opts = dict(kw(s), mask=mask_of(s))
            grads = ref.lora_linear_backward(*args, **opts)
            bounds = _bound(ref.lora_linear_backward, args, opts)
            k = _k(*dims.values())
            return {n: (grads[n], bounds[n], k) for n in grads}

    case.reference = reference
    return case


def _bound(fn, args, kwargs):
    """The reference evaluated on absolute values of all float inputs (tests/conftest.py)."""

    def absolute(v):
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            return np.abs(v)
        if isinstance(v, float):
            return abs(v)
        return v

    return fn(*[absolute(a) for a in args], **{k: absolute(v) for k, v in kwargs.items()})


def _indices(rng, arrays, lead, vocab):
    itype = np.int64 if rng.random() < 0.6 else np.int32
    values = rng.integers(0, vocab, lead).astype(itype) if vocab else np.zeros(lead, itype)
    return arrays.place(values, _layout(rng))


def _padding_idx(rng, vocab):
    if rng.random() < 0.5:
        return None
    return int(rng.integers(-vocab, vocab))


def _normalized_padding(padding_idx, vocab):
    if padding_idx is None:
        return None
    padding_idx = int(padding_idx)
    return padding_idx + vocab if padding_idx < 0 else padding_idx


def _lora_embedding(rng, entry, arrays):
    dtype = rng.choice(FLOATS)
    lead = _lead(rng, arrays)
    vocab, dim, rank = _size(rng, arrays, 10), _size(rng, arrays, 7), _size(rng, arrays, 5)
    indices = _indices(rng, arrays, lead, vocab)
    lora_a = arrays.place(_values(rng, (rank, vocab), dtype), _layout(rng))
    lora_b = arrays.place(_values(rng, (dim, rank), dtype), _layout(rng))
    scale = float(rng.choice([0.5, -2.0, 0.0, float(rng.standard_normal() * 4)]))
    padding = _padding_idx(rng, vocab)
    dims = dict(N=int(np.prod(lead, dtype=np.int64)), V=vocab, D=dim, R=rank)
    case = Case(0, 0, entry, {}, dims=dims, arrays=arrays)
    if entry == "lora_embedding_forward":
        weight = arrays.place(_values(rng, (vocab, dim), dtype), _layout(rng))
        case.args = dict(indices=indices, weight=weight, lora_a=lora_a, lora_b=lora_b, scale=scale)
        if padding is not None:
            case.args["padding_idx"] = padding
        out = _request(rng, arrays, lead + (dim,), dtype, optional=False)
        if out is not True or rng.random() < 0.5:
            case.args["out"] = out

        def reference(s):
            args = (s["indices"], s["weight"], s["lora_a"], s["lora_b"], s["scale"])
            return {
                None: (
                    ref.lora_embedding_forward(*args),
                    _bound(ref.lora_embedding_forward, args, {}),
                    _k(*dims.values()),
                )
            }
    else:
        grad_out = arrays.place(_values(rng, lead + (dim,), dtype), _layout(rng))
        case.args = dict(
            grad_out=grad_out, indices=indices, lora_a=lora_a, lora_b=lora_b, scale=scale
        )
        if padding is not None:
            case.args["padding_idx"] = padding
        shapes = dict(grad_lora_a=(rank, vocab), grad_lora_b=(dim, rank), grad_weight=(vocab, dim))
        for name, shape in shapes.items():
            if rng.random() < 0.6:
                case.args[name] = _request(rng, arrays, shape, dtype)
        case.result_names = ("lora_a", "lora_b", "weight")
        case.requested_by = {
            "lora_a": "grad_lora_a",
            "lora_b": "grad_lora_b",
            "weight": "grad_weight",
        }
        case.notes["defaults"] = dict(grad_lora_a=True, grad_lora_b=True, grad_weight=False)

        def reference(s):
            vocab_now = np.shape(s["lora_a"])[1]
            args = (s["grad_out"], s["indices"], s["lora_a"], s["lora_b"], s["scale"])
            opts = dict(padding_idx=_normalized_padding(s.get("padding_idx"), vocab_now))
            grads = ref.lora_embedding_backward(*args, **opts)
            bounds = _bound(ref.lora_embedding_backward, args, opts)
            k = _k(*dims.values())
            return {n: (grads[n], bounds[n], k) for n in grads}

    case.reference = reference
    return case


def _l_shape(rng, n):
    return [(n,), (n, 1), (1, n)][int(rng.integers(3))]


def _ia3_linear(rng, entry, arrays):
    dtype = rng.choice(FLOATS)
    lead = _lead(rng, arrays)
    in_f, out_f = _size(rng, arrays, 10), _size(rng, arrays, 10)
    fan = bool(rng.random() < 0.3)
    feedforward = bool(rng.random() < 0.4)
    x = arrays.place(_values(rng, lead + (in_f,), dtype), _layout(rng))
    wshape = (in_f, out_f) if fan else (out_f, in_f)
    weight = arrays.place(_values(rng, wshape, dtype), _layout(rng))
    n = in_f if feedforward else out_f
    ia3_l = arrays.place(_values(rng, _l_shape(rng, n), dtype) + 1, _layout(rng))
    dims = dict(M=int(np.prod(lead, dtype=np.int64)), IN=in_f, OUT=out_f)
    case = Case(0, 0, entry, {}, dims=dims, arrays=arrays)
    options = {}
    if feedforward or rng.random() < 0.5:
        options["feedforward"] = feedforward
    if fan or rng.random() < 0.5:
        options["fan_in_fan_out"] = fan

    def kw(s):
        return dict(
            feedforward=s.get("feedforward", False), fan_in_fan_out=s.get("fan_in_fan_out", False)
        )

    if entry == "ia3_linear_forward":
        bias = (
            None
            if rng.random() < 0.4
            else arrays.place(_values(rng, (out_f,), dtype), _layout(rng))
        )
        case.args = dict(x=x, weight=weight, bias=bias, ia3_l=ia3_l, **options)
        out = _request(rng, arrays, lead + (out_f,), dtype, optional=False)
        if out is not True or rng.random() < 0.5:
            case.args["out"] = out
        if not feedforward:
            r = rng.random()
            if r < 0.3:
                case.args["keep_base"] = True
            elif r < 0.5:
                case.args["out_base"] = _request(rng, arrays, lead + (out_f,), dtype)
                if case.args["out_base"] is None or case.args["out_base"] is False:
                    del case.args["out_base"]
        case.result_names = ("y", "base")

        def reference(s):
            args = (s["x"], s["weight"], s["bias"], s["ia3_l"])
            y, base = ref.ia3_linear_forward(*args, **kw(s))
            by, bbase = _bound(ref.ia3_linear_forward, args, kw(s))
            k = _k(*dims.values())
            wants_base = not kw(s)["feedforward"] and (
                bool(s.get("keep_base"))
                or isinstance(s.get("out_base"), np.ndarray)
                or s.get("out_base") is True
            )
            return {"y": (y, by, k), "base": (base, bbase, k) if wants_base else None}
    else:
        hidden_bias = None if rng.random() < 0.5 else _values(rng, (out_f,), dtype)
        case.notes["hidden_bias"] = hidden_bias
        grad_out = arrays.place(_values(rng, lead + (out_f,), dtype), _layout(rng))
        _, base_values = ref.ia3_linear_forward(
            raw(x), raw(weight), hidden_bias, np.ones(out_f), fan_in_fan_out=fan
        )
        base = (
            None
            if feedforward and rng.random() < 0.7
            else arrays.place(base_values.astype(dtype), _layout(rng, KEEPING_LAYOUTS))
        )
        case.args = dict(grad_out=grad_out, x=x, weight=weight, ia3_l=ia3_l, base=base, **options)
        shapes = dict(
            grad_x=lead + (in_f,), grad_ia3_l=ia3_l.shape, grad_bias=(out_f,), grad_weight=wshape
        )
        for name, shape in shapes.items():
            if rng.random() < 0.6:
                case.args[name] = _request(rng, arrays, shape, dtype)
        case.result_names = ("x", "ia3_l", "bias", "weight")
        case.requested_by = {
            "x": "grad_x",
            "ia3_l": "grad_ia3_l",
            "bias": "grad_bias",
            "weight": "grad_weight",
        }
        case.notes["defaults"] = dict(
            grad_x=True, grad_ia3_l=True, grad_bias=False, grad_weight=False
        )

        def reference(s):
            args = (s["grad_out"], s["x"], s["weight"], hidden_bias, s["ia3_l"])
            grads = ref.ia3_linear_backward(*args, **kw(s))
            bounds = _bound(ref.ia3_linear_backward, args, kw(s))
            k = _k(*dims.values())
            return {n: (grads[n], bounds[n], k) for n in grads}

    case.reference = reference
    return case


def _ia3_embedding(rng, entry, arrays):
    dtype = rng.choice(FLOATS)
    lead = _lead(rng, arrays)
    vocab, dim = _size(rng, arrays, 10), _size(rng, arrays, 7)
    indices = _indices(rng, arrays, lead, vocab)
    weight = arrays.place(_values(rng, (vocab, dim), dtype), _layout(rng))
    ia3_l = arrays.place(_values(rng, _l_shape(rng, dim), dtype) + 1, _layout(rng))
    dims = dict(N=int(np.prod(lead, dtype=np.int64)), V=vocab, D=dim)
    case = Case(0, 0, entry, {}, dims=dims, arrays=arrays)
    if entry == "ia3_embedding_forward":
        case.args = dict(indices=indices, weight=weight, ia3_l=ia3_l)
        out = _request(rng, arrays, lead + (dim,), dtype, optional=False)
        if out is not True or rng.random() < 0.5:
            case.args["out"] = out

        def reference(s):
            args = (s["indices"], s["weight"], s["ia3_l"])
            return {
                None: (
                    ref.ia3_embedding_forward(*args),
                    _bound(ref.ia3_embedding_forward, args, {}),
                    _k(*dims.values()),
                )
            }
    else:
        grad_out = arrays.place(_values(rng, lead + (dim,), dtype), _layout(rng))
        case.args = dict(grad_out=grad_out, indices=indices, weight=weight, ia3_l=ia3_l)
        padding = _padding_idx(rng, vocab)
        if padding is not None:
            case.args["padding_idx"] = padding
        for name, shape in dict(grad_ia3_l=ia3_l.shape, grad_weight=(vocab, dim)).items():
            if rng.random() < 0.6:
                case.args[name] = _request(rng, arrays, shape, dtype)
        case.result_names = ("ia3_l", "weight")
        case.requested_by = {"ia3_l": "grad_ia3_l", "weight": "grad_weight"}
        case.notes["defaults"] = dict(grad_ia3_l=True, grad_weight=False)

        def reference(s):
            vocab_now = np.shape(s["weight"])[0]
            args = (s["grad_out"], s["indices"], s["weight"], s["ia3_l"])
            opts = dict(padding_idx=_normalized_padding(s.get("padding_idx"), vocab_now))
            grads = ref.ia3_embedding_backward(*args, **opts)
            bounds = _bound(ref.ia3_embedding_backward, args, opts)
            k = _k(*dims.values())
            return {n: (grads[n], bounds[n], k) for n in grads}

    case.reference = reference
    return case


MERGE_LAYOUTS = ("c", "c", "f", "offset", "strided_first")


def _merge(rng, entry, arrays):
    """A merge case; the unmerge entries merge first (on the same weight) and then unmerge."""
    dtype = rng.choice(FLOATS)
    family = entry.replace("_unmerge", "_merge")
    wlayout = _layout(rng, MERGE_LAYOUTS)
    case = Case(0, 0, entry, {}, arrays=arrays)
    if family == "lora_merge":
        seg = _size(rng, arrays, 5)
        enable, groups, enabled = _groups(rng)
        out_f, in_f, rank = seg * groups, _size(rng, arrays, 10), _size(rng, arrays, 5)
        fan = bool(rng.random() < 0.3)
        wshape = (in_f, out_f) if fan else (out_f, in_f)
        case.args = dict(
            weight=arrays.place(_values(rng, wshape, dtype), wlayout),
            lora_a=arrays.place(_values(rng, (rank * enabled, in_f), dtype), _layout(rng)),
            lora_b=arrays.place(_values(rng, (seg * enabled, rank), dtype), _layout(rng)),
            scale=float(rng.choice([0.5, -3.0, 1e-3, float(rng.standard_normal())])),
        )
        if fan or rng.random() < 0.5:
            case.args["fan_in_fan_out"] = fan
        if enable is not None:
            case.args["enable_lora"] = enable
        case.dims = dict(OUT=out_f, IN=in_f, R=rank, G=groups)

        def merged(s):
            args = (s["weight"], s["lora_a"], s["lora_b"], s["scale"])
            opts = dict(
                fan_in_fan_out=s.get("fan_in_fan_out", False), enable_lora=s.get("enable_lora")
            )
            return {
                "weight": (
                    ref.lora_merged_weight(*args, **opts),
                    _bound(ref.lora_merged_weight, args, opts),
                    _k(rank, 2),
                )
            }
    elif family == "lora_embedding_merge":
        vocab, dim = _size(rng, arrays, 10), _size(rng, arrays, 7)
        rank = _size(rng, arrays, 5)
        case.args = dict(
            weight=arrays.place(_values(rng, (vocab, dim), dtype), wlayout),
            lora_a=arrays.place(_values(rng, (rank, vocab), dtype), _layout(rng)),
            lora_b=arrays.place(_values(rng, (dim, rank), dtype), _layout(rng)),
            scale=float(rng.choice([0.5, -3.0, float(rng.standard_normal())])),
        )
        case.dims = dict(V=vocab, D=dim, R=rank)

        def merged(s):
            args = (s["weight"], s["lora_a"], s["lora_b"], s["scale"])
            return {
                "weight": (
                    ref.lora_embedding_merged_weight(*args),
                    _bound(ref.lora_embedding_merged_weight, args, {}),
                    _k(rank, 2),
                )
            }
    elif family == "ia3_merge":
        in_f, out_f = _size(rng, arrays, 10), _size(rng, arrays, 10)
        fan = bool(rng.random() < 0.3)
        feedforward = bool(rng.random() < 0.4)
        wshape = (in_f, out_f) if fan else (out_f, in_f)
        n = in_f if feedforward else out_f
        case.args = dict(
            weight=arrays.place(_values(rng, wshape, dtype), wlayout),
            ia3_l=arrays.place(_values(rng, _l_shape(rng, n), dtype) + 1, _layout(rng)),
        )
        if rng.random() < 0.6:
            case.args["bias"] = arrays.place(
                _values(rng, (out_f,), dtype), _layout(rng, ("c", "offset"))
            )
        if feedforward or rng.random() < 0.5:
            case.args["feedforward"] = feedforward
        if fan or rng.random() < 0.5:
            case.args["fan_in_fan_out"] = fan
        case.dims = dict(OUT=out_f, IN=in_f)

        def merged(s):
            opts = dict(
                bias=s.get("bias"),
                feedforward=s.get("feedforward", False),
                fan_in_fan_out=s.get("fan_in_fan_out", False),
            )
            w, b = ref.ia3_merged(s["weight"], s["ia3_l"], **opts)
            bw, bb = _bound(ref.ia3_merged, (s["weight"], s["ia3_l"]), opts)
            result = {"weight": (w, bw, 2)}
            if b is not None:
                result["bias"] = (b, bb, 2)
            return result
    else:
        vocab, dim = _size(rng, arrays, 10), _size(rng, arrays, 7)
        case.args = dict(
            weight=arrays.place(_values(rng, (vocab, dim), dtype), wlayout),
            ia3_l=arrays.place(_values(rng, _l_shape(rng, dim), dtype) + 1, _layout(rng)),
        )
        case.dims = dict(V=vocab, D=dim)

        def merged(s):
            args = (s["weight"], s["ia3_l"])
            return {
                "weight": (
                    ref.ia3_embedding_merged_weight(*args),
                    _bound(ref.ia3_embedding_merged_weight, args, {}),
                    2,
                )
            }

    case.reference = merged
    case.notes["family"] = family
    return case


def merge_first(case):
    """For the unmerge entries: merge (on the case's own weight) so that the unmerge has its
    record, and remember the weight (and bias) from before."""
    family = case.notes["family"]
    names = POSITIONAL[family]
    keywords = {k: v for k, v in case.args.items() if k not in names}
    case.notes["unmerged_weight"] = raw(case.args["weight"])
    if isinstance(case.args.get("bias"), np.ndarray):
        case.notes["unmerged_bias"] = raw(case.args["bias"])
    record = getattr(F, family)(*[case.args[n] for n in names], **keywords)
    if case.entry == "ia3_unmerge" and (case.args.get("feedforward") or "bias" not in case.args):
        record = (record[0], None)
    case.args["records" if case.entry == "ia3_unmerge" else "record"] = record


# Changes an unmerge case gets before its merge (the adapter must be the one merged).
BEFORE_MERGE = ("nonfinite", "extreme", "shared_inputs", "none")


def _dropout_mask(rng, entry, arrays):
    lead = _lead(rng, arrays)
    width = int(rng.integers(0, 40)) if rng.random() < 0.2 else int(rng.integers(1, 300))
    shape = lead + (width,)
    p, seed, offset = _dropout(rng)
    if p == 0.0 and rng.random() < 0.5:
        p = float(rng.random())
    case = Case(0, 0, entry, {}, arrays=arrays, dims=dict(N=int(np.prod(shape))))
    case.args = dict(
        shape=list(shape) if rng.random() < 0.2 else shape, p=p, seed=seed, offset=offset
    )
    if rng.random() < 0.5:
        case.args["dtype"] = (
            str(rng.choice(["float32", "float64"]))
            if rng.random() < 0.7
            else np.dtype(rng.choice(FLOATS))
        )

    def reference(s):
        dtype = np.dtype(s.get("dtype", "float32"))
        want = ref.dropout_mask(
            tuple(s["shape"]), float(s["p"]), int(s["seed"]), int(s.get("offset", 0)) % 2**64, dtype
        )
        return {None: (want, None, 0)}

    case.reference = reference
    return case


# ---- DoRA and the grouped (mixed-adapter) LoRA op --------------------------------------------
# The float64 references are those of tests/test_dora.py and tests/test_lora_grouped.py.


def _dora_n2(weight, lora_a, lora_b, scale, sq=None):
    """(n², n_abs²) of DoRA's row norms over the (OUT, IN) view ``weight``: n² = ‖w‖² (or the
    given squared norms) + 2s·b·(A·wᵀ) + s²‖b·A‖², the form cpeft evaluates; n_abs² the same
    sum of absolute terms (how much the rounding of n² can be)."""
    w, a, b = (np.asarray(v, np.float64) for v in (weight, lora_a, lora_b))
    ba = b @ a
    sq = (w * w).sum(1) if sq is None else np.asarray(sq, np.float64)
    n2 = sq + 2 * scale * (ba * w).sum(1) + scale * scale * (ba * ba).sum(1)
    aba = np.abs(b) @ np.abs(a)
    n2_abs = (
        np.abs(sq) + 2 * abs(scale) * (aba * np.abs(w)).sum(1) + scale * scale * (aba * aba).sum(1)
    )
    return n2, n2_abs


def _dora_norm_and_spread(weight, lora_a, lora_b, scale, sq=None):
    """(n, 1 + n_abs²/n²): the relative error of n is at most about eps·K times the latter."""
    n2, n2_abs = _dora_n2(weight, lora_a, lora_b, scale, sq)
    n = np.sqrt(n2)
    return n, 1 + n2_abs / n2


def _c_floor(case, norm):
    """What to add to |m| in a bound for c = m / n being rounded to the dtype (as peft does):
    below the dtype's smallest normal number c has fewer bits, an absolute error up to about
    tiny·eps, which the rule's 8·eps·bound covers once |c| is counted as at least tiny."""
    dtype = float_dtype(case) or np.dtype(np.float64)
    info = np.finfo(dtype)
    with np.errstate(all="ignore"):
        return np.abs(np.asarray(norm, np.float64)) * float(info.tiny)


def _logical_w(weight, fan):
    w = np.asarray(weight, np.float64)
    return w.T if fan else w


def _abs(v):
    return None if v is None else np.abs(np.asarray(v, np.float64))


def _dora_norms(rng, entry, arrays):
    dtype = rng.choice(FLOATS)
    in_f, out_f, rank = _size(rng, arrays, 10), _size(rng, arrays, 10), _size(rng, arrays, 5)
    fan = bool(rng.random() < 0.3)
    wshape = (in_f, out_f) if fan else (out_f, in_f)
    weight = arrays.place(_values(rng, wshape, dtype), _layout(rng))
    dims = dict(IN=in_f, OUT=out_f, R=rank)
    case = Case(0, 0, entry, dict(weight=weight), dims=dims, arrays=arrays)
    if fan or rng.random() < 0.5:
        case.args["fan_in_fan_out"] = fan
    k = _k(*dims.values())
    if entry == "dora_weight_norm":
        case.args["lora_a"] = arrays.place(_values(rng, (rank, in_f), dtype), _layout(rng))
        case.args["lora_b"] = arrays.place(_values(rng, (out_f, rank), dtype), _layout(rng))
        case.args["scale"] = float(
            rng.choice([0.5, 2.0, -1.25, 0.0, float(rng.standard_normal() * 4)])
        )
        if rng.random() < 0.3:
            sq = (_logical_w(raw(weight), fan) ** 2).sum(1)
            case.args["weight_sq_norm"] = arrays.place(sq.astype(dtype), _layout(rng))
    out = _request(rng, arrays, (out_f,), dtype, optional=False)
    if out is not True or rng.random() < 0.5:
        case.args["out"] = out

    def reference(s):
        w = _logical_w(s["weight"], s.get("fan_in_fan_out", False))
        if entry == "dora_weight_sq_norm":
            want = (w * w).sum(1)
            return {None: (want, want, k)}
        n2, n2_abs = _dora_n2(
            w, s["lora_a"], s["lora_b"], float(s["scale"]), s.get("weight_sq_norm")
        )
        n = np.sqrt(n2)
        return {None: (n, n2_abs / n, k)}

    case.reference = reference
    return case


def _dora_linear(rng, entry, arrays):
    dtype = rng.choice(FLOATS)
    lead = _lead(rng, arrays)
    in_f, out_f, rank = _size(rng, arrays, 10), _size(rng, arrays, 10), _size(rng, arrays, 5)
    fan = bool(rng.random() < 0.3)
    p, seed, offset = _dropout(rng)
    scale = float(rng.choice([0.5, 2.0, -1.25, 0.0, float(rng.standard_normal() * 4)]))
    x = arrays.place(_values(rng, lead + (in_f,), dtype), _layout(rng))
    wshape = (in_f, out_f) if fan else (out_f, in_f)
    weight = arrays.place(_values(rng, wshape, dtype), _layout(rng))
    lora_a = arrays.place(_values(rng, (rank, in_f), dtype), _layout(rng))
    lora_b = arrays.place(_values(rng, (out_f, rank), dtype), _layout(rng))
    magnitude = arrays.place((rng.random(out_f) + 0.5).astype(dtype), _layout(rng))
    options = dict(fan_in_fan_out=fan, dropout=p, seed=seed, offset=offset)
    for name in ("fan_in_fan_out", "dropout", "seed", "offset"):
        if options[name] in (False, 0, 0.0) and rng.random() < 0.5:
            del options[name]
    dims = dict(M=int(np.prod(lead, dtype=np.int64)), IN=in_f, OUT=out_f, R=rank)
    k = _k(*dims.values())
    case = Case(0, 0, entry, {}, dims=dims, arrays=arrays)

    def mask_of(s):
        return _mask_for(s["x"], s.get("dropout", 0.0), s.get("seed", 0), s.get("offset", 0))

    if entry == "dora_linear_forward":
        bias = (
            None
            if rng.random() < 0.4
            else arrays.place(_values(rng, (out_f,), dtype), _layout(rng))
        )
        case.args = dict(
            x=x,
            weight=weight,
            bias=bias,
            lora_a=lora_a,
            lora_b=lora_b,
            magnitude=magnitude,
            scale=scale,
            **options,
        )
        if rng.random() < 0.3:
            sq = (_logical_w(raw(weight), fan) ** 2).sum(1)
            case.args["weight_sq_norm"] = arrays.place(sq.astype(dtype), _layout(rng))
        for name, shape in (
            ("out", lead + (out_f,)),
            ("out_xa", lead + (rank,)),
            ("out_norm", (out_f,)),
        ):
            value = _request(rng, arrays, shape, dtype, optional=False)
            if value is not True or rng.random() < 0.5:
                case.args[name] = value
        r = rng.random()
        if r < 0.3:
            case.args["keep_base"] = True
        elif r < 0.5:
            value = _request(rng, arrays, lead + (out_f,), dtype)
            if value is not None and value is not False:
                case.args["out_base"] = value
        case.result_names = ("y", "xa", "base", "norm")

        def reference(s):
            f = s.get("fan_in_fan_out", False)
            w = _logical_w(s["weight"], f)
            sc = float(s["scale"])
            n, spread = _dora_norm_and_spread(
                w, s["lora_a"], s["lora_b"], sc, s.get("weight_sq_norm")
            )
            mask = mask_of(s)
            y, xa, base, _ = td.ref_linear(
                s["x"],
                s["weight"],
                s["bias"],
                s["lora_a"],
                s["lora_b"],
                s["magnitude"],
                sc,
                fan_in_fan_out=f,
                mask=mask,
                norm=n,
            )
            absolute = (
                _abs(s["x"]),
                _abs(s["weight"]),
                _abs(s["bias"]),
                _abs(s["lora_a"]),
                _abs(s["lora_b"]),
            )
            m_abs = _abs(s["magnitude"]) + _c_floor(case, n)
            _, bxa, bbase, _ = td.ref_linear(
                *absolute, m_abs, abs(sc), fan_in_fan_out=f, mask=mask, norm=n
            )
            by, _, _, _ = td.ref_linear(
                *absolute, m_abs * spread, abs(sc), fan_in_fan_out=f, norm=np.abs(n)
            )
            if mask is not None:
                # x·Wᵀ + bias + (c - 1)·xd·Wᵀ + c·lora: the |c - 1| <= c + 1 part and x·Wᵀ.
                xm = absolute[0].reshape(-1, w.shape[1])
                xd = xm * mask.reshape(xm.shape)
                extra = (xm + xd) @ np.abs(w).T
                c_b = m_abs * spread / np.abs(n)
                by = (
                    c_b
                    * (
                        xd @ np.abs(w).T
                        + abs(sc) * (bxa.reshape(len(xm), absolute[3].shape[0]) @ absolute[4].T)
                    )
                    + extra
                ).reshape(by.shape)
                if s["bias"] is not None:
                    by = by + absolute[2]
            wants_base = (
                bool(s.get("keep_base"))
                or s.get("out_base") is True
                or isinstance(s.get("out_base"), np.ndarray)
            )
            return {
                "y": (y, by, k),
                "xa": (xa, bxa, k),
                "base": (base, bbase, k) if wants_base else None,
                "norm": (n, (spread - 1) * np.abs(n), k),
            }
    else:
        grad_out = arrays.place(_values(rng, lead + (out_f,), dtype), _layout(rng))
        case.args = dict(
            grad_out=grad_out,
            x=x,
            weight=weight,
            lora_a=lora_a,
            lora_b=lora_b,
            magnitude=magnitude,
            norm=None,
            xa=None,
            base=None,
            scale=scale,
            **options,
        )
        shapes = dict(
            grad_x=lead + (in_f,),
            grad_lora_a=(rank, in_f),
            grad_lora_b=(out_f, rank),
            grad_magnitude=(out_f,),
            grad_bias=(out_f,),
        )
        for name, shape in shapes.items():
            if rng.random() < 0.6:
                case.args[name] = _request(rng, arrays, shape, dtype)
        drop_base = (
            case.args.get("grad_magnitude", True) is None
            or case.args.get("grad_magnitude", True) is False
        )
        drop_base = drop_base and rng.random() < 0.5
        case.notes["derive"] = lambda: _derive_dora_linear(case, drop_base)
        _derive_dora_linear(case, drop_base, layouts=True)
        case.result_names = ("x", "lora_a", "lora_b", "magnitude", "bias")
        case.requested_by = {
            "x": "grad_x",
            "lora_a": "grad_lora_a",
            "lora_b": "grad_lora_b",
            "magnitude": "grad_magnitude",
            "bias": "grad_bias",
        }
        case.notes["defaults"] = dict(
            grad_x=True, grad_lora_a=True, grad_lora_b=True, grad_magnitude=True, grad_bias=False
        )

        def reference(s):
            f = s.get("fan_in_fan_out", False)
            sc = float(s["scale"])
            mask = mask_of(s)
            args = (s["grad_out"], s["x"], s["weight"], s["lora_a"], s["lora_b"], s["magnitude"])
            grads = td.ref_linear_grads(*args, sc, fan_in_fan_out=f, mask=mask, norm=s["norm"])
            absolute = list(map(_abs, args))
            absolute[5] = absolute[5] + _c_floor(case, s["norm"])
            bounds = td.ref_linear_grads(
                *absolute, abs(sc), fan_in_fan_out=f, mask=mask, norm=_abs(s["norm"])
            )
            if mask is not None:
                g = _abs(s["grad_out"]).reshape(-1, bounds["bias"].shape[0])
                extra = (
                    2
                    * mask.reshape(-1, s["x"].shape[-1])
                    * (g @ np.abs(_logical_w(s["weight"], f)))
                )
                bounds["x"] = bounds["x"] + extra.reshape(bounds["x"].shape)
            return {n: (grads[n], bounds[n], k) for n in grads}

    case.reference = reference
    return case


def _derive_dora_linear(case, drop_base, layouts=False):
    """norm, xa and base of the backward from the forward's reference on the current x."""
    args, rng = case.args, case.arrays.rng
    if not all(
        isinstance(args.get(n), np.ndarray) and args[n].dtype.kind == "f"
        for n in ("x", "weight", "lora_a", "lora_b", "magnitude")
    ):
        return
    s = {k: raw(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    dtype = s["x"].dtype
    f = s.get("fan_in_fan_out", False)
    mask = _mask_for(s["x"], s.get("dropout", 0.0), s.get("seed", 0), s.get("offset", 0))
    with np.errstate(all="ignore"):
        _, xa, base, n = td.ref_linear(
            s["x"],
            s["weight"],
            None,
            s["lora_a"],
            s["lora_b"],
            s["magnitude"],
            float(s["scale"]),
            fan_in_fan_out=f,
            mask=mask,
        )
    for name, value in (("norm", n), ("xa", xa), ("base", base)):
        if name == "norm" and not layouts:
            continue  # a given norm is an input like any other
        if name == "base" and drop_base:
            args[name] = None
            continue
        layout = _layout(rng, KEEPING_LAYOUTS) if layouts else "c"
        args[name] = case.arrays.place(value.astype(dtype), layout)


def _dora_embedding(rng, entry, arrays):
    dtype = rng.choice(FLOATS)
    lead = _lead(rng, arrays)
    vocab, dim, rank = _size(rng, arrays, 10), _size(rng, arrays, 7), _size(rng, arrays, 5)
    indices = _indices(rng, arrays, lead, vocab)
    weight = arrays.place(_values(rng, (vocab, dim), dtype), _layout(rng))
    lora_a = arrays.place(_values(rng, (rank, vocab), dtype), _layout(rng))
    lora_b = arrays.place(_values(rng, (dim, rank), dtype), _layout(rng))
    magnitude = arrays.place((rng.random(dim) + 0.5).astype(dtype), _layout(rng))
    scale = float(rng.choice([0.5, 2.0, -1.25, 0.0, float(rng.standard_normal() * 4)]))
    dims = dict(N=int(np.prod(lead, dtype=np.int64)), V=vocab, D=dim, R=rank)
    k = _k(*dims.values())
    case = Case(0, 0, entry, {}, dims=dims, arrays=arrays)
    if entry == "dora_embedding_forward":
        case.args = dict(
            indices=indices,
            weight=weight,
            lora_a=lora_a,
            lora_b=lora_b,
            magnitude=magnitude,
            scale=scale,
        )
        if rng.random() < 0.3:
            sq = (raw(weight).astype(np.float64) ** 2).sum(0)
            case.args["weight_sq_norm"] = arrays.place(sq.astype(dtype), _layout(rng))
        for name, shape in (("out", lead + (dim,)), ("out_norm", (dim,))):
            value = _request(rng, arrays, shape, dtype, optional=False)
            if value is not True or rng.random() < 0.5:
                case.args[name] = value
        case.result_names = ("y", "norm")

        def reference(s):
            sc = float(s["scale"])
            n, spread = _dora_norm_and_spread(
                np.asarray(s["weight"], np.float64).T,
                s["lora_a"],
                s["lora_b"],
                sc,
                s.get("weight_sq_norm"),
            )
            y, _ = td.ref_embedding(
                s["indices"], s["weight"], s["lora_a"], s["lora_b"], s["magnitude"], sc, norm=n
            )
            by, _ = td.ref_embedding(
                s["indices"],
                _abs(s["weight"]),
                _abs(s["lora_a"]),
                _abs(s["lora_b"]),
                (_abs(s["magnitude"]) + _c_floor(case, n)) * spread,
                abs(sc),
                norm=np.abs(n),
            )
            return {"y": (y, by, k), "norm": (n, (spread - 1) * np.abs(n), k)}
    else:
        grad_out = arrays.place(_values(rng, lead + (dim,), dtype), _layout(rng))
        with np.errstate(all="ignore"):
            _, n = td.ref_embedding(
                np.zeros(0, np.int64), raw(weight), raw(lora_a), raw(lora_b), raw(magnitude), scale
            )
        norm = arrays.place(n.astype(dtype), _layout(rng))
        case.args = dict(
            grad_out=grad_out,
            indices=indices,
            weight=weight,
            lora_a=lora_a,
            lora_b=lora_b,
            magnitude=magnitude,
            norm=norm,
            scale=scale,
        )
        if rng.random() < 0.5:
            case.args["padding_idx"] = _padding_idx(rng, vocab)
        for name, shape in (
            ("grad_lora_a", (rank, vocab)),
            ("grad_lora_b", (dim, rank)),
            ("grad_magnitude", (dim,)),
        ):
            if rng.random() < 0.6:
                case.args[name] = _request(rng, arrays, shape, dtype)
        case.result_names = ("lora_a", "lora_b", "magnitude")
        case.requested_by = {
            "lora_a": "grad_lora_a",
            "lora_b": "grad_lora_b",
            "magnitude": "grad_magnitude",
        }
        case.notes["defaults"] = dict(grad_lora_a=True, grad_lora_b=True, grad_magnitude=True)

        def reference(s):
            sc = float(s["scale"])
            pad = s.get("padding_idx")
            pad = None if pad is None else int(pad)
            args = (
                s["grad_out"],
                s["indices"],
                s["weight"],
                s["lora_a"],
                s["lora_b"],
                s["magnitude"],
            )
            grads = td.ref_embedding_grads(*args, sc, padding_idx=pad, norm=s["norm"])
            absolute = [_abs(a) if a.dtype.kind == "f" else a for a in args]
            absolute[5] = absolute[5] + _c_floor(case, s["norm"])
            bounds = td.ref_embedding_grads(
                *absolute, abs(sc), padding_idx=pad, norm=_abs(s["norm"])
            )
            return {n: (grads[n], bounds[n], k) for n in grads}

    case.reference = reference
    return case


def _grouped(rng, entry, arrays):
    dtype = rng.choice(FLOATS)
    lead = _lead(rng, arrays)
    in_f, out_f = _size(rng, arrays, 10), _size(rng, arrays, 10)
    groups = int(rng.integers(1, 5))
    ranks = [int(r) for r in rng.integers(1, 5, groups)]
    scales = [
        float(rng.choice([0.5, 2.0, -1.25, 0.0, float(rng.standard_normal() * 4)])) for _ in ranks
    ]
    fan = bool(rng.random() < 0.3)
    p, seed, offset = _dropout(rng)
    x = arrays.place(_values(rng, lead + (in_f,), dtype), _layout(rng))
    wshape = (in_f, out_f) if fan else (out_f, in_f)
    weight = arrays.place(_values(rng, wshape, dtype), _layout(rng))
    lora_a = arrays.place(_values(rng, (sum(ranks), in_f), dtype), _layout(rng))
    lora_b = arrays.place(_values(rng, (out_f, sum(ranks)), dtype), _layout(rng))
    index_values = rng.integers(-1, groups, lead).astype(pick(rng, [np.int64, np.int32]))
    if rng.random() < 0.2:
        index_values = index_values.reshape(-1)
    index = arrays.place(index_values, _layout(rng, KEEPING_LAYOUTS))
    options = dict(fan_in_fan_out=fan, dropout=p, seed=seed, offset=offset)
    for name in ("fan_in_fan_out", "dropout", "seed", "offset"):
        if options[name] in (False, 0, 0.0) and rng.random() < 0.5:
            del options[name]
    dims = dict(M=int(np.prod(lead, dtype=np.int64)), IN=in_f, OUT=out_f, R=sum(ranks), G=groups)
    k = _k(*dims.values())
    case = Case(0, 0, entry, {}, dims=dims, arrays=arrays)

    def mask_of(s):
        return _mask_for(s["x"], s.get("dropout", 0.0), s.get("seed", 0), s.get("offset", 0))

    def grouped(s, absolute=False, grad_out=None):
        f = s.get("fan_in_fan_out", False)
        conv = _abs if absolute else (lambda v: v)
        scales = [abs(float(v)) if absolute else float(v) for v in s["scales"]]
        return tg.grouped_reference(
            conv(s["x"]),
            conv(s["weight"]),
            conv(s["bias"]),
            conv(s["lora_a"]),
            conv(s["lora_b"]),
            s["index"],
            [int(r) for r in s["ranks"]],
            scales,
            fan_in_fan_out=f,
            mask=mask_of(s),
            grad_out=conv(grad_out),
        )

    if entry == "lora_grouped_forward":
        bias = (
            None
            if rng.random() < 0.4
            else arrays.place(_values(rng, (out_f,), dtype), _layout(rng))
        )
        case.args = dict(
            x=x,
            weight=weight,
            bias=bias,
            lora_a=lora_a,
            lora_b=lora_b,
            index=index,
            ranks=ranks,
            scales=scales,
            **options,
        )
        for name, shape in (("out", lead + (out_f,)), ("out_xa", lead + (max(ranks),))):
            value = _request(rng, arrays, shape, dtype, optional=False)
            if value is not True or rng.random() < 0.5:
                case.args[name] = value
        case.result_names = ("y", "xa")

        def reference(s):
            y, xa = grouped(s)
            by, bxa = grouped(s, absolute=True)
            return {"y": (y, by, k), "xa": (xa, bxa, k)}
    else:
        grad_out = arrays.place(_values(rng, lead + (out_f,), dtype), _layout(rng))
        case.args = dict(
            grad_out=grad_out,
            x=x,
            weight=weight,
            lora_a=lora_a,
            lora_b=lora_b,
            xa=None,
            index=index,
            ranks=ranks,
            scales=scales,
            **options,
        )
        shapes = dict(
            grad_x=lead + (in_f,),
            grad_lora_a=lora_a.shape,
            grad_lora_b=lora_b.shape,
            grad_bias=(out_f,),
            grad_weight=wshape,
        )
        for name, shape in shapes.items():
            if rng.random() < 0.6:
                case.args[name] = _request(rng, arrays, shape, dtype)
        case.notes["derive"] = lambda: _derive_grouped_xa(case)
        _derive_grouped_xa(case, layout=_layout(rng, KEEPING_LAYOUTS))
        case.result_names = ("x", "lora_a", "lora_b", "bias", "weight")
        case.requested_by = {
            "x": "grad_x",
            "lora_a": "grad_lora_a",
            "lora_b": "grad_lora_b",
            "bias": "grad_bias",
            "weight": "grad_weight",
        }
        case.notes["defaults"] = dict(
            grad_x=True, grad_lora_a=True, grad_lora_b=True, grad_bias=False, grad_weight=False
        )

        def reference(s):
            s = dict(s, bias=None)
            grads = grouped(s, grad_out=s["grad_out"])
            bounds = grouped(s, absolute=True, grad_out=s["grad_out"])
            return {n: (grads[n], bounds[n], k) for n in grads}

    case.reference = reference
    return case


def _derive_grouped_xa(case, layout="c"):
    args = case.args
    if not all(
        isinstance(args.get(n), np.ndarray) and args[n].dtype.kind == "f"
        for n in ("x", "weight", "lora_a", "lora_b")
    ):
        return
    s = {k: raw(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    mask = _mask_for(s["x"], s.get("dropout", 0.0), s.get("seed", 0), s.get("offset", 0))
    with np.errstate(all="ignore"):
        _, xa = tg.grouped_reference(
            s["x"],
            s["weight"],
            None,
            s["lora_a"],
            s["lora_b"],
            s["index"],
            s["ranks"],
            s["scales"],
            fan_in_fan_out=s.get("fan_in_fan_out", False),
            mask=mask,
        )
    args["xa"] = case.arrays.place(xa.astype(s["x"].dtype), layout)


BUILDERS = {
    "lora_linear_forward": _lora_linear,
    "lora_linear_backward": _lora_linear,
    "lora_embedding_forward": _lora_embedding,
    "lora_embedding_backward": _lora_embedding,
    "ia3_linear_forward": _ia3_linear,
    "ia3_linear_backward": _ia3_linear,
    "ia3_embedding_forward": _ia3_embedding,
    "ia3_embedding_backward": _ia3_embedding,
    "dropout_mask": _dropout_mask,
    "dora_weight_sq_norm": _dora_norms,
    "dora_weight_norm": _dora_norms,
    "dora_linear_forward": _dora_linear,
    "dora_linear_backward": _dora_linear,
    "dora_embedding_forward": _dora_embedding,
    "dora_embedding_backward": _dora_embedding,
    "lora_grouped_forward": _grouped,
    "lora_grouped_backward": _grouped,
}
for _entry in ENTRIES:
    BUILDERS.setdefault(_entry, _merge)


# ---- mutations -------------------------------------------------------------------------------

# Axes of each argument that must agree with another argument (changing one makes the call
# invalid); "all" for every axis. Embedding vocabularies are free where nothing else has V.
TIED = {
    "lora_linear_forward": dict(
        x=[-1], weight="all", bias="all", lora_a="all", lora_b="all", out="all", out_xa="all"
    ),
    "lora_linear_backward": dict(
        grad_out="all",
        x="all",
        weight="all",
        lora_a="all",
        lora_b="all",
        xa="all",
        grad_x="all",
        grad_lora_a="all",
        grad_lora_b="all",
        grad_bias="all",
        grad_weight="all",
    ),
    "lora_embedding_forward": dict(weight="all", lora_a="all", lora_b="all", out="all"),
    "lora_embedding_backward": dict(
        grad_out="all",
        indices="all",
        lora_a=[0],
        lora_b="all",
        grad_lora_a="all",
        grad_lora_b="all",
        grad_weight="all",
    ),
    "ia3_linear_forward": dict(
        x=[-1], weight="all", bias="all", ia3_l="all", out="all", out_base="all"
    ),
    "ia3_linear_backward": dict(
        grad_out="all",
        x="all",
        weight="all",
        ia3_l="all",
        base="all",
        grad_x="all",
        grad_ia3_l="all",
        grad_bias="all",
        grad_weight="all",
    ),
    "ia3_embedding_forward": dict(weight=[1], ia3_l="all", out="all"),
    "ia3_embedding_backward": dict(
        grad_out="all", indices="all", weight=[1], ia3_l="all", grad_ia3_l="all", grad_weight="all"
    ),
    "lora_merge": dict(weight="all", lora_a="all", lora_b="all"),
    "lora_unmerge": dict(weight="all", lora_a="all", lora_b="all"),
    "lora_embedding_merge": dict(weight="all", lora_a="all", lora_b="all"),
    "lora_embedding_unmerge": dict(weight="all", lora_a="all", lora_b="all"),
    "ia3_merge": dict(weight="all", ia3_l="all", bias="all"),
    "ia3_unmerge": dict(weight="all", ia3_l="all", bias="all"),
    "ia3_embedding_merge": dict(weight="all", ia3_l="all"),
    "ia3_embedding_unmerge": dict(weight="all", ia3_l="all"),
    "dropout_mask": {},
    "dora_weight_sq_norm": dict(out="all"),
    "dora_weight_norm": dict(
        weight="all", lora_a="all", lora_b="all", weight_sq_norm="all", out="all"
    ),
    "dora_linear_forward": dict(
        x=[-1],
        weight="all",
        bias="all",
        lora_a="all",
        lora_b="all",
        magnitude="all",
        weight_sq_norm="all",
        out="all",
        out_xa="all",
        out_base="all",
        out_norm="all",
    ),
    "dora_linear_backward": dict(
        grad_out="all",
        x="all",
        weight="all",
        lora_a="all",
        lora_b="all",
        magnitude="all",
        norm="all",
        xa="all",
        base="all",
        grad_x="all",
        grad_lora_a="all",
        grad_lora_b="all",
        grad_magnitude="all",
        grad_bias="all",
    ),
    "dora_embedding_forward": dict(
        weight="all",
        lora_a="all",
        lora_b="all",
        magnitude="all",
        weight_sq_norm="all",
        out="all",
        out_norm="all",
    ),
    "dora_embedding_backward": dict(
        grad_out="all",
        indices="all",
        weight="all",
        lora_a="all",
        lora_b="all",
        magnitude="all",
        norm="all",
        grad_lora_a="all",
        grad_lora_b="all",
        grad_magnitude="all",
    ),
    "lora_grouped_forward": dict(
        x=[-1],
        weight="all",
        bias="all",
        lora_a="all",
        lora_b="all",
        index="all",
        out="all",
        out_xa="all",
    ),
    "lora_grouped_backward": dict(
        grad_out="all",
        x="all",
        weight="all",
        lora_a="all",
        lora_b="all",
        xa="all",
        index="all",
        grad_x="all",
        grad_lora_a="all",
        grad_lora_b="all",
        grad_bias="all",
        grad_weight="all",
    ),
}
ACTIVATIONS = {
    "x",
    "grad_out",
    "xa",
    "base",
    "indices",
    "out",
    "out_xa",
    "out_base",
    "grad_x",
    "index",
}
OUTPUT_NAMES = {
    "out",
    "out_xa",
    "out_base",
    "out_norm",
    "grad_magnitude",
    "grad_x",
    "grad_lora_a",
    "grad_lora_b",
    "grad_bias",
    "grad_weight",
    "grad_ia3_l",
}
OPTIONAL_INPUTS = {"bias", "base"}
RECORD_NAMES = {"record", "records"}
MUTATIONS = (
    "type",
    "dtype",
    "shape",
    "ndim",
    "scalar",
    "indices",
    "alias_output",
    "overlapping_outputs",
    "readonly_output",
    "output_layout",
    "shared_inputs",
    "nonfinite",
    "extreme",
    "odd_layout",
    "huge",
    "hostile",
    "int_types",
    "record",
    "flags",
    "zero_dim",
)


def is_in_place_target(case, name):
    """Merges write their weight (and an output-scaled IA3 bias) in place."""
    if case.entry.endswith("merge") and name == "weight":
        return True
    return (
        case.entry in ("ia3_merge", "ia3_unmerge")
        and name == "bias"
        and isinstance(as_numpy(case.args.get("bias")), np.ndarray)
        and not case.args.get("feedforward", False)
    )


def array_inputs(case, floats_only=False):
    names = []
    for name, value in case.args.items():
        if (
            isinstance(value, np.ndarray)
            and name not in OUTPUT_NAMES
            and not (floats_only and value.dtype.kind != "f")
        ):
            names.append(name)
    return names


def output_slots(case):
    """Names of outputs this entry accepts."""
    slots = {
        "lora_linear_forward": ["out", "out_xa"],
        "lora_linear_backward": [
            "grad_x",
            "grad_lora_a",
            "grad_lora_b",
            "grad_bias",
            "grad_weight",
        ],
        "lora_embedding_forward": ["out"],
        "lora_embedding_backward": ["grad_lora_a", "grad_lora_b", "grad_weight"],
        "ia3_linear_forward": ["out"] + ([] if case.args.get("feedforward") else ["out_base"]),
        "ia3_linear_backward": ["grad_x", "grad_ia3_l", "grad_bias", "grad_weight"],
        "ia3_embedding_forward": ["out"],
        "ia3_embedding_backward": ["grad_ia3_l", "grad_weight"],
        "dora_weight_sq_norm": ["out"],
        "dora_weight_norm": ["out"],
        "dora_linear_forward": ["out", "out_xa", "out_base", "out_norm"],
        "dora_linear_backward": [
            "grad_x",
            "grad_lora_a",
            "grad_lora_b",
            "grad_magnitude",
            "grad_bias",
        ],
        "dora_embedding_forward": ["out", "out_norm"],
        "dora_embedding_backward": ["grad_lora_a", "grad_lora_b", "grad_magnitude"],
        "lora_grouped_forward": ["out", "out_xa"],
        "lora_grouped_backward": [
            "grad_x",
            "grad_lora_a",
            "grad_lora_b",
            "grad_bias",
            "grad_weight",
        ],
    }
    return slots.get(case.entry, [])


def output_shape(case, slot):
    """The shape an output slot must have, from the (valid) arguments."""
    a = case.args
    fan = a.get("fan_in_fan_out", False)
    e = case.entry
    if e.startswith(("dora", "lora_grouped")):
        return _new_output_shape(case, slot)
    if e.startswith("lora_linear"):
        w = a["weight"].shape
        out_f = w[1] if fan else w[0]
        x = a["x"].shape
        return {
            "out": x[:-1] + (out_f,),
            "out_xa": x[:-1] + (a["lora_a"].shape[0],),
            "grad_x": x,
            "grad_lora_a": a["lora_a"].shape,
            "grad_lora_b": a["lora_b"].shape,
            "grad_bias": (out_f,),
            "grad_weight": w,
        }[slot]
    if e.startswith("ia3_linear"):
        w = a["weight"].shape
        out_f = w[1] if fan else w[0]
        x = a["x"].shape
        return {
            "out": x[:-1] + (out_f,),
            "out_base": x[:-1] + (out_f,),
            "grad_x": x,
            "grad_ia3_l": a["ia3_l"].shape,
            "grad_bias": (out_f,),
            "grad_weight": w,
        }[slot]
    if e == "lora_embedding_forward":
        return a["indices"].shape + (a["weight"].shape[1],)
    if e == "lora_embedding_backward":
        return {
            "grad_lora_a": a["lora_a"].shape,
            "grad_lora_b": a["lora_b"].shape,
            "grad_weight": (a["lora_a"].shape[1], a["lora_b"].shape[0]),
        }[slot]
    if e == "ia3_embedding_forward":
        return a["indices"].shape + (a["weight"].shape[1],)
    return {"grad_ia3_l": a["ia3_l"].shape, "grad_weight": a["weight"].shape}[slot]


def _new_output_shape(case, slot):
    a, e = case.args, case.entry
    fan = a.get("fan_in_fan_out", False)
    w = a["weight"].shape
    if e == "dora_embedding_forward":
        return {"out": a["indices"].shape + (w[1],), "out_norm": (w[1],)}[slot]
    if e == "dora_embedding_backward":
        return {
            "grad_lora_a": a["lora_a"].shape,
            "grad_lora_b": a["lora_b"].shape,
            "grad_magnitude": a["magnitude"].shape,
        }[slot]
    out_f = w[1] if fan else w[0]
    if e.startswith("dora_weight"):
        return (out_f,)
    x = a["x"].shape
    xa_width = (
        max(int(r) for r in a["ranks"]) if e.startswith("lora_grouped") else a["lora_a"].shape[0]
    )
    return {
        "out": x[:-1] + (out_f,),
        "out_xa": x[:-1] + (xa_width,),
        "out_base": x[:-1] + (out_f,),
        "out_norm": (out_f,),
        "grad_x": x,
        "grad_lora_a": a["lora_a"].shape,
        "grad_lora_b": a["lora_b"].shape,
        "grad_magnitude": (out_f,),
        "grad_bias": (out_f,),
        "grad_weight": w,
    }[slot]


def float_dtype(case):
    for name in ("x", "weight", "grad_out", "lora_a"):
        v = as_numpy(case.args.get(name))
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            return v.dtype.newbyteorder("=")
    return None


def _reshape_like(arrays, value, shape):
    values = np.resize(np.asarray(value), shape) if np.prod(shape) else np.zeros(shape, value.dtype)
    return arrays.place(values.astype(value.dtype), "c")


def mutate(rng, case, kind):
    """Apply one change of the given kind; returns False when it does not apply to the case."""
    args, arrays, e = case.args, case.arrays, case.entry
    dtype = float_dtype(case)
    inputs = array_inputs(case)
    float_inputs = array_inputs(case, floats_only=True)

    if kind == "type":
        required = [
            n
            for n in POSITIONAL[e]
            if n not in OPTIONAL_INPUTS | RECORD_NAMES and isinstance(args.get(n), np.ndarray)
        ]
        targets = required + [n for n in OUTPUT_NAMES if isinstance(args.get(n), np.ndarray)]
        if e == "dropout_mask":
            args["shape"] = [object(), "3,4", 3.5, None, {"a": 1}][int(rng.integers(5))]
            case.expect, case.mutation = "invalid", f"type:shape={args['shape']!r}"
            return True
        if not targets:
            return False
        name = str(rng.choice(targets))
        bad = [object(), "not an array", 3.5, [[1.0, 2.0]], b"bytes", {"x": 1}, 1j]
        args[name] = bad[int(rng.integers(len(bad)))]
        case.expect, case.mutation = "invalid", f"type:{name}={type(args[name]).__name__}"
        return True

    if kind == "dtype":
        if e == "dropout_mask":
            args["dtype"] = ["int32", "float16", "bogus", None, object(), np.int64, "complex64"][
                int(rng.integers(7))
            ]
            case.expect, case.mutation = "invalid", f"dtype:dtype={args['dtype']!r}"
            return True
        targets = inputs + [n for n in OUTPUT_NAMES if isinstance(args.get(n), np.ndarray)]
        if not targets:
            return False
        name = str(rng.choice(targets))
        value = args[name]
        if value.dtype.kind == "i":
            new = [
                np.float32,
                np.float64,
                np.int16,
                np.uint8,
                np.bool_,
                np.uint64,
                np.int8,
                np.uint32,
            ][int(rng.integers(8))]
        else:
            other = np.float64 if value.dtype == np.float32 else np.float32
            new = [other, np.float16, np.int32, np.int64, np.complex64, np.bool_, np.uint8][
                int(rng.integers(7))
            ]
        args[name] = arrays.place(raw(value).astype(new), "c")
        case.expect, case.mutation = "invalid", f"dtype:{name}->{np.dtype(new).name}"
        if (
            e == "dora_weight_sq_norm"
            and new in FLOATS
            and not isinstance(args.get("out"), np.ndarray)
        ):
            case.expect = "valid"  # the weight alone decides the dtype
        return True

    if kind == "shape":
        tied = TIED[e]
        targets = [n for n in tied if isinstance(args.get(n), np.ndarray) and args[n].ndim]
        if not targets:
            return False
        name = str(rng.choice(targets))
        value = args[name]
        axes = (
            list(range(value.ndim)) if tied[name] == "all" else [a % value.ndim for a in tied[name]]
        )
        axis = int(rng.choice(axes))
        shape = list(value.shape)
        delta = int(rng.choice([-1, 1, 2, 5]))
        if shape[axis] + delta < 0:
            delta = 1
        shape[axis] += delta
        args[name] = _reshape_like(arrays, value, tuple(shape))
        # index (the grouped op) has one entry per row: every axis of it is a row axis.
        leading = name in ACTIVATIONS and (axis < value.ndim - 1 or name == "index")
        others_empty = math.prod(s for i, s in enumerate(value.shape) if i != axis) == 0
        case.expect = "either" if leading and others_empty else "invalid"
        if name == "weight" and e.startswith("ia3"):
            # Which weight axes must agree depends on the mode, the bias and the outputs: let
            # the reference judge a call that returns.
            case.expect = "either"
            case.notes["unmerged_weight"] = None
        case.mutation = f"shape:{name}{value.shape}->{tuple(shape)}"
        return True

    if kind == "ndim":
        targets = [
            n for n in inputs + [o for o in OUTPUT_NAMES if isinstance(args.get(o), np.ndarray)]
        ]
        if not targets:
            return False
        name = str(rng.choice(targets))
        value = args[name]
        if rng.random() < 0.5 or value.ndim < 2:
            pos = int(rng.integers(value.ndim + 1))
            shape = value.shape[:pos] + (1,) + value.shape[pos:]
        else:
            shape = (int(np.prod(value.shape)),)
        args[name] = arrays.place(raw(value).reshape(shape), "c")
        fixed = name not in ACTIVATIONS and not (
            name in ("ia3_l", "grad_ia3_l") and (len(shape) <= 2)
        )
        case.expect = "invalid" if fixed else "either"
        case.mutation = f"ndim:{name}{value.shape}->{shape}"
        return True

    if kind == "scalar":
        choices = []
        if "scale" in POSITIONAL[e]:
            choices.append(("scale", [math.nan, math.inf, -math.inf, "1.0", None, [1.0], 1 + 1j]))
        if e.startswith(("lora_linear", "dora_linear", "lora_grouped")):
            choices.append(("dropout", [-0.1, 1.0001, math.nan, math.inf, "0.5", None]))
            choices.append(("seed", [-1, 2**64, 1.5, "1", 2**80]))
            choices.append(("offset", [-1, 2**64 + 5, 0.0, "7", -(2**70)]))
        if e.startswith("lora_grouped"):
            g = len(args["ranks"])
            choices.append(
                (
                    "ranks",
                    [
                        [],
                        [0] * g,
                        [-1] + args["ranks"][1:],
                        args["ranks"] + [1],
                        [1.5] * g,
                        "12",
                        None,
                        3,
                    ],
                )
            )
            choices.append(
                (
                    "scales",
                    [
                        [math.nan] * g,
                        [math.inf] + args["scales"][1:],
                        args["scales"][:-1],
                        ["1"] * g,
                        None,
                        2.0,
                    ],
                )
            )
        if e == "dora_embedding_backward":
            vocab = args["weight"].shape[0]
            choices.append(("padding_idx", [vocab, -vocab - 1, 2**70, 1.5, "0", -(2**63)]))
        if e in ("lora_embedding_forward", "lora_embedding_backward", "ia3_embedding_backward"):
            vocab = (
                args["weight"].shape[0]
                if "weight" in args and e != "lora_embedding_backward"
                else args["lora_a"].shape[1]
            )
            choices.append(("padding_idx", [vocab, -vocab - 1, 2**70, 1.5, "0", -(2**63)]))
        if e in ("lora_linear_forward", "lora_linear_backward", "lora_merge", "lora_unmerge"):
            out_f = output_groups_out(case)
            bad = [[], [False], 3, "TF", [True] * (out_f + 1), [True] * 65, [None]]
            choices.append(("enable_lora", bad))
        if e != "dropout_mask":
            choices.append(("stream", [-1, 2**64, 2**70, "0", 1.5, object()]))
        if e == "dropout_mask":
            choices.append(("p", [-0.5, 1.5, math.nan, "0.5", None]))
            choices.append(("seed", [-3, 2**64, 2.0]))
            choices.append(("offset", [-3, 2**64, 1.0]))
            choices.append(("shape", [(2.7, 3), (-1, 4), (3, -2), ("a",)]))
        if not choices:
            return False
        name, values = choices[int(rng.integers(len(choices)))]
        value = values[int(rng.integers(len(values)))]
        if (
            name == "enable_lora"
            and isinstance(value, list)
            and len(value) > 1
            and value[0] is True
        ):
            if output_groups_out(case) % len(value) == 0:
                return False  # would be a valid grouping of another size
        args[name] = value
        case.expect, case.mutation = "invalid", f"scalar:{name}={value!r}"
        return True

    if kind == "indices" and e.startswith("lora_grouped"):
        if args["index"].size == 0:
            return False
        value = raw(args["index"])
        groups = len(args["ranks"])
        bad = [groups, -2, groups + 1000, np.iinfo(value.dtype).max, np.iinfo(value.dtype).min]
        flat = value.reshape(-1)
        flat[int(rng.integers(flat.size))] = bad[int(rng.integers(len(bad)))]
        args["index"] = arrays.place(flat.reshape(value.shape), _layout(rng, KEEPING_LAYOUTS))
        case.expect, case.mutation = "invalid", "indices:out_of_range"
        return True

    if kind == "indices":
        if "indices" not in args or args["indices"].size == 0:
            return False
        value = raw(args["indices"])
        vocab = (
            args["lora_a"].shape[1] if e == "lora_embedding_backward" else args["weight"].shape[0]
        )
        info = np.iinfo(value.dtype)
        bad = [vocab, -1, vocab + 1000, info.max, info.min]
        if value.dtype == np.int64:
            bad += [2**40, 2**32 + 1, -(2**63)]
        flat = value.reshape(-1)
        flat[int(rng.integers(flat.size))] = bad[int(rng.integers(len(bad)))]
        args["indices"] = arrays.place(flat.reshape(value.shape), _layout(rng, KEEPING_LAYOUTS))
        case.expect, case.mutation = "invalid", "indices:out_of_range"
        return True

    if kind in ("alias_output", "overlapping_outputs"):
        slots = output_slots(case)
        if e.endswith("merge"):
            # The in-place target shares memory with another argument.
            others = [n for n in inputs if n != "weight" and args[n].dtype == args["weight"].dtype]
            if not others:
                return False
            other = str(rng.choice(others))
            weight_values, other_values = raw(args["weight"]), raw(args[other])
            if weight_values.size == 0 or other_values.size == 0:
                return False
            args["weight"], args[other] = overlapping_pair(rng, weight_values, other_values)
            case.expect, case.mutation = "invalid", f"alias_output:weight~{other}"
            if e.endswith("unmerge"):
                case.notes["unmerged_weight"] = None
            return True
        if not slots or dtype is None:
            return False
        slot = str(rng.choice(slots))
        shape = output_shape(case, slot)
        if kind == "alias_output":
            partners = [n for n in float_inputs if args[n].dtype == dtype]
        else:
            partners = [s for s in slots if s != slot]
        if not partners or math.prod(shape) == 0:
            return False
        partner = str(rng.choice(partners))
        if kind == "overlapping_outputs":
            pshape = output_shape(case, partner)
            if math.prod(pshape) == 0:
                return False
            a, b = overlapping_pair(
                rng, np.full(shape, -7.25, dtype), np.full(pshape, -7.25, dtype)
            )
            args[slot], args[partner] = a, b
        else:
            pvalues = raw(args[partner])
            if pvalues.size == 0:
                return False
            args[slot], args[partner] = overlapping_pair(rng, np.full(shape, -7.25, dtype), pvalues)
        case.expect, case.mutation = "invalid", f"{kind}:{slot}~{partner}"
        return True

    if kind == "readonly_output":
        slots = output_slots(case)
        if e.endswith("merge"):
            value = args["weight"]
            ro = arrays.place(
                raw(value),
                "readonly"
                if rng.random() < 0.5
                else "broadcast"
                if value.size and min(value.shape) == 1
                else "readonly",
            )
            args["weight"] = ro
            case.expect, case.mutation = "invalid", "readonly_output:weight"
            if e.endswith("unmerge"):
                case.notes["unmerged_weight"] = None
            return True
        if not slots or dtype is None:
            return False
        slot = str(rng.choice(slots))
        args[slot] = arrays.place(np.full(output_shape(case, slot), -7.25, dtype), "readonly")
        case.expect, case.mutation = "invalid", f"readonly_output:{slot}"
        return True

    if kind == "output_layout":
        slots = output_slots(case)
        layout = str(rng.choice(OUTPUT_LAYOUTS_OTHER))
        if e.endswith("merge"):
            if e.endswith("unmerge"):
                return False
            args["weight"] = arrays.place(raw(args["weight"]), layout)
        else:
            if not slots or dtype is None:
                return False
            slot = str(rng.choice(slots))
            args[slot] = arrays.place(np.full(output_shape(case, slot), math.nan, dtype), layout)
        case.expect, case.mutation = "either", f"output_layout:{layout}"
        if layout == "overlapping_self":
            case.expect = "either"
        return True

    if kind == "shared_inputs":
        derived = ("xa", "base", "norm", "index")
        pairs = [
            (a, b)
            for a in float_inputs
            for b in float_inputs
            if a < b
            and a not in derived
            and b not in derived
            and args[a].shape == args[b].shape
            and args[a].dtype == args[b].dtype
            and not is_in_place_target(case, a)
            and not is_in_place_target(case, b)
        ]
        if not pairs:
            return False
        a, b = pairs[int(rng.integers(len(pairs)))]
        args[b] = args[a]
        case.expect, case.mutation = "valid", f"shared_inputs:{a}=={b}"
        case.notes["rederive"] = True
        return True

    if e.endswith("unmerge") and kind in ("odd_layout", "zero_dim"):
        float_inputs = [n for n in float_inputs if not is_in_place_target(case, n)]
        inputs = [n for n in inputs if not is_in_place_target(case, n)]

    def relayout(name):
        return _layout(rng, MERGE_LAYOUTS) if is_in_place_target(case, name) else _layout(rng)

    if kind == "nonfinite":
        if not float_inputs:
            return False
        for name in rng.choice(float_inputs, size=min(2, len(float_inputs)), replace=False):
            values = raw(args[name])
            if values.size == 0:
                continue
            flat = values.reshape(-1)
            for _ in range(int(rng.integers(1, 3))):
                flat[int(rng.integers(flat.size))] = [math.nan, math.inf, -math.inf][
                    int(rng.integers(3))
                ]
            args[name] = arrays.place(values, relayout(name))
        case.expect, case.mutation = "valid", "nonfinite"
        case.notes["rederive"] = True
        return True

    if kind == "extreme":
        if not float_inputs:
            return False
        name = str(rng.choice(float_inputs))
        exponent = int(rng.choice([-30, -20, -15, 15, 20, 30]))
        if dtype == np.float64:
            exponent *= 10
        args[name] = arrays.place(
            raw(args[name]) * np.asarray(10.0**exponent).astype(args[name].dtype), relayout(name)
        )
        if "scale" in args and rng.random() < 0.5:
            args["scale"] = float(10.0**-exponent)
        case.expect, case.mutation = "valid", f"extreme:{name}*1e{exponent}"
        case.notes["rederive"] = True
        return True

    if kind == "odd_layout":
        if not inputs:
            return False
        name = str(rng.choice(inputs))
        if is_in_place_target(case, name) and e.endswith("unmerge"):
            return False
        layout = str(rng.choice(["unaligned", "byteswapped", "size1_huge"]))
        args[name] = arrays.place(raw(args[name]), layout)
        case.expect, case.mutation = "either", f"odd_layout:{name}:{layout}"
        return True

    if kind == "huge":
        return mutate_huge(rng, case)

    if kind == "hostile":
        return mutate_hostile(rng, case)

    if kind == "int_types":
        names = [
            n for n in ("seed", "offset", "padding_idx") if n in args and isinstance(args[n], int)
        ]
        if e == "dropout_mask":
            names.append("shape")
        if not names:
            return False
        name = str(rng.choice(names))
        if name == "shape":
            args["shape"] = tuple(np.int64(n) for n in args["shape"])
        else:
            value = args[name]
            itype = (
                np.uint64
                if value >= 2**63
                else [np.int64, np.uint64, np.int32][int(rng.integers(3))]
            )
            if itype == np.int32 and not -(2**31) <= value < 2**31:
                itype = np.int64
            if itype == np.uint64 and value < 0:
                itype = np.int64
            args[name] = itype(value)
        case.expect, case.mutation = "valid", f"int_types:{name}"
        return True

    if kind == "record":
        if not e.endswith("unmerge"):
            return False
        key = "records" if e == "ia3_unmerge" else "record"
        record = args[key][0] if e == "ia3_unmerge" else args[key]
        index, value = record
        size = args["weight"].size
        choice = int(rng.integers(8))
        if choice == 0:
            new = None if rng.random() < 0.5 else [index, value]
        elif choice == 1:
            new = type(record)(np.array([size + 3], np.int64), np.zeros(1, value.dtype))
        elif choice == 2:
            new = type(record)(np.array([-1], np.int64), np.zeros(1, value.dtype))
        elif choice == 3:
            other = np.float64 if value.dtype == np.float32 else np.float32
            new = type(record)(index, value.astype(other))
        elif choice == 4:
            new = type(record)(np.concatenate([index, [0]]).astype(np.int64), value)
        elif choice == 5:
            new = type(record)(index.astype(np.float64), value)
        elif choice == 6:
            new = (index, value, value)
        else:
            new = type(record)(
                index.reshape(-1, 1) if index.size else np.zeros((1, 1), np.int64), value
            )
        args[key] = (new, args[key][1]) if e == "ia3_unmerge" and rng.random() < 0.8 else new
        case.expect, case.mutation = "invalid", f"record:{choice}"
        return True

    if kind == "flags":
        flags = [
            n
            for n in ("fan_in_fan_out", "feedforward", "keep_base")
            if n
            in {
                "lora_linear_forward": ("fan_in_fan_out",),
                "lora_linear_backward": ("fan_in_fan_out",),
                "ia3_linear_forward": ("fan_in_fan_out", "feedforward", "keep_base"),
                "ia3_linear_backward": ("fan_in_fan_out", "feedforward"),
                "lora_merge": ("fan_in_fan_out",),
                "ia3_merge": ("fan_in_fan_out", "feedforward"),
                "dora_weight_sq_norm": ("fan_in_fan_out",),
                "dora_weight_norm": ("fan_in_fan_out",),
                "dora_linear_forward": ("fan_in_fan_out", "keep_base"),
                "dora_linear_backward": ("fan_in_fan_out",),
                "lora_grouped_forward": ("fan_in_fan_out",),
                "lora_grouped_backward": ("fan_in_fan_out",),
            }.get(e, ())
        ]
        if not flags:
            return False
        name = str(rng.choice(flags))
        args[name] = not args.get(name, False)
        case.expect, case.mutation = "either", f"flags:{name}={args[name]}"
        case.notes["rederive"] = True
        return True

    if kind == "zero_dim":
        targets = [n for n in inputs if args[n].ndim and args[n].dtype.kind == "f"]
        if not targets:
            return False
        name = str(rng.choice(targets))
        value = args[name]
        axis = int(rng.integers(value.ndim))
        shape = list(value.shape)
        shape[axis] = 0
        args[name] = arrays.place(np.zeros(shape, value.dtype), relayout(name))
        case.expect, case.mutation = "either", f"zero_dim:{name}{value.shape}->{tuple(shape)}"
        if e.endswith("unmerge") and name == "weight":
            case.notes["unmerged_weight"] = None
        return True
    raise ValueError(kind)


def output_groups_out(case):
    w = case.args["weight"].shape
    return w[1] if case.args.get("fan_in_fan_out") else w[0]


def overlapping_pair(rng, first_values, second_values):
    """Two writeable views of one buffer that share at least one element."""
    n1, n2 = first_values.size, second_values.size
    shift = int(rng.integers(0, n1))
    storage = np.full(max(n1, shift + n2) + 4, SENTINEL, first_values.dtype)
    first = storage[2 : 2 + n1].reshape(first_values.shape)
    second = storage[2 + shift : 2 + shift + n2].reshape(second_values.shape)
    second[...] = second_values
    if shift >= 0:
        # The first array's values win where the two overlap; it is written last.
        first[...] = first_values
    return first, second


def mutate_huge(rng, case):
    """Dimensions far beyond memory, made of stride-0 views (nothing large is allocated). Every
    compact copy or output such a call could make is at least 2**36 elements, far more than
    this machine can allocate, so a cpeft that copies fails at once instead of thrashing; the
    32-bit BLAS range is reached without memory by the ``size1_huge`` layout."""
    args, e = case.args, case.entry
    rows = pick(rng, [2**36, 2**40, 2**44])
    if e == "dropout_mask":
        args["shape"] = [(rows, 2**10), (2**33 + 5, 3), (2**62, 4), (2**40, 2**40)][
            int(rng.integers(4))
        ]
        case.expect, case.mutation = "either", f"huge:shape={args['shape']}"
        return True
    if e in ("lora_linear_forward", "ia3_linear_forward", "dora_linear_forward"):
        x = args["x"]
        row = raw(x).reshape(-1, x.shape[-1])[:1] if x.size else np.ones((1, x.shape[-1]), x.dtype)
        args["x"] = np.broadcast_to(row, (rows, x.shape[-1]))
        for slot in output_slots(case):
            if isinstance(args.get(slot), np.ndarray):
                args[slot] = True
        case.expect, case.mutation = "either", f"huge:x_rows={rows}"
        return True
    if e in ("lora_embedding_forward", "ia3_embedding_forward", "dora_embedding_forward"):
        if rng.random() < 0.5 or e == "dora_embedding_forward":
            idx = args["indices"]
            args["indices"] = np.broadcast_to(np.zeros(1, idx.dtype), (rows,))
            if isinstance(args.get("out"), np.ndarray):
                args["out"] = True
            case.expect, case.mutation = "either", f"huge:indices={rows}"
            return True
        vocab = pick(rng, [2**38 + 5, 2**40])
        w = raw(args["weight"])
        args["weight"] = np.broadcast_to(w[:1], (vocab, w.shape[1]))
        if e == "lora_embedding_forward":
            a = raw(args["lora_a"])
            args["lora_a"] = np.broadcast_to(a[:, :1], (a.shape[0], vocab))
        idx = raw(args["indices"]).astype(np.int64)
        if idx.size:
            idx.reshape(-1)[0] = vocab - 1
        args["indices"] = case.arrays.place(idx, "c")
        case.expect, case.mutation = "either", f"huge:vocab={vocab}"
        return True
    return False


def mutate_hostile(rng, case):
    """An argument whose __bool__/__float__/__index__ resizes an input array while cpeft
    converts the arguments (issue 12, defect 2)."""
    args, e = case.args, case.entry
    victims = [
        n
        for n in array_inputs(case, floats_only=True)
        if not is_in_place_target(case, n) and args[n].size
    ]
    slots = []
    if "scale" in POSITIONAL[e]:
        slots.append("scale")
    if e.startswith(("lora_linear", "dora_linear", "lora_grouped")):
        slots += ["dropout", "seed", "offset"]
    if e.startswith("lora_grouped"):
        slots += ["ranks", "scales"]
    if (
        e in ("lora_linear_forward", "lora_linear_backward", "lora_merge", "lora_unmerge")
        and args.get("enable_lora") is not None
    ):
        slots.append("enable_lora")
    if "padding_idx" in args:
        slots.append("padding_idx")
    if not victims or not slots:
        return False
    victim_name = str(rng.choice(victims))
    victim = np.array(args[victim_name], copy=True, order="C")
    args[victim_name] = victim
    slot = str(rng.choice(slots))
    if slot in ("enable_lora", "ranks", "scales"):
        items = list(args[slot])
        k = int(rng.integers(len(items)))
        items[k] = Hostile(victim, items[k])
        args[slot] = items
    else:
        default = {"scale": 1.0, "dropout": 0.0, "seed": 0, "offset": 0}.get(slot)
        args[slot] = Hostile(victim, args.get(slot, default))
    case.expect, case.mutation = "hostile", f"hostile:{slot} resizes {victim_name}"
    case.notes["victim"] = victim_name
    return True


LARGE_SHARE = 0.1


def make_case(seed, index, mutation=None, torch=None):
    """Case ``index`` of stream ``seed``; ``mutation`` forces one kind (None: chosen by chance;
    "none": the unchanged valid case); ``torch`` forces torch tensors on or off (None: by
    chance)."""
    rng = np.random.default_rng([seed, index])
    entry = ENTRIES[index % len(ENTRIES)]
    arrays = Arrays(rng, large=rng.random() < LARGE_SHARE)
    case = BUILDERS[entry](rng, entry, arrays)
    case.seed, case.index = seed, index
    if mutation is None:
        mutation = "none" if rng.random() < 0.35 else str(rng.choice(MUTATIONS))
    unmerge = entry.endswith("unmerge")
    if unmerge and mutation not in BEFORE_MERGE:
        merge_first(case)
    if mutation != "none":
        for _ in range(4):
            if unmerge and (mutation in BEFORE_MERGE) != (
                "records" not in case.args and "record" not in case.args
            ):
                mutation = str(rng.choice(MUTATIONS))
                continue
            if mutate(rng, case, mutation):
                break
            mutation = str(rng.choice(MUTATIONS))
    if unmerge and "record" not in case.args and "records" not in case.args:
        merge_first(case)
    rederive_dependents(case)
    if case.expect == "valid" and _dropout_wraps(case):
        case.expect = "either"
        case.mutation += "+offset_wraps"
    wants_torch = rng.random() < TORCH_SHARE if torch is None else torch
    if wants_torch and case.expect != "hostile" and not case.mutation.startswith("huge"):
        as_torch_tensors(rng, case)
    return case


TORCH_SHARE = 0.15


def as_torch_tensors(rng, case):
    """Hand most array arguments over as torch tensors sharing their memory (the DLPack path;
    empty ones as fresh torch tensors, which may have a null data pointer); the rest stay NumPy,
    so calls mix frameworks. Arrays torch cannot view (negative strides, byte-swapped) stay
    NumPy too."""
    try:
        import torch
    except ImportError:
        return
    kept = case.notes.setdefault("numpy_views", [])
    converted = False
    mixed = rng.random() < 0.3
    for name, value in list(case.args.items()):
        if name in RECORD_NAMES or not isinstance(value, np.ndarray):
            continue
        if not value.flags.writeable or (mixed and rng.random() < 0.3):
            # torch would make a read-only array writeable
            mixed = True
            continue
        try:
            if value.size == 0:
                tensor = torch.empty(
                    value.shape,
                    dtype=torch.from_numpy(np.zeros(0, value.dtype.newbyteorder("="))).dtype,
                )
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tensor = torch.from_numpy(value)
        except (TypeError, ValueError, RuntimeError):
            continue
        if id(value) in case.arrays.placed:
            case.arrays.placed[id(tensor)] = case.arrays.placed[id(value)]
        kept.append(value)
        case.args[name] = tensor
        converted = True
    mixed = any(isinstance(v, np.ndarray) for n, v in case.args.items() if n not in RECORD_NAMES)
    if converted:
        case.mutation += "+torch"
        if mixed and case.expect == "valid":
            # Outputs to allocate (True) come from the framework of one input; mixed with NumPy,
            # C may refuse to allocate them (ValueError), as documented.
            case.expect = "either"


def _dropout_wraps(case):
    args = case.args
    if case.entry == "dropout_mask":
        try:
            count = math.prod(int(n) for n in args["shape"])
            return _wraps(args.get("offset", 0), count) and float(args["p"]) > 0
        except (TypeError, ValueError):
            return False
    if case.entry.startswith(("lora_linear", "dora_linear", "lora_grouped")) and isinstance(
        args.get("x"), np.ndarray
    ):
        p = args.get("dropout", 0.0)
        offset = args.get("offset", 0)
        if isinstance(p, Hostile) or isinstance(offset, Hostile):
            return False
        try:
            return float(p) > 0 and _wraps(int(offset), args["x"].size)
        except (TypeError, ValueError):
            return False
    return False


def rederive_dependents(case):
    """Backward inputs computed by the forward (xa, base) follow changed values of x (or a
    changed flag); left alone where the changed arguments no longer make a problem."""
    if not case.notes.pop("rederive", False):
        return
    try:
        _rederive(case)
    except ValueError:
        pass


def _rederive(case):
    args = case.args
    if "derive" in case.notes:
        case.notes["derive"]()
        return
    if case.entry == "lora_linear_backward" and all(
        isinstance(args.get(n), np.ndarray) for n in ("x", "weight", "lora_a", "lora_b", "xa")
    ):
        s = {k: raw(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
        if s["x"].dtype.kind != "f" or s["xa"].dtype != s["x"].dtype:
            return
        mask = _mask_for(s["x"], s.get("dropout", 0.0), s.get("seed", 0), s.get("offset", 0))
        with np.errstate(all="ignore"):
            _, xa = ref.lora_linear_forward(
                s["x"],
                s["weight"],
                None,
                s["lora_a"],
                s["lora_b"],
                s["scale"],
                fan_in_fan_out=s.get("fan_in_fan_out", False),
                enable_lora=s.get("enable_lora"),
                mask=mask,
            )
        args["xa"] = case.arrays.place(xa.astype(s["x"].dtype), "c")
    if (
        case.entry == "ia3_linear_backward"
        and isinstance(args.get("base"), np.ndarray)
        and all(
            isinstance(args.get(n), np.ndarray) and args[n].dtype.kind == "f"
            for n in ("x", "weight", "ia3_l")
        )
    ):
        s = {k: raw(v) for k, v in args.items() if isinstance(v, np.ndarray)}
        with np.errstate(all="ignore"):
            out_f = s["weight"].shape[1 if args.get("fan_in_fan_out") else 0]
            _, base = ref.ia3_linear_forward(
                s["x"],
                s["weight"],
                case.notes["hidden_bias"],
                np.ones(out_f),
                fan_in_fan_out=args.get("fan_in_fan_out", False),
            )
        if base.shape == args["base"].shape:
            args["base"] = case.arrays.place(base.astype(args["base"].dtype), "c")


# ---- the oracle ------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # "ok" or "fail"
    label: str  # valid | raised:<Type> | either-ok | hostile-ok | ...
    failure: str = ""  # the failure class when kind == "fail"
    message: str = ""


class Failure(Exception):
    def __init__(self, failure, message):
        super().__init__(message)
        self.failure = failure


def is_torch(value):
    return type(value).__module__.split(".", 1)[0] == "torch"


def as_numpy(value):
    """A torch tensor's NumPy view (same memory); anything else as it is."""
    return value.detach().numpy() if is_torch(value) else value


def snapshot(value):
    """A bit-exact copy of an argument; huge stride-0 arrays are kept as broadcast views of a
    float64 copy of their one stored row (the references never need more)."""
    value = as_numpy(value)
    if isinstance(value, np.ndarray):
        if value.size > 2**24:
            part = value[tuple(slice(0, 1) if s == 0 else slice(None) for s in value.strides)]
            part = np.array(part, np.float64 if value.dtype.kind == "f" else value.dtype)
            return np.broadcast_to(part, value.shape)
        return np.array(value, copy=True)
    if isinstance(value, tuple):
        return tuple(snapshot(v) for v in value)
    if isinstance(value, list):
        return [snapshot(v) for v in value]
    if isinstance(value, Hostile):
        return value.value
    return value


def same_bits(a, b):
    a = as_numpy(a)
    if isinstance(b, np.ndarray):
        if isinstance(a, np.ndarray) and a.size > 2**24 and a.shape == b.shape:
            return True  # a huge stride-0 view (see snapshot); its buffer is checked apart
        if not isinstance(a, np.ndarray) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    if isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b))
    return True


def _arrays_in(value):
    if isinstance(value, np.ndarray) or is_torch(value):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _arrays_in(v)


def run_case(case) -> Outcome:
    try:
        label = _run(case)
    except Failure as failure:
        return Outcome(
            "fail",
            failure.failure,
            failure.failure,
            f"{failure}\n{case.describe()}\nreplay: {replay_line(case.seed, case.index)}",
        )
    return Outcome("ok", label)


def _run(case):
    args = case.args
    victim = case.notes.get("victim")
    watched = {n: v for n, v in args.items() if n != victim}
    placed = case.arrays.buffers([a for v in watched.values() for a in _arrays_in(v)])
    buffers_before = [p.storage.copy() for p in placed]
    before = {n: snapshot(v) for n, v in args.items()}
    try:
        with np.errstate(all="ignore"):
            result = case.call()
    except BaseException as exc:  # noqa: B902 - every exception is judged here
        return _judge_raise(case, exc, watched, before, placed, buffers_before)
    if case.expect == "invalid":
        raise Failure("accepted-invalid", f"the call returned instead of raising ({case.mutation})")
    if case.expect == "hostile":
        # Judge the result against the arguments as they are now (what cpeft should have used
        # after converting every argument first); inputs were changed by the argument itself.
        before = {n: snapshot(v) for n, v in args.items()}
    _check_inputs_unchanged(case, watched, before, placed, buffers_before)
    if case.entry.endswith("merge"):
        _check_merge(case, before, result)
    else:
        _check_result(case, before, result)
    return {"valid": "valid", "either": "either:returned", "hostile": "hostile:returned"}[
        case.expect
    ]


def _judge_raise(case, exc, watched, before, placed, buffers_before):
    name = type(exc).__name__
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc
    if not isinstance(exc, DOCUMENTED):
        raise Failure(
            f"undocumented-exception:{name}",
            f"raised {name}: {exc}\n{traceback.format_exc(limit=4)}",
        )
    if not str(exc).strip():
        raise Failure(f"empty-message:{name}", f"raised {name} with an empty message")
    for n, v in watched.items():
        if not same_bits(v, before[n]):
            raise Failure(
                "modified-on-raise", f"{n} was modified by a call that raised {name}: {exc}"
            )
    for p, b in zip(placed, buffers_before):
        if p.storage.tobytes() != b.tobytes():
            raise Failure(
                "modified-on-raise", f"a buffer was modified by a call that raised {name}: {exc}"
            )
    if case.expect == "valid":
        raise Failure(f"raised-on-valid:{name}", f"raised {name} on a valid call: {exc}")
    return f"raised:{name}"


def _check_inputs_unchanged(case, watched, before, placed, buffers_before):
    """Inputs bitwise unchanged; outputs and in-place targets written only inside their view."""
    placed_of = case.arrays.placed
    written = {
        id(placed_of[id(a)].view) if id(a) in placed_of else id(a)
        for n, v in watched.items()
        if n in OUTPUT_NAMES or is_in_place_target(case, n)
        for a in _arrays_in(v)
    }
    for n, v in watched.items():
        if n in OUTPUT_NAMES or is_in_place_target(case, n) or n in RECORD_NAMES:
            continue
        if not same_bits(v, before[n]):
            raise Failure("modified-input", f"input {n} was modified")
    for p, b in zip(placed, buffers_before):
        now = p.storage
        if now.tobytes() == b.tobytes():
            continue
        owners = [a for a in case.arrays.placed.values() if a.storage is now]
        allowed = np.zeros(now.shape, bool)
        for owner in owners:
            if id(owner.view) in written:
                allowed |= case.arrays.coverage(owner)
        changed = now.view(np.uint8).reshape(now.size, -1) != b.view(np.uint8).reshape(b.size, -1)
        changed = changed.any(axis=1) if now.dtype != np.uint8 else changed[:, 0]
        if np.any(changed & ~allowed):
            raise Failure(
                "wrote-outside",
                "memory outside every output's elements was written "
                f"(element {int(np.argmax(changed & ~allowed))} of a buffer)",
            )


def _compare(name, ours, want, bound, k, dtype):
    ours = as_numpy(ours)
    if not isinstance(ours, np.ndarray):
        raise Failure("wrong-result", f"{name}: expected an array, got {type(ours).__name__}")
    if ours.shape != want.shape:
        raise Failure("wrong-shape", f"{name}: shape {ours.shape}, expected {want.shape}")
    if dtype is not None and ours.dtype.newbyteorder("=") != dtype:
        raise Failure("wrong-dtype", f"{name}: dtype {ours.dtype}, expected {dtype}")
    if want.size == 0:
        return
    got = np.asarray(ours, np.float64)
    if bound is None:  # exact
        if not np.array_equal(got, want, equal_nan=True):
            bad = np.argwhere(got != want)[0]
            raise Failure(
                "wrong-result",
                f"{name}: differs at {tuple(bad)}: "
                f"ours={got[tuple(bad)]!r} reference={want[tuple(bad)]!r}",
            )
        return
    bound = np.abs(np.asarray(bound, np.float64))
    info = np.finfo(dtype)
    checked = np.isfinite(want) & (bound <= float(info.max))
    allowed = TOL_FACTOR * float(info.eps) * math.sqrt(max(k, 1)) * bound + float(info.tiny)
    with np.errstate(invalid="ignore"):
        bad = checked & ~(np.abs(got - want) <= allowed)
    if np.any(bad):
        where = tuple(np.argwhere(bad)[0])
        raise Failure(
            "wrong-result",
            f"{name} ({dtype.name}, K={k}): {int(bad.sum())} of "
            f"{bad.size} elements outside tolerance; first at {where}: "
            f"ours={got[where]!r} reference={want[where]!r} "
            f"allowed={allowed[where]:.3e}",
        )


def _reference(case, snap):
    try:
        with np.errstate(all="ignore"):
            return case.reference(snap)
    except Failure:
        raise
    except Exception as exc:
        raise Failure(
            "accepted-inconsistent",
            "the call returned, but its arguments do not "
            f"make a problem the reference can compute ({type(exc).__name__}: {exc})",
        ) from exc


def _check_result(case, snap, result):
    dtype = float_dtype(case)
    refs = _reference(case, snap)
    if case.entry == "dropout_mask":
        want = refs[None][0]
        dtype = want.dtype
        _compare("mask", result, want.astype(np.float64), None, 0, dtype)
        again = case.call()
        if again.tobytes() != result.tobytes():
            raise Failure("nondeterministic", "two identical dropout_mask calls differ")
        return
    if case.result_names is None:
        named = {None: result}
    else:
        if not isinstance(result, tuple) or len(result) != len(case.result_names):
            raise Failure(
                "wrong-result",
                f"result is {type(result).__name__}, expected {len(case.result_names)} values",
            )
        named = dict(zip(case.result_names, result))
    for name, ours in named.items():
        request_name = case.requested_by.get(name)
        if request_name is not None:
            request = case.args.get(request_name, case.notes["defaults"][request_name])
            if request is None or request is False:
                if ours is not None:
                    raise Failure("wrong-result", f"{name} was not requested but came back")
                continue
            given = request
        else:
            given = case.args.get(
                {None: "out", "y": "out", "xa": "out_xa", "base": "out_base", "norm": "out_norm"}[
                    name
                ]
            )
        want = refs.get(name)
        if want is None:
            if ours is not None:
                raise Failure("wrong-result", f"{name} came back but none was asked for")
            continue
        if isinstance(given, np.ndarray) and ours is not given:
            raise Failure("wrong-result", f"{name}: the result is not the output array passed")
        _compare(name or "y", ours, *want, dtype)


def _check_merge(case, snap, result):
    """Merged values under the tolerance rule, then the unmerge restores the weight exactly."""
    e, args = case.entry, case.args
    family = case.notes["family"]
    dtype = float_dtype(case)
    if e == family:
        refs = _reference(case, snap)
        _compare("merged weight", args["weight"], *refs["weight"], dtype)
        if "bias" in refs and is_in_place_target(case, "bias"):
            _compare("merged bias", args["bias"], *refs["bias"], dtype)
        names = POSITIONAL[family]
        rest = [args[n] for n in names[1:]]
        keywords = {k: v for k, v in args.items() if k not in names}
        unmerge = getattr(F, e.replace("merge", "unmerge"))
        try:
            unmerge(args["weight"], *rest, result, **keywords)
        except Exception as exc:
            raise Failure(
                "unmerge-failed",
                f"unmerging the merge just made raised {type(exc).__name__}: {exc}",
            ) from exc
        restored = {"weight": snap["weight"]}
        if is_in_place_target(case, "bias"):
            restored["bias"] = snap["bias"]
    else:
        if result is not None:
            raise Failure("wrong-result", f"unmerge returned {type(result).__name__}")
        if case.notes.get("unmerged_weight") is None:
            return
        restored = {"weight": case.notes["unmerged_weight"]}
        if is_in_place_target(case, "bias") and "unmerged_bias" in case.notes:
            restored["bias"] = case.notes["unmerged_bias"]
    for name, want in restored.items():
        if not same_bits(args[name], want):
            raise Failure(
                "unmerge-not-exact",
                f"{name} after merge + unmerge differs from the original bit for bit",
            )
