"""The C boundary under hostile and concurrent callers (issue 12): arrays rewritten by another
thread during a call, Python callbacks that free buffers, dropout counters past 2**64, unaligned
views, empty tensors with a null data pointer, scaled operands that overflow, views beyond the
32-bit BLAS range, unchecked arguments, DLPack deleters written in Python, concurrent merges.

Each test starts from the issue's reproducer. Threaded tests run for a bounded time (about a second
each) and check what a race may and may not do: an IndexError or a clear RuntimeError, never an
out-of-bounds access (the sanitizer CI runs this file under ASan + UBSan)."""

import ctypes
import threading
import time

import numpy as np
import pytest

import cpeft
import reference as ref
from cpeft import _C
from cpeft import functional as F

RACE_SECONDS = 1.0


def rng(seed=0):
    return np.random.default_rng(seed)


def randn(*shape, seed=0, dtype=np.float32):
    return rng(seed + sum(shape)).standard_normal(shape).astype(dtype)


# ---- defect 1: indices rewritten while the GIL is released --------------------------------------


class Flipper:
    """A thread that keeps writing an out-of-range value into array[-1] and restoring it."""

    def __init__(self, array, bad, good):
        self.array, self.bad, self.good = array, bad, good
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        a, bad, good, stop = self.array, self.bad, self.good, self.stop
        while not stop.is_set():
            for _ in range(1000):
                a[-1] = bad
                a[-1] = good

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


def race(call, array, bad, good=0, allowed=(IndexError,)):
    """Run call() repeatedly for RACE_SECONDS while another thread flips array[-1]; every call
    either succeeds or raises one of `allowed` (the boundary's own scan, or the check where the
    compute uses the value, whichever sees the bad value). Returns how many raised."""
    raised = calls = 0
    with Flipper(array, bad, good):
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            calls += 1
            try:
                call()
            except allowed:
                raised += 1
    assert calls > 0
    return raised


N_RACE, V, D, R = 200_000, 2, 4, 2


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
def test_lora_embedding_backward_indices_rewritten_during_call(index_dtype):
    """The issue's reproducer: grad_weight's scatter used to write outside grad_weight."""
    idx = np.zeros(N_RACE, index_dtype)
    g = np.ones((idx.size, D), np.float32)
    a, b = np.ones((R, V), np.float32), np.ones((D, R), np.float32)
    bad = (1 << 40) if index_dtype == np.int64 else (1 << 30)
    race(
        lambda: F.lora_embedding_backward(
            g, idx, a, b, 1.0, grad_lora_a=True, grad_lora_b=True, grad_weight=True
        ),
        idx,
        bad,
    )


def test_lora_embedding_forward_indices_rewritten_during_call():
    idx = np.zeros(N_RACE, np.int64)
    w, a, b = np.ones((V, D), np.float32), np.ones((R, V), np.float32), np.ones((D, R), np.float32)
    out = np.empty((idx.size, D), np.float32)
    race(lambda: F.lora_embedding_forward(idx, w, a, b, 1.0, out=out), idx, -(1 << 40))


def test_ia3_embedding_indices_rewritten_during_call():
    idx = np.zeros(N_RACE, np.int64)
    w, l = np.ones((V, D), np.float32), np.ones(D, np.float32)
    g = np.ones((idx.size, D), np.float32)
    out = np.empty((idx.size, D), np.float32)
    race(lambda: F.ia3_embedding_forward(idx, w, l, out=out), idx, 1 << 40)
    race(lambda: F.ia3_embedding_backward(g, idx, w, l, grad_ia3_l=True, grad_weight=True), idx, V)


def test_unmerge_record_rewritten_during_call():
    w0 = randn(400, 300, seed=1) * np.float32(1e3)
    a, b = randn(4, 300, seed=2), randn(400, 4, seed=3)
    w = w0.copy()
    record = F.lora_merge(w, a, b, 0.37)
    assert record.index.size > 10
    index, value = record.index.copy(), record.value.copy()
    # The last entry flips between its own position and one far outside the weight.
    good = int(index[-1])
    race(
        lambda: F.lora_unmerge(w, a, b, 0.37, F.MergeRecord(index, value)),
        index,
        1 << 50,
        good,
        allowed=(IndexError, ValueError),
    )


def test_indices_checked_before_anything_is_written():
    """Without a race, an out-of-range index is still reported before any output is touched."""
    idx = np.array([0, 1, 5], np.int64)
    out = np.full((3, D), 7.0, np.float32)
    with pytest.raises(IndexError, match="indices"):
        F.lora_embedding_forward(
            idx,
            np.ones((V, D), np.float32),
            np.ones((R, V), np.float32),
            np.ones((D, R), np.float32),
            1.0,
            out=out,
        )
    assert (out == 7.0).all()


# ---- defect 2: Python code after buffers were captured -----------------------------------------


def linear_case(groups=1):
    """The issue's shapes: x (64, 256), weight (8, 256), rank 2 per enabled group."""
    x = np.ones((64, 256), np.float32)
    w = randn(8, 256, seed=1)
    a = randn(2 * groups, 256, seed=2)
    b = randn(8, 2, seed=3)
    return x, w, a, b


