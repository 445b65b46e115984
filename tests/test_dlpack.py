"""Tensors crossing the boundary through DLPack: torch CPU tensors in and out for every entry
point, strided and transposed views, tensors requiring grad, raw legacy and versioned capsules,
NumPy through __dlpack__, zero-copy outputs, one-shot capsules, and no torch import."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import DLPackOnly
from cpeft import functional as F
from test_bad_input import POSITIONAL, call, valid_args

torch = pytest.importorskip("torch")
from torch.utils import dlpack as torch_dlpack  # noqa: E402

M, IN, OUT, R = 4, 5, 6, 2


def to_torch(value):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*[to_torch(v) for v in value])
    if isinstance(value, tuple):
        return tuple(to_torch(v) for v in value)
    return value


def results(value):
    """Flatten a call's result (array, tuple, named tuple, None) into a list of leaves."""
    if isinstance(value, tuple):
        return [leaf for v in value for leaf in results(v)]
    return [value]


@pytest.mark.parametrize("entry", sorted(set(POSITIONAL) - {"dropout_mask"}))
def test_torch_in_torch_out(entry):
    """Every entry point accepts torch CPU tensors, returns torch tensors allocated by torch, and
    computes exactly what it computes on the same data as NumPy arrays."""
    np_args = valid_args(entry)
    torch_args = {k: to_torch(v) for k, v in np_args.items()}
    got = call(entry, torch_args)
    want = call(entry, np_args)
    got_leaves, want_leaves = results(got), results(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        if w is None:
            assert g is None
            continue
        assert isinstance(g, torch.Tensor), type(g)
        np.testing.assert_array_equal(g.numpy(), w)
    for name, value in np_args.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(torch_args[name].numpy(), value, err_msg=name)


def linear_tensors(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(M, IN, generator=g, dtype=dtype),
        weight=torch.randn(OUT, IN, generator=g, dtype=dtype),
        bias=torch.randn(OUT, generator=g, dtype=dtype),
        lora_a=torch.randn(R, IN, generator=g, dtype=dtype),
        lora_b=torch.randn(OUT, R, generator=g, dtype=dtype),
    )


def numpy_forward(t, **kw):
    return F.lora_linear_forward(
        t["x"].numpy(),
        t["weight"].numpy(),
        t["bias"].numpy(),
        t["lora_a"].numpy(),
        t["lora_b"].numpy(),
        0.5,
        **kw,
    )


def test_zero_copy_outputs():
    """out= tensors from torch.empty are written in place: the returned tensors share their
    storage and the values are visible through the caller's own handles."""
    t = linear_tensors()
    out = torch.empty(M, OUT)
    out_xa = torch.empty(M, R)
    y, xa = F.lora_linear_forward(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5, out=out, out_xa=out_xa
    )
    assert y.data_ptr() == out.data_ptr() and xa.data_ptr() == out_xa.data_ptr()
    y_np, xa_np = numpy_forward(t)
    np.testing.assert_array_equal(out.numpy(), y_np)
    np.testing.assert_array_equal(out_xa.numpy(), xa_np)


def test_column_major_torch_output():
    t = linear_tensors()
    out = torch.empty(OUT, M).T
    F.lora_linear_forward(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5, out=out)
    np.testing.assert_allclose(out.numpy(), numpy_forward(t)[0], rtol=1e-6, atol=1e-6)


def test_preallocated_torch_gradients():
    t = linear_tensors(torch.float64)
    g = torch.randn(M, OUT, dtype=torch.float64)
    _, xa = F.lora_linear_forward(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5)
    buffers = dict(
        grad_x=torch.empty(M, IN, dtype=torch.float64),
        grad_lora_a=torch.empty(R, IN, dtype=torch.float64),
        grad_lora_b=torch.empty(OUT, R, dtype=torch.float64),
    )
    grads = F.lora_linear_backward(
        g, t["x"], t["weight"], t["lora_a"], t["lora_b"], xa, 0.5, **buffers
    )
    want = F.lora_linear_backward(
        g.numpy(),
        t["x"].numpy(),
        t["weight"].numpy(),
        t["lora_a"].numpy(),
        t["lora_b"].numpy(),
        xa.numpy(),
        0.5,
    )
    for name in ("x", "lora_a", "lora_b"):
        assert getattr(grads, name).data_ptr() == buffers[f"grad_{name}"].data_ptr()
        np.testing.assert_array_equal(buffers[f"grad_{name}"].numpy(), getattr(want, name))


@pytest.mark.parametrize(
    "view",
    [
        "transposed_x",
        "strided_x",
        "row_strided_x",
        "offset_x",
        "fan_in_fan_out_weight",
        "transposed_lora_b",
    ],
)
def test_strided_torch_tensors(view):
    t = linear_tensors(torch.float64)
    kw = {}
    if view == "transposed_x":
        t["x"] = t["x"].T.contiguous().T
    elif view == "strided_x":
        t["x"] = torch.randn(M, 2 * IN, dtype=torch.float64)[:, ::2]
    elif view == "row_strided_x":
        t["x"] = torch.randn(2 * M, IN, dtype=torch.float64)[::2]
    elif view == "offset_x":
        t["x"] = torch.randn(M * IN + 3, dtype=torch.float64)[3:].view(M, IN)
    elif view == "fan_in_fan_out_weight":
        t["weight"] = t["weight"].T
        kw["fan_in_fan_out"] = True
    else:
        t["lora_b"] = t["lora_b"].T.contiguous().T
    y, xa = F.lora_linear_forward(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5, **kw
    )
    compact = {k: np.ascontiguousarray(v.numpy()) for k, v in t.items()}
    y_np, xa_np = F.lora_linear_forward(
        compact["x"],
        compact["weight"],
        compact["bias"],
        compact["lora_a"],
        compact["lora_b"],
        0.5,
        **kw,
    )
    np.testing.assert_allclose(y.numpy(), y_np, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(xa.numpy(), xa_np, rtol=1e-13, atol=1e-13)


def test_tensors_requiring_grad_are_detached():
    t = {k: torch.nn.Parameter(v) for k, v in linear_tensors().items()}
    y, xa = F.lora_linear_forward(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5)
    assert not y.requires_grad and not xa.requires_grad
    detached = {k: v.detach() for k, v in t.items()}
    np.testing.assert_array_equal(y.numpy(), numpy_forward(detached)[0])
    before = t["weight"].detach().clone()
    record = F.lora_merge(t["weight"], t["lora_a"], t["lora_b"], 0.5)
    assert not torch.equal(t["weight"].detach(), before)
    F.lora_unmerge(t["weight"], t["lora_a"], t["lora_b"], 0.5, record)
    assert torch.equal(t["weight"].detach(), before)


def test_torch_merge_in_place_and_record_framework():
    t = linear_tensors()
    before = t["weight"].clone()
    record = F.lora_merge(t["weight"], t["lora_a"], t["lora_b"], 0.5)
    assert isinstance(record.index, torch.Tensor) and isinstance(record.value, torch.Tensor)
    assert record.index.dtype == torch.int64 and record.value.dtype == torch.float32
    want = before.double() + 0.5 * (t["lora_b"].double() @ t["lora_a"].double())
    np.testing.assert_allclose(t["weight"].numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
    F.lora_unmerge(t["weight"], t["lora_a"], t["lora_b"], 0.5, record)
    assert torch.equal(t["weight"], before)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_torch_indices(index_dtype):
    weight = torch.randn(7, 3)
    lora_a, lora_b = torch.randn(2, 7), torch.randn(3, 2)
    idx = torch.tensor([[0, 6], [3, 3]], dtype=index_dtype)
    y = F.lora_embedding_forward(idx, weight, lora_a, lora_b, 2.0)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 2, 3)
    want = F.lora_embedding_forward(
        idx.numpy(), weight.numpy(), lora_a.numpy(), lora_b.numpy(), 2.0
    )
    np.testing.assert_array_equal(y.numpy(), want)


CAPSULE_KINDS = ["legacy_to_dlpack", "versioned", "legacy_method"]


def capsule_of(tensor, kind):
    if kind == "legacy_to_dlpack":
        return torch_dlpack.to_dlpack(tensor)
    if kind == "versioned":
        return tensor.__dlpack__(max_version=(1, 0))
    return tensor.__dlpack__()


@pytest.mark.parametrize("kind", CAPSULE_KINDS)
def test_raw_capsules(kind):
    t = linear_tensors()
    capsules = {k: capsule_of(v, kind) for k, v in t.items()}
    expected_name = "dltensor_versioned" if kind == "versioned" else "dltensor"
    assert f'"{expected_name}"' in repr(capsules["x"])
    out, out_xa = np.empty((M, OUT), np.float32), np.empty((M, R), np.float32)
    F.lora_linear_forward(
        capsules["x"],
        capsules["weight"],
        capsules["bias"],
        capsules["lora_a"],
        capsules["lora_b"],
        0.5,
        out=out,
        out_xa=out_xa,
    )
    y_np, xa_np = numpy_forward(t)
    np.testing.assert_array_equal(out, y_np)
    np.testing.assert_array_equal(out_xa, xa_np)
    assert f'"used_{expected_name}"' in repr(capsules["x"])


@pytest.mark.parametrize("kind", CAPSULE_KINDS)
def test_capsule_reuse_rejected(kind):
    t = linear_tensors()
    capsule = capsule_of(t["x"], kind)
    out, out_xa = np.empty((M, OUT), np.float32), np.empty((M, R), np.float32)
    args = (t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5)
    F.lora_linear_forward(capsule, *args, out=out, out_xa=out_xa)
    with pytest.raises((TypeError, ValueError, BufferError), match="(?i)capsule|dltensor|used"):
        F.lora_linear_forward(capsule, *args, out=out, out_xa=out_xa)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_numpy_through_dlpack_protocol(layout):
    t = linear_tensors()
    arrays = {k: v.numpy() for k, v in t.items()}
    if layout == "transposed":
        arrays["x"] = np.asfortranarray(arrays["x"])
    elif layout == "strided":
        big = np.zeros((M, 2 * IN), np.float32)
        big[:, ::2] = arrays["x"]
        arrays["x"] = big[:, ::2]
    wrapped = {k: DLPackOnly(v) for k, v in arrays.items()}
    out, out_xa = np.empty((M, OUT), np.float32), np.empty((M, R), np.float32)
    F.lora_linear_forward(
        wrapped["x"],
        wrapped["weight"],
        wrapped["bias"],
        wrapped["lora_a"],
        wrapped["lora_b"],
        0.5,
        out=out,
        out_xa=out_xa,
    )
    y_np, xa_np = numpy_forward(t)
    np.testing.assert_allclose(out, y_np, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out_xa, xa_np, rtol=1e-6, atol=1e-6)


def test_output_reached_only_through_dlpack():
    """An output that is only reachable through DLPack is written in place (zero copy)."""
    t = linear_tensors()
    out, out_xa = np.zeros((M, OUT), np.float32), np.zeros((M, R), np.float32)
    F.lora_linear_forward(
        t["x"],
        t["weight"],
        t["bias"],
        t["lora_a"],
        t["lora_b"],
        0.5,
        out=DLPackOnly(out),
        out_xa=DLPackOnly(out_xa),
    )
    np.testing.assert_array_equal(out, numpy_forward(t)[0])


def test_import_does_not_import_torch():
    code = (
        "import sys, cpeft, cpeft.functional; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env_path = ":".join(p for p in sys.path if p)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
