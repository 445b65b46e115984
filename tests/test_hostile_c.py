"""The C boundary under hostile and concurrent callers (issue 12): arrays rewritten by another
thread during a call, Python callbacks that free buffers, dropout counters past 2**64, unaligned
views, empty tensors with a null data pointer, scaled operands that overflow, views beyond the
32-bit BLAS range, unchecked arguments, DLPack deleters written in Python, concurrent merges.

Each test starts from the issue's reproducer. Threaded tests run for a bounded time (about a second
each) and check what a race may and may not do: an IndexError or a clear RuntimeError, never an
out-of-bounds access (the sanitizer CI runs this file under ASan + UBSan)."""
import ctypes
import sys
import threading
import time

import numpy as np
import pytest

import cpeft
from cpeft import _C
from cpeft import functional as F

import reference as ref

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


def race(call, array, bad, good=0):
    """Run call() repeatedly for RACE_SECONDS while another thread flips array[-1]; every call
    either succeeds or raises IndexError. Returns how many raised."""
    raised = calls = 0
    with Flipper(array, bad, good):
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            calls += 1
            try:
                call()
            except IndexError:
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
    race(lambda: F.lora_embedding_backward(g, idx, a, b, 1.0, grad_lora_a=True,
                                           grad_lora_b=True, grad_weight=True), idx, bad)


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
    race(lambda: F.ia3_embedding_backward(g, idx, w, l, grad_ia3_l=True, grad_weight=True), idx,
         V)


def test_unmerge_record_rewritten_during_call():
    w0 = randn(400, 300, seed=1) * np.float32(1e3)
    a, b = randn(4, 300, seed=2), randn(400, 4, seed=3)
    w = w0.copy()
    record = F.lora_merge(w, a, b, 0.37)
    assert record.index.size > 10
    index, value = record.index.copy(), record.value.copy()
    # The last entry flips between its own position and one far outside the weight.
    good = int(index[-1])
    race(lambda: F.lora_unmerge(w, a, b, 0.37, F.MergeRecord(index, value)), index, 1 << 50,
         good)


def test_indices_checked_before_anything_is_written():
    """Without a race, an out-of-range index is still reported before any output is touched."""
    idx = np.array([0, 1, 5], np.int64)
    out = np.full((3, D), 7.0, np.float32)
    with pytest.raises(IndexError, match="indices"):
        F.lora_embedding_forward(idx, np.ones((V, D), np.float32), np.ones((R, V), np.float32),
                                 np.ones((D, R), np.float32), 1.0, out=out)
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
    y, _ = F.lora_linear_forward(x, DLPackWrapper(w, lambda: grow_rows(x) if x.shape[0] == 64
                                                  else None), None, a, b, 1.0,
                                 out=np.empty((128, 8), np.float32),
                                 out_xa=np.empty((128, 2), np.float32))
    assert y.shape == (128, 8)
    np.testing.assert_allclose(y, expected_forward(x, w, a, b, 1.0), rtol=1e-4, atol=1e-4)


def test_output_dlpack_export_moves_input():
    torch = pytest.importorskip("torch")
    x, w, a, b = linear_case()
    out = torch.empty(64, 8)
    out_xa = torch.empty(64, 4)
    # The output's export shrinks x back to a shape that no longer fits out: refused cleanly.
    with pytest.raises(ValueError, match="out"):
        _C.lora_linear_forward(x, w, None, a, b, 1.0,
                               out=DLPackWrapper(out, lambda: grow_rows(x) if x.shape[0] == 64
                                                 else None),
                               out_xa=out_xa)


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