def test_enable_lora_bool_frees_x():
    """The issue's reproducer: the item's __bool__ resized x after its pointer was taken."""
    x, w, a, b = linear_case(groups=2)

    class Evil:
        def __bool__(self):
            x.resize((1 << 22,), refcheck=False)
            return True

    # Converted before x is looked at, so the call sees the resized x and says so.
    with pytest.raises(ValueError, match="x.shape"):
        F.lora_linear_forward(x, w, None, a, b, 1.0, enable_lora=[Evil(), True])


def grow_rows(x):
    """Resize x to twice its rows: the buffer moves, the old one is freed."""
    rows, cols = x.shape
    x.resize((2 * rows, cols), refcheck=False)
    x[rows:] = 2.0


def expected_forward(x, w, a, b, scale, enable_lora=None):
    return ref.lora_linear_forward(x, w, None, a, b, scale, enable_lora=enable_lora)[0]


def test_scale_float_moves_x():
    x, w, a, b = linear_case()

    class Scale:
        def __float__(self):
            grow_rows(x)
            return 0.5

    y, _ = F.lora_linear_forward(x, w, None, a, b, Scale())
    assert y.shape == (128, 8)
    np.testing.assert_allclose(y, expected_forward(x, w, a, b, 0.5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argument", ["seed", "offset", "dropout"])
def test_index_and_float_callbacks_move_x(argument):
    x, w, a, b = linear_case()

    class Number:
        def __index__(self):
            grow_rows(x)
            return 0

        def __float__(self):
            grow_rows(x)
            return 0.0

    y, _ = F.lora_linear_forward(x, w, None, a, b, 1.0, **{argument: Number()})
    assert y.shape == (128, 8)
    np.testing.assert_allclose(y, expected_forward(x, w, a, b, 1.0), rtol=1e-4, atol=1e-4)


def test_padding_idx_index_moves_indices():
    idx = np.array([0, 1, 1, 0], np.int64)
    a, b = randn(1, 3, seed=2), randn(2, 1, seed=3)
    g = randn(8, 2, seed=4)

    class Padding:
        def __index__(self):
            idx.resize((8,), refcheck=False)
            idx[4:] = 2
            return 1

    # The indices grow to match g while padding_idx is converted, before they are read.
    grads = F.lora_embedding_backward(g, idx, a, b, 1.0, padding_idx=Padding(), grad_weight=True)
    want = ref.lora_embedding_backward(g, idx, a, b, 1.0, padding_idx=1)
    for name in ("lora_a", "lora_b", "weight"):
        np.testing.assert_allclose(getattr(grads, name), want[name], rtol=1e-5, atol=1e-6)


class DLPackWrapper:
    """A producer whose export runs arbitrary code first (here: moves an earlier ndarray)."""

    def __init__(self, array, before_export):
        self.array, self.before_export = array, before_export

    def __dlpack__(self, **kwargs):
        self.before_export()
        return self.array.__dlpack__()

    def __dlpack_device__(self):
        self.before_export()
        return self.array.__dlpack_device__()


def test_later_dlpack_export_moves_earlier_array():
    """x's pointer used to be taken before weight.__dlpack__ ran."""
    x, w, a, b = linear_case()
    y, _ = F.lora_linear_forward(
        x,
        DLPackWrapper(w, lambda: grow_rows(x) if x.shape[0] == 64 else None),
        None,
        a,
        b,
        1.0,
        out=np.empty((128, 8), np.float32),
        out_xa=np.empty((128, 2), np.float32),
    )
    assert y.shape == (128, 8)
    np.testing.assert_allclose(y, expected_forward(x, w, a, b, 1.0), rtol=1e-4, atol=1e-4)


def test_output_dlpack_export_moves_input():
    torch = pytest.importorskip("torch")
    x, w, a, b = linear_case()
    out = torch.empty(64, 8)
    out_xa = torch.empty(64, 4)
    # The output's export shrinks x back to a shape that no longer fits out: refused cleanly.
    with pytest.raises(ValueError, match="out"):
        _C.lora_linear_forward(
            x,
            w,
            None,
            a,
            b,
            1.0,
            out=DLPackWrapper(out, lambda: grow_rows(x) if x.shape[0] == 64 else None),
            out_xa=out_xa,
        )


# ---- defect 3: dropout counters past 2**64 ------------------------------------------------------


@pytest.mark.parametrize("offset", [2**64 - 2, 2**64 - 1, 2**64 - 700, 2**64 - 1401])
def test_dropout_mask_wraps_modulo_2_64(offset):
    """The issue's reproducer: identical calls differed, reading uninitialised flags."""
    first = F.dropout_mask((2, 700), 0.5, seed=7, offset=offset)
    second = F.dropout_mask((2, 700), 0.5, seed=7, offset=offset)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, ref.dropout_mask((2, 700), 0.5, 7, offset))


def test_dropout_wrapping_forward_and_backward_agree():
    x, w = randn(6, 33, seed=1), randn(5, 33, seed=2)
    a, b = randn(3, 33, seed=3), randn(5, 3, seed=4)
    kw = dict(dropout=0.4, seed=11, offset=2**64 - 100)
    mask = ref.dropout_mask(x.shape, 0.4, 11, 2**64 - 100)
    y, xa = F.lora_linear_forward(x, w, None, a, b, 0.7, **kw)
    want_y, want_xa = ref.lora_linear_forward(x, w, None, a, b, 0.7, mask=mask)
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-5)
    g = randn(6, 5, seed=5)
    grads = F.lora_linear_backward(g, x, w, a, b, xa, 0.7, **kw)
    want = ref.lora_linear_backward(g, x, w, a, b, 0.7, mask=mask)
    for name in ("x", "lora_a", "lora_b"):
        np.testing.assert_allclose(getattr(grads, name), want[name], rtol=1e-4, atol=1e-5)


