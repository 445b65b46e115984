"""Shared test machinery: fixed seeding, the tolerance rule, memory-layout helpers, central
differences, a DLPack-only wrapper.

Tolerance rule (used by every numeric comparison against the float64 references):

    |ours - ref| <= TOL_FACTOR * eps(dtype) * sqrt(K) * bound + tiny(dtype)      elementwise

* ``ref`` is the NumPy float64 reference evaluated on the very values handed to cpeft.
* ``bound`` is the same reference evaluated on the absolute values of every float input
  (|x|, |W|, |A|, |B|, |s|, ...). Every op here is multilinear in its float inputs, so ``bound``
  is exactly the sum of |terms| that meet in each output element, the quantity rounding error
  analysis scales with (a sum of K terms computed in any order is off by at most
  K * eps * sum|terms|). Elements whose terms are all zero must therefore come out exactly 0.
* ``K`` is the sum of all dimensions of the problem, an upper bound on the longest chain of
  accumulations any output element goes through. Rounding errors of independent terms add like
  a random walk, so sqrt(K) replaces the worst-case K; TOL_FACTOR = 8 leaves a wide margin over
  the ~0.3 * sqrt(K) * eps typical error while still failing on any real mistake (a wrong term
  is off by O(bound), i.e. ~1e6 times the float32 allowance).
* eps(float32) = 1.19e-7, eps(float64) = 2.2e-16: float64 results must agree to ~1e-13 relative
  for the sizes used here (the float64 reference has the same rounding noise as ours).
"""

import functools
import math
import sys
import zlib

import numpy as np
import pytest

BASE_SEED = 20240611
TOL_FACTOR = 8.0
FLOAT_DTYPES = (np.float32, np.float64)


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    """Seed NumPy's legacy global generator (and torch's, if a test already imported it) with a
    seed fixed per test id, so that every test is reproducible on its own."""
    seed = seed_for(request.node.nodeid)
    np.random.seed(seed)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
    yield


def seed_for(nodeid):
    return (BASE_SEED + zlib.crc32(nodeid.encode())) % (2**31)


@functools.lru_cache(maxsize=None)
def cuda_unavailable_reason():
    """None when torch sees a GPU and cpeft was built with CUDA, else why CUDA tests skip.
    Called from fixtures, never at import: collecting the tests probes no GPU."""
    try:
        import torch
    except ImportError:
        return "needs torch"
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU"
    import cpeft

    if not cpeft.has_cuda():
        return "needs a CUDA build of cpeft"
    return None


def skip_without_cuda():
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Every test taking ``device`` runs on the CPU and, where a GPU and a CUDA build of cpeft
    exist, on CUDA, under the same assertions and tolerances (skipped otherwise)."""
    if request.param == "cuda":
        skip_without_cuda()
    return request.param


@pytest.fixture
def rng(request):
    return np.random.default_rng(seed_for(request.node.nodeid))


def eps(dtype):
    return float(np.finfo(dtype).eps)


def absolute(value):
    """|value| for float arrays and Python floats; everything else (indices, flags, None, masks)
    is passed through. Used to evaluate a reference as an error bound."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return np.abs(value)
    if isinstance(value, float):
        return abs(value)
    return value


def bound_of(reference_fn, *args, **kwargs):
    """The reference evaluated on absolute values of all float inputs (see the module docstring)."""
    return reference_fn(*[absolute(a) for a in args], **{k: absolute(v) for k, v in kwargs.items()})


def assert_close(ours, ref, bound, dtype, k, name="result"):
    """Assert the tolerance rule of this module for one output."""
    ours = np.asarray(ours)
    ref = np.asarray(ref, dtype=np.float64)
    bound = np.asarray(bound, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape}, expected {ref.shape}"
    assert ours.dtype == np.dtype(dtype), f"{name}: dtype {ours.dtype}, expected {np.dtype(dtype)}"
    if ref.size == 0:
        return
    assert np.all(np.isfinite(ours)), f"{name}: non-finite values"
    err = np.abs(ours.astype(np.float64) - ref)
    allowed = TOL_FACTOR * eps(dtype) * math.sqrt(max(k, 1)) * bound + np.finfo(dtype).tiny
    bad = err > allowed
    if np.any(bad):
        worst = np.unravel_index(np.argmax(err / allowed), err.shape)
        raise AssertionError(
            f"{name} ({np.dtype(dtype).name}, K={k}): {int(bad.sum())} of {err.size} elements "
            f"outside tolerance; worst at {worst}: ours={ours[worst]!r} ref={ref[worst]!r} "
            f"err={err[worst]:.3e} allowed={allowed[worst]:.3e}"
        )


def central_difference(loss, array, h=1e-6):
    """The gradient of ``loss()`` with respect to ``array`` by central differences: each element
    is moved by +h and -h in place, the loss evaluated at both, and the element restored. In
    float64 with a loss linear in each single element the only error is cancellation (about
    eps * |loss| / h)."""
    numeric = np.zeros_like(array)
    for i in np.ndindex(array.shape):
        saved = array[i]
        array[i] = saved + h
        up = loss()
        array[i] = saved - h
        down = loss()
        array[i] = saved
        numeric[i] = (up - down) / (2 * h)
    return numeric


class DLPackOnly:
    """Exposes an array through the DLPack protocol only (not the NumPy C API)."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def random_array(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


LAYOUTS = ("c", "f", "transposed", "offset", "strided_last", "strided_first", "reversed")


def with_layout(a, layout):
    """An array equal to ``a`` whose memory layout is ``layout``:

    c: C-contiguous copy; f: Fortran order; transposed: the transpose of a C-contiguous array
    (what ``w.T`` of a stored weight gives); offset: a view starting 3 elements into a larger
    buffer (``big[3:]``, misaligned for vector loads); strided_last: every other element of a
    wider buffer along the last axis (``x[:, ::2]``, not BLAS-able); strided_first: every other
    row (``x[::2]``, BLAS-able with a larger row stride); reversed: negative stride on axis 0.
    """
    a = np.asarray(a)
    if layout == "c":
        return np.ascontiguousarray(a)
    if layout == "f":
        return np.asfortranarray(a)
    if layout == "transposed":
        return np.ascontiguousarray(a.T).T
    if layout == "offset":
        big = np.empty(a.size + 3, dtype=a.dtype)
        view = big[3:].reshape(a.shape)
        view[...] = a
        return view
    if layout == "strided_last":
        if a.ndim == 0:
            return a.copy()
        big = np.empty(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        view = big[..., ::2]
        view[...] = a
        return view
    if layout == "strided_first":
        if a.ndim == 0:
            return a.copy()
        big = np.empty((2 * a.shape[0],) + a.shape[1:], dtype=a.dtype)
        view = big[::2]
        view[...] = a
        return view
    if layout == "reversed":
        if a.ndim == 0:
            return a.copy()
        return np.ascontiguousarray(a[::-1])[::-1]
    raise ValueError(f"unknown layout {layout!r}")


def frozen_copy(a):
    """A bit-exact snapshot of an array's contents, to check that a call left it untouched."""
    return np.array(a, copy=True)


def assert_unchanged(after, before, name):
    assert after.shape == before.shape and after.dtype == before.dtype, name
    assert np.ascontiguousarray(after).tobytes() == np.ascontiguousarray(before).tobytes(), (
        f"{name} was modified"
    )