# ---- defect 4: unaligned views -------------------------------------------------------------------


def unaligned(shape, dtype=np.float32, fill=None):
    """A view of `shape` starting one byte into a buffer: misaligned for any dtype wider than 1."""
    itemsize = np.dtype(dtype).itemsize
    count = int(np.prod(shape))
    buf = np.zeros(count * itemsize + 1, np.uint8)
    view = buf[1:].view(dtype).reshape(shape)
    assert view.ctypes.data % itemsize != 0
    view[...] = 0 if fill is None else fill
    return view


def test_unaligned_inputs_are_copied():
    x, w = randn(5, 6, seed=1), randn(4, 6, seed=2)
    a, b, bias = randn(2, 6, seed=3), randn(4, 2, seed=4), randn(4, seed=5)
    want_y, want_xa = F.lora_linear_forward(x, w, bias, a, b, 0.5, dropout=0.3, seed=3)
    y, xa = F.lora_linear_forward(
        unaligned(x.shape, fill=x),
        unaligned(w.shape, fill=w),
        unaligned(bias.shape, fill=bias),
        unaligned(a.shape, fill=a),
        unaligned(b.shape, fill=b),
        0.5,
        dropout=0.3,
        seed=3,
    )
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(xa, want_xa)
    idx = np.array([0, 3, 1], np.int64)
    want = F.ia3_embedding_forward(idx, w, randn(6, seed=6))
    got = F.ia3_embedding_forward(
        unaligned(idx.shape, np.int64, idx),
        unaligned(w.shape, fill=w),
        unaligned((6,), fill=randn(6, seed=6)),
    )
    np.testing.assert_array_equal(got, want)


def test_unaligned_outputs_and_targets_are_refused():
    x, w, a, b = randn(5, 6, seed=1), randn(4, 6, seed=2), randn(2, 6, seed=3), randn(4, 2, seed=4)
    out = unaligned((5, 4))
    with pytest.raises(ValueError, match="out must be aligned"):
        F.lora_linear_forward(x, w, None, a, b, 0.5, out=out)
    assert (out == 0).all()
    target = unaligned(w.shape, fill=w)
    with pytest.raises(ValueError, match="weight must be aligned"):
        F.lora_merge(target, a, b, 0.5)
    np.testing.assert_array_equal(target, w)
    with pytest.raises(ValueError, match="out must be aligned"):
        _C.dropout_mask((5, 4), 0.5, 1, out=unaligned((5, 4)))


# ---- defect 7: empty tensors, with a null data pointer from torch --------------------------------


def test_ia3_linear_zero_rows_backward():
    """The issue's reproducer: 'internal error (status 6)' from a base with data == NULL."""
    torch = pytest.importorskip("torch")
    layer = cpeft.IA3Linear(4, 3)
    layer(torch.randn(0, 4)).sum().backward()
    assert torch.equal(layer.ia3_l.grad, torch.zeros_like(layer.ia3_l))


def empty_calls(xp):
    """Every functional op on a zero-row batch, as (name, call, expected zero-filled results)."""
    z = (lambda *s: np.zeros(s, np.float32)) if xp is np else (lambda *s: xp.zeros(s))
    rnd = (lambda *s: randn(*s)) if xp is np else (lambda *s: xp.from_numpy(randn(*s)))
    idx = np.zeros(0, np.int64) if xp is np else xp.zeros(0, dtype=xp.int64)
    x, w, bias, a, b = z(0, 6), rnd(4, 6), rnd(4), rnd(2, 6), rnd(4, 2)
    we, ae, be, l4, l6 = rnd(7, 3), rnd(2, 7), rnd(3, 2), rnd(4), rnd(6)
    all_grads = dict(
        grad_x=True, grad_lora_a=True, grad_lora_b=True, grad_bias=True, grad_weight=True
    )
    return [
        (
            "lora_linear_forward",
            lambda: F.lora_linear_forward(x, w, bias, a, b, 0.5, dropout=0.5),
            [(0, 4), (0, 2)],
        ),
        (
            "lora_linear_backward",
            lambda: F.lora_linear_backward(
                z(0, 4), x, w, a, b, z(0, 2), 0.5, dropout=0.5, **all_grads
            ),
            [(0, 6), (2, 6), (4, 2), (4,), (4, 6)],
        ),
        (
            "lora_embedding_forward",
            lambda: F.lora_embedding_forward(idx, we, ae, be, 0.5),
            [(0, 3)],
        ),
        (
            "lora_embedding_backward",
            lambda: F.lora_embedding_backward(z(0, 3), idx, ae, be, 0.5, grad_weight=True),
            [(2, 7), (3, 2), (7, 3)],
        ),
        (
            "ia3_linear_forward",
            lambda: F.ia3_linear_forward(x, w, bias, l4, keep_base=True),
            [(0, 4), (0, 4)],
        ),
        (
            "ia3_linear_backward",
            lambda: F.ia3_linear_backward(
                z(0, 4), x, w, l4, z(0, 4), grad_bias=True, grad_weight=True
            ),
            [(0, 6), (4,), (4,), (4, 6)],
        ),
        (
            "ia3_linear_backward_ff",
            lambda: F.ia3_linear_backward(
                z(0, 4), x, w, l6, None, feedforward=True, grad_bias=True, grad_weight=True
            ),
            [(0, 6), (6,), (4,), (4, 6)],
        ),
        ("ia3_embedding_forward", lambda: F.ia3_embedding_forward(idx, we, rnd(3)), [(0, 3)]),
        (
            "ia3_embedding_backward",
            lambda: F.ia3_embedding_backward(z(0, 3), idx, we, rnd(3), grad_weight=True),
            [(3,), (7, 3)],
        ),
    ]


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_every_op_on_empty_batches(framework):
    xp = np if framework == "numpy" else pytest.importorskip("torch")
    for name, call, shapes in empty_calls(xp):
        results = call()
        results = results if isinstance(results, tuple) else (results,)
        got = [np.asarray(r) for r in results if r is not None]
        assert [g.shape for g in got] == [tuple(s) for s in shapes], name
        for g in got:
            assert (g == 0).all(), name  # sums over no rows are zeros
    np.testing.assert_array_equal(F.dropout_mask((0, 5), 0.5, 1), np.zeros((0, 5), np.float32))


def layer_cases(torch):
    return [
        ("Linear", cpeft.Linear(6, 4, r=2, lora_alpha=4), torch.randn(0, 6)),
        (
            "MergedLinear",
            cpeft.MergedLinear(6, 6, r=2, lora_alpha=4, enable_lora=[True, False, True]),
            torch.randn(0, 6),
        ),
        (
            "Embedding",
            cpeft.Embedding(7, 3, r=2, lora_alpha=4),
            torch.zeros(0, 2, dtype=torch.long),
        ),
        ("Conv1d", cpeft.Conv1d(3, 4, 3, r=2, lora_alpha=4), torch.randn(0, 3, 8)),
        ("Conv2d", cpeft.Conv2d(3, 4, 3, r=2, lora_alpha=4), torch.randn(0, 3, 8, 8)),
        ("Conv3d", cpeft.Conv3d(3, 4, 3, r=2, lora_alpha=4), torch.randn(0, 3, 5, 5, 5)),
        ("IA3Linear", cpeft.IA3Linear(6, 4), torch.randn(0, 6)),
        ("IA3Linear-ff", cpeft.IA3Linear(6, 4, is_feedforward=True), torch.randn(0, 6)),
        ("IA3Embedding", cpeft.IA3Embedding(7, 3), torch.zeros(0, dtype=torch.long)),
    ]


def test_every_layer_on_empty_batches():
    torch = pytest.importorskip("torch")
    for name, layer, x in layer_cases(torch):
        for mode in ("train", "eval"):
            getattr(layer, mode)()
            if x.is_floating_point():
                x.requires_grad_(True)
            y = layer(x)
            assert y.shape[0] == 0, name
            if not y.requires_grad:  # eval of an embedding: merged, nothing trainable is used
                continue
            y.sum().backward()
            for pname, p in layer.named_parameters():
                if p.requires_grad and p.grad is not None:
                    assert torch.count_nonzero(p.grad) == 0, (name, mode, pname)
                    p.grad = None
            if x.is_floating_point():
                assert x.grad.shape == x.shape
                x.grad = None


# ---- defect 8: float32 with a bias must not overflow on s·B -------------------------------------


# One row (bias written first) and 16 rows (bias fused into the adapter GEMM as [xa | 1]).
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_operand_never_overflows(rows, with_bias):
    """The issue's reproducer: x=1, w=1, A=1e-20, B=1e20, scale=1e20 gave inf with a bias."""
    one = np.ones((rows, 1), np.float32)
    bias = np.zeros(1, np.float32) if with_bias else None
    y, _ = F.lora_linear_forward(
        one,
        np.ones((1, 1), np.float32),
        bias,
        np.full((1, 1), 1e-20, np.float32),
        np.full((1, 1), 1e20, np.float32),
        1e20,
    )
    np.testing.assert_allclose(y, np.full((rows, 1), 1e20), rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 16])
def test_scaled_operand_never_underflows(rows):
    """s·B = 1e-20 * 1e-30 is below float32's range though s·xa·B = 1e-20 is not."""
    y, _ = F.lora_linear_forward(
        np.ones((rows, 1), np.float32),
        np.zeros((1, 1), np.float32),
        np.zeros(1, np.float32),
        np.full((1, 1), 1e30, np.float32),
        np.full((1, 1), 1e-30, np.float32),
        1e-20,
    )
    np.testing.assert_allclose(y, np.full((rows, 1), 1e-20), rtol=1e-6)


# ---- defect 9: views beyond the 32-bit BLAS range ---------------------------------------------------


def test_weight_view_with_a_64_bit_row_stride():
    """The issue's (2, 2**31 + 64) array sliced to 8 columns: a leading dimension beyond 32 bits.
    np.zeros maps untouched pages lazily, so only two rows of memory are ever used."""
    backing = np.zeros(2**31 + 72, np.float32)
    w = np.lib.stride_tricks.as_strided(backing, shape=(2, 8), strides=((2**31 + 64) * 4, 4))
    w[0], w[1] = 1.0, 2.0
    x, a, b = randn(3, 8, seed=1), randn(2, 8, seed=2), randn(2, 2, seed=3)
    y, _ = F.lora_linear_forward(x, w, None, a, b, 0.5)
    want = ref.lora_linear_forward(x, np.array(w), None, a, b, 0.5)[0]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    out = np.lib.stride_tricks.as_strided(backing, shape=(2, 8), strides=((2**31 + 64) * 4, 4))
    with pytest.raises(ValueError, match="grad_weight"):
        F.lora_linear_backward(randn(3, 2), x, np.array(w), a, b, randn(3, 2), 0.5, grad_weight=out)


def test_stride_zero_expand_beyond_memory_names_the_argument():
    rows = 2**45  # a compact copy would need 2**49 bytes: never allocatable
    x = np.broadcast_to(np.ones((1, 4), np.float32), (rows, 4))
    g = np.broadcast_to(np.ones((1, 3), np.float32), (rows, 3))
    xa = np.broadcast_to(np.ones((1, 2), np.float32), (rows, 2))
    with pytest.raises(MemoryError, match=r"^x .*compact copy"):
        F.lora_linear_backward(g, x, randn(3, 4), randn(2, 4), randn(3, 2), xa, 1.0, grad_x=False)


# ---- defect 10: unchecked arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, exc",
    [("bogus", ValueError), (None, TypeError), (object(), TypeError), ("int32", ValueError)],
)
def test_dropout_mask_dtype_checked(dtype, exc):
    with pytest.raises(exc, match="dtype"):
        F.dropout_mask((2, 3), 0.5, 1, dtype=dtype)


@pytest.mark.parametrize("shape", [(2.7, 3), 2.0, "ab", (2, None)])
def test_dropout_mask_shape_checked(shape):
    with pytest.raises(TypeError, match="shape"):
        F.dropout_mask(shape, 0.5, 1)


def test_dropout_mask_dtype_spellings():
    for spelling in ("float64", np.float64, np.dtype(np.float64), float):
        assert F.dropout_mask((2, 3), 0.5, 1, dtype=spelling).dtype == np.float64
    assert F.dropout_mask(np.int64(3), 0.5, 1).shape == (3,)


def test_integer_arguments_through_index():
    x, w, a, b = randn(4, 6, seed=1), randn(3, 6, seed=2), randn(2, 6, seed=3), randn(3, 2, seed=4)
    want = F.lora_linear_forward(x, w, None, a, b, 0.5, dropout=0.5, seed=7, offset=9)[0]
    got = F.lora_linear_forward(
        x, w, None, a, b, 0.5, dropout=np.float32(0.5), seed=np.int64(7), offset=np.uint8(9)
    )[0]
    np.testing.assert_array_equal(got, want)
    idx = np.array([0, 1, 2], np.int64)
    we, ae, be = randn(3, 2, seed=5), randn(1, 3, seed=6), randn(2, 1, seed=7)
    np.testing.assert_array_equal(
        F.lora_embedding_backward(randn(3, 2), idx, ae, be, 1.0, padding_idx=np.int32(-2)).lora_a,
        F.lora_embedding_backward(randn(3, 2), idx, ae, be, 1.0, padding_idx=1).lora_a,
    )
    for name in ("seed", "offset"):
        with pytest.raises(TypeError, match=name):
            F.lora_linear_forward(x, w, None, a, b, 0.5, **{name: 7.0})
        with pytest.raises(TypeError, match=name):
            F.lora_linear_forward(x, w, None, a, b, 0.5, **{name: np.float64(7)})
    with pytest.raises(TypeError, match="padding_idx"):
        F.lora_embedding_forward(idx, we, ae, be, 1.0, padding_idx=1.0)


def test_ia3_feedforward_bias_checked():
    w, l = randn(3, 4, seed=1), randn(4, seed=2)
    for bias, exc, match in [
        ("not an array", TypeError, "bias"),
        (np.zeros(2, np.float32), ValueError, "bias"),
        (np.zeros(3, np.float64), ValueError, "bias"),
    ]:
        before = w.copy()
        with pytest.raises(exc, match=match):
            F.ia3_merge(w, l, bias=bias, feedforward=True)
        np.testing.assert_array_equal(w, before)
    aliased = randn(4, 3, seed=3)
    with pytest.raises(ValueError, match="alias"):
        F.ia3_merge(
            aliased, randn(4, seed=4), bias=aliased[0], feedforward=True, fan_in_fan_out=True
        )


# ---- defect 12: DLPack deleters written in Python ---------------------------------------------------


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _DELETER),
]


class PythonDeleterProducer:
    """A CPU DLPack producer whose deleter is a Python function (through ctypes)."""

    def __init__(self, array):
        self.array = np.ascontiguousarray(array, np.float32)
        self.deleted = 0
        self.shape = (ctypes.c_int64 * self.array.ndim)(*self.array.shape)
        self.deleter = _DELETER(self.delete)
        self.managed = _DLManagedTensor(
            _DLTensor(
                self.array.ctypes.data,
                _DLDevice(1, 0),
                self.array.ndim,
                _DLDataType(2, 32, 1),
                self.shape,
                None,
                0,
            ),
            None,
            self.deleter,
        )

    def delete(self, _managed):
        self.deleted += 1

    def __dlpack_device__(self):
        return (1, 0)

    def __dlpack__(self, **kwargs):
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self.managed), b"dltensor", None)


def test_python_deleter_runs_once_with_an_exception_pending():
    x, w, b = randn(4, 6, seed=1), randn(3, 6, seed=2), randn(3, 2, seed=3)
    bad_a = PythonDeleterProducer(randn(2, 5, seed=4))  # wrong in_features
    with pytest.raises(ValueError, match="lora_a must have shape"):
        F.lora_linear_forward(
            x,
            w,
            None,
            bad_a,
            b,
            0.5,
            out=np.empty((4, 3), np.float32),
            out_xa=np.empty((4, 2), np.float32),
        )
    assert bad_a.deleted == 1
    good_a = PythonDeleterProducer(randn(2, 6, seed=4))
    y, _ = F.lora_linear_forward(
        x,
        w,
        None,
        good_a,
        b,
        0.5,
        out=np.empty((4, 3), np.float32),
        out_xa=np.empty((4, 2), np.float32),
    )
    assert good_a.deleted == 1
    np.testing.assert_allclose(
        y, ref.lora_linear_forward(x, w, None, good_a.array, b, 0.5)[0], rtol=1e-5, atol=1e-5
    )


# ---- torch tensors through the DLPack C exchange API ---------------------------------------------


def torch_linear_case():
    torch = pytest.importorskip("torch")
    x, w, a, b = (torch.from_numpy(t.copy()) for t in linear_case())
    return torch, x, w, a, b


def forward_into_torch(torch, x, w, a, b):
    out, out_xa = torch.empty(64, 8), torch.empty(64, 2)
    _C.lora_linear_forward(x, w, None, a, b, 0.5, out=out, out_xa=out_xa)
    return out


def test_torch_tensors_cross_without_a_dlpack_call(monkeypatch):
    """The boundary exports torch tensors (and nn.Parameter) through the type's C table, never
    through the Python method, and reads them right."""
    torch, x, w, a, b = torch_linear_case()
    calls = []
    exported = torch.Tensor.__dlpack__

    def counting(self, *args, **kwargs):
        calls.append(self)
        return exported(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "__dlpack__", counting)
    out = forward_into_torch(torch, x, torch.nn.Parameter(w), a, b)
    assert calls == []
    want = expected_forward(*(t.numpy() for t in (x, w, a, b)), 0.5)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_a_subclass_with_its_own_dlpack_is_exported_through_it():
    torch, x, w, a, b = torch_linear_case()
    calls = []

    class Exported(torch.Tensor):
        def __dlpack__(self, *args, **kwargs):
            calls.append(kwargs)
            return torch.Tensor.__dlpack__(self, *args, **kwargs)

    out = forward_into_torch(torch, x, w.as_subclass(Exported), a, b)
    assert len(calls) == 1
    want = expected_forward(*(t.numpy() for t in (x, w, a, b)), 0.5)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_a_dlpack_override_added_after_use_is_honoured():
    """The boundary remembers per type whether it may use the table; a __dlpack__ assigned to the
    class afterwards (here, after two calls) takes effect on the next call."""
    torch, x, w, a, b = torch_linear_case()
    calls = []

    class Later(torch.Tensor):
        pass

    weight = w.as_subclass(Later)
    want = expected_forward(*(t.numpy() for t in (x, w, a, b)), 0.5)
    for _ in range(2):
        np.testing.assert_allclose(
            forward_into_torch(torch, x, weight, a, b).numpy(), want, rtol=1e-5, atol=1e-5
        )
    assert calls == []

    def exported(self, *args, **kwargs):
        calls.append(kwargs)
        return torch.Tensor.__dlpack__(self, *args, **kwargs)

    Later.__dlpack__ = exported
    out = forward_into_torch(torch, x, weight, a, b)
    assert len(calls) == 1
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


class _ExchangeHeader(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("prev", ctypes.c_void_p)]


class _ExchangeTable(ctypes.Structure):
    _fields_ = [("header", _ExchangeHeader)] + [(f"entry{i}", ctypes.c_void_p) for i in range(5)]


def _capsule(pointer, name):
    """A capsule of `pointer` named by the string buffer `name` (which must outlive it)."""
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    return new(pointer, ctypes.addressof(name), None)


# A table of an unknown major version, with non-null entries a reader must not call. A capsule
# keeps a pointer to its name, not a copy: the names live here for as long as the capsules.
_FUTURE_TABLE = _ExchangeTable(_ExchangeHeader(2, 0, None), *([1] * 5))
_TABLE_NAME = ctypes.create_string_buffer(b"dlpack_exchange_api")
_OTHER_NAME = ctypes.create_string_buffer(b"another_api")


@pytest.mark.parametrize(
    "table",
    [
        42,
        "dlpack_exchange_api",
        _capsule(ctypes.addressof(_FUTURE_TABLE), _OTHER_NAME),
        _capsule(ctypes.addressof(_FUTURE_TABLE), _TABLE_NAME),
    ],
    ids=["int", "str", "capsule-of-another-name", "major-version-2"],
)
def test_an_exchange_table_it_cannot_read_falls_back_to_dlpack(table):
    """A type whose __dlpack_c_exchange_api__ is not a 1.x table is asked through __dlpack__."""
    x, w, a, b = linear_case()
    calls = []

    class Producer:
        __dlpack_c_exchange_api__ = table

        def __dlpack__(self, **kwargs):
            calls.append(kwargs)
            return w.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return w.__dlpack_device__()

    y, _ = F.lora_linear_forward(
        x,
        Producer(),
        None,
        a,
        b,
        0.5,
        out=np.empty((64, 8), np.float32),
        out_xa=np.empty((64, 2), np.float32),
    )
    assert len(calls) == 1
    np.testing.assert_allclose(y, expected_forward(x, w, a, b, 0.5), rtol=1e-5, atol=1e-5)


def test_a_type_that_raises_when_asked_for_its_table_is_refused_by_name():
    x, w, a, b = linear_case()

    class Meta(type):
        @property
        def __dlpack_c_exchange_api__(cls):
            raise RuntimeError("no table today")

    class Producer(metaclass=Meta):
        def __dlpack__(self, **kwargs):
            return w.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return w.__dlpack_device__()

    with pytest.raises(BufferError, match="weight: its type's __dlpack_c_exchange_api__") as info:
        F.lora_linear_forward(
            x,
            Producer(),
            None,
            a,
            b,
            0.5,
            out=np.empty((64, 8), np.float32),
            out_xa=np.empty((64, 2), np.float32),
        )
    assert "no table today" in str(info.value.__cause__ or info.value.__context__)


def test_exchange_exports_are_given_back_after_success_and_failure():
    """Every tensor exported through the table is released when the call ends, also when a later
    argument is refused after the export (here out_xa's shape)."""
    import gc
    import sys
    import weakref

    torch, x, w, a, b = torch_linear_case()
    counts = [sys.getrefcount(t) for t in (x, w, a, b)]
    for _ in range(3):
        forward_into_torch(torch, x, w, a, b)
    with pytest.raises(ValueError, match="out_xa"):
        _C.lora_linear_forward(
            x, w, None, a, b, 0.5, out=torch.empty(64, 8), out_xa=torch.empty(64, 3)
        )
    assert [sys.getrefcount(t) for t in (x, w, a, b)] == counts
    storage = weakref.ref(w.untyped_storage())
    alive = weakref.ref(w)
    del w
    gc.collect()
    assert alive() is None and storage() is None


# ---- defect 13: two threads merging one weight -------------------------------------------------------


def test_concurrent_merges_of_one_weight_are_reported():
    w = randn(1024, 1024, seed=1)
    a, b = randn(8, 1024, seed=2), randn(1024, 8, seed=3)
    stop = threading.Event()
    errors, outcomes = [], {"ok": 0, "conflict": 0}
    lock = threading.Lock()

    def worker():
        while not stop.is_set():
            try:
                record = F.lora_merge(w, a, b, 0.5)
                F.lora_unmerge(w, a, b, 0.5, record)
                kind = "ok"
            except RuntimeError as e:
                if "another cpeft call" not in str(e) and "changed while" not in str(e):
                    errors.append(e)
                kind = "conflict"
            except Exception as e:  # anything else is a bug
                errors.append(e)
                kind = "conflict"
            with lock:
                outcomes[kind] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(2 * RACE_SECONDS)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors[:3]
    assert outcomes["conflict"] > 0, outcomes  # the merges did overlap, and it was noticed


def test_concurrent_merges_of_separate_weights_do_not_conflict():
    """Only overlapping in-place targets conflict: two threads merging their own weights with
    shared adapters never see an error, and each weight comes back bit for bit."""
    a, b = randn(4, 256, seed=2), randn(256, 4, seed=3)
    weights = [randn(256, 256, seed=1) * np.float32(100) for _ in range(2)]
    originals = [w.copy() for w in weights]
    errors = []

    def worker(w):
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            try:
                F.lora_unmerge(w, a, b, 0.5, F.lora_merge(w, a, b, 0.5))
            except Exception as e:  # noqa: BLE001 - any error is the failure reported below
                errors.append(e)
                return

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in weights]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors, errors[:3]
    for w, original in zip(weights, originals):
        np.testing.assert_array_equal(w, original)


def test_vector_output_with_a_64_bit_stride_is_refused():
    backing = np.zeros(2**31 + 9, np.float32)  # two elements 2**31 + 8 apart, lazily mapped
    grad_bias = np.lib.stride_tricks.as_strided(backing, shape=(2,), strides=((2**31 + 8) * 4,))
    x, w, a, b = randn(3, 4, seed=1), randn(2, 4, seed=2), randn(1, 4, seed=3), randn(2, 1, seed=4)
    with pytest.raises(ValueError, match="grad_bias"):
        F.lora_linear_backward(randn(3, 2), x, w, a, b, randn(3, 1), 0.5, grad_bias=grad_bias)
    bias = np.lib.stride_tricks.as_strided(backing, shape=(2,), strides=((2**31 + 8) * 4,))
    y, _ = F.lora_linear_forward(x, w, bias, a, b, 0.5)
    np.testing.assert_allclose(
        y, ref.lora_linear_forward(x, w, np.zeros(2), a, b, 0.5)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bad", [1 << 40, -1, 0])
def test_lora_grouped_adapter_index_rewritten_during_call(bad):
    """The grouped op reads its adapter index twice without the GIL (count, then place): a value
    rewritten in between, out of range or merely moved to another adapter (-1: none, 0: the
    first), must never leave a row slot unwritten or write past one."""
    m, dim, rank = 50_000, 8, 2
    index = np.full(m, 1, np.int64)
    x = np.ones((m, dim), np.float32)
    w = np.ones((dim, dim), np.float32)
    a, b = np.ones((2 * rank, dim), np.float32), np.ones((dim, 2 * rank), np.float32)
    out = np.empty((m, dim), np.float32)
    out_xa = np.empty((m, rank), np.float32)
    expected = F.lora_grouped_forward(x, w, None, a, b, index, [rank, rank], [0.5, 0.5])[0]
    race(
        lambda: F.lora_grouped_forward(
            x, w, None, a, b, index, [rank, rank], [0.5, 0.5], out=out, out_xa=out_xa
        ),
        index,
        bad,
        good=1,
    )
    np.testing.assert_array_equal(
        F.lora_grouped_forward(x, w, None, a, b, index, [rank, rank], [0.5, 0.5])[0], expected
    )


@pytest.mark.parametrize("clears", ["ranks", "scales"])
def test_lora_grouped_adapter_lists_emptied_while_converted(clears):
    """A scale's __float__ that empties the ranks or scales list while the boundary reads it:
    the lists are converted from a snapshot, never read past their end."""
    x, w = np.ones((4, 8), np.float32), np.ones((6, 8), np.float32)
    a, b = np.ones((4, 8), np.float32), np.ones((6, 4), np.float32)
    index = np.zeros(4, np.int64)
    ranks, scales = [2, 2], []

    class Emptying:
        def __float__(self):
            (ranks if clears == "ranks" else scales).clear()
            return 1.0

    scales.extend([Emptying(), 1.0])
    y, _ = F.lora_grouped_forward(x, w, None, a, b, index, ranks, scales)
    expected = x @ w.T + (x @ a[:2].T) @ b[:, :2].T
    np.testing.assert_allclose(y, expected, rtol=1e-6)


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("position", range(5))
def test_bool_in_place_of_a_tensor_is_a_type_error(position, value):
    """True/False request or refuse outputs, so the boundary's preparation skips them; in an
    input's place they are the wrong kind of object (was: SystemError "not prepared")."""
    arrays = [
        np.ones((2, 3), np.float32),
        np.ones((4, 3), np.float32),
        None,
        np.ones((2, 3), np.float32),
        np.ones((4, 2), np.float32),
    ]
    arrays[position] = value
    name = ["x", "weight", "bias", "lora_a", "lora_b"][position]
    with pytest.raises(TypeError, match=f"^{name} must be a numpy.ndarray .* got bool"):
        _C.lora_linear_forward(*arrays, 1.0)


def test_bool_as_merge_delta_or_grouped_index_is_a_type_error():
    w = np.ones((4, 3), np.float32)
    a, b = np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
    with pytest.raises(TypeError, match="^delta must be a numpy.ndarray"):
        _C.lora_merge(w, a, b, 1.0, count_only=True, delta=True)
    with pytest.raises(TypeError, match="^index must be a numpy.ndarray"):
        _C.lora_grouped_forward(np.ones((2, 3), np.float32), w, None, a, b, True, [2], [1.0])
    assert (w == 1).all()
