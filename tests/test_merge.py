"""Merge / unmerge of LoRA and IA3 adapters into the frozen weight: the merged weight and the
merged forward agree with the reference and the unmerged forward, unmerge restores the weight
bit for bit (after 1 and after 100 cycles, even where rounding or underflow lost bits), and the
exception record is far smaller than the weight on typical data."""

import math

import numpy as np
import pytest

import reference as ref
from conftest import (
    FLOAT_DTYPES,
    assert_close,
    assert_unchanged,
    bound_of,
    frozen_copy,
    random_array,
    with_layout,
)
from cpeft import functional as F

IN, OUT, R, M = 24, 18, 4, 5


def mixed_magnitudes(rng, shape, dtype):
    """Values spanning most of dtype's exponent range, both signs, some exact zeros."""
    top = 30 if dtype == np.float32 else 250
    a = np.sign(rng.standard_normal(shape)) * 10.0 ** rng.uniform(-top, top, shape)
    a.flat[::7] = 0.0
    return a.astype(dtype)


def record_bytes_equal(record, logical_before):
    """Every recorded (index, value) pair is the pre-merge value at that index of the logical
    2-D view, bit for bit."""
    index, value = np.asarray(record.index), np.asarray(record.value)
    assert index.dtype == np.int64 and index.ndim == 1
    assert value.dtype == logical_before.dtype and value.shape == index.shape
    assert np.all((index >= 0) & (index < logical_before.size))
    assert np.unique(index).size == index.size
    return logical_before.reshape(-1)[index].tobytes() == value.tobytes()


# ------------------------------------------------------------------------------- LoRA linear

LORA_VARIANTS = {
    "plain": dict(),
    "grouped": dict(enable_lora=[True, False, True]),
    "fan_in_fan_out": dict(fan_in_fan_out=True),
    "fan_in_fan_out_view": dict(fan_in_fan_out=True),
    "grouped_fan_in_fan_out": dict(enable_lora=[False, True, True], fan_in_fan_out=True),
}


def lora_problem(rng, dtype, variant, weights="typical"):
    kw = LORA_VARIANTS[variant]
    enable = kw.get("enable_lora")
    k = 1 if enable is None else sum(enable)
    seg = OUT if enable is None else OUT // len(enable)
    fifo = kw.get("fan_in_fan_out", False)
    shape = (IN, OUT) if fifo else (OUT, IN)
    if weights == "typical":
        weight = random_array(rng, shape, dtype, 0.02)
        lora_b = random_array(rng, (seg * k, R), dtype, 0.01)
    else:
        weight = mixed_magnitudes(rng, shape, dtype)
        lora_b = random_array(rng, (seg * k, R), dtype, 3.0)
    if variant == "fan_in_fan_out_view":
        weight = with_layout(weight, "transposed")
    return dict(
        weight=weight,
        lora_a=random_array(rng, (R * k, IN), dtype, 1 / math.sqrt(IN)),
        lora_b=lora_b,
        scale=2.0,
        kw=kw,
    )


def logical(weight, kw):
    return weight.T if kw.get("fan_in_fan_out") else weight


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lora_merge_matches_reference_and_forward(rng, dtype, variant):
    p = lora_problem(rng, dtype, variant)
    kw = p["kw"]
    x = random_array(rng, (M, IN), dtype)
    bias = random_array(rng, (OUT,), dtype)
    y_unmerged, _ = F.lora_linear_forward(
        x, p["weight"], bias, p["lora_a"], p["lora_b"], p["scale"], **kw
    )
    before = frozen_copy(p["weight"])
    record = F.lora_merge(p["weight"], p["lora_a"], p["lora_b"], p["scale"], **kw)
    args = (before, p["lora_a"], p["lora_b"], p["scale"])
    assert_close(
        p["weight"],
        ref.lora_merged_weight(*args, **kw),
        bound_of(ref.lora_merged_weight, *args, **kw),
        dtype,
        R + 2,
        "merged weight",
    )
    assert record_bytes_equal(record, logical(before, kw))
    y_merged, _ = F.lora_linear_forward(x, p["weight"], bias, p["lora_a"], p["lora_b"], 0.0, **kw)
    fargs = (x, before, bias, p["lora_a"], p["lora_b"], p["scale"])
    y_bound, _ = bound_of(ref.lora_linear_forward, *fargs, **kw)
    assert_close(
        y_merged,
        y_unmerged.astype(np.float64),
        2 * y_bound,
        dtype,
        M + IN + OUT + R,
        "merged forward vs unmerged forward",
    )
    F.lora_unmerge(p["weight"], p["lora_a"], p["lora_b"], p["scale"], record, **kw)
    assert_unchanged(p["weight"], before, "weight after merge + unmerge")


@pytest.mark.parametrize("weights", ["typical", "mixed_magnitudes"])
@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lora_hundred_cycles_bit_exact(rng, dtype, variant, weights):
    p = lora_problem(rng, dtype, variant, weights)
    kw = p["kw"]
    before = frozen_copy(p["weight"])
    first_merge = None
    for cycle in range(100):
        record = F.lora_merge(p["weight"], p["lora_a"], p["lora_b"], p["scale"], **kw)
        if first_merge is None:
            first_merge = frozen_copy(p["weight"])
        else:
            assert_unchanged(p["weight"], first_merge, f"merged weight in cycle {cycle}")
        F.lora_unmerge(p["weight"], p["lora_a"], p["lora_b"], p["scale"], record, **kw)
        if cycle == 0:
            assert_unchanged(p["weight"], before, "weight after 1 cycle")
    assert_unchanged(p["weight"], before, "weight after 100 cycles")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lora_record_small_on_typical_data(rng, dtype):
    """|ΔW| about 1% of |W|: only a few percent of the elements lose bits in W + ΔW - ΔW."""
    weight = random_array(rng, (96, 128), dtype, 0.02)
    lora_a = random_array(rng, (8, 128), dtype, 1 / math.sqrt(128))
    lora_b = random_array(rng, (96, 8), dtype, 2e-4)
    record = F.lora_merge(weight, lora_a, lora_b, 1.0)
    assert 0 < len(record.index) < 0.1 * weight.size, (len(record.index), weight.size)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lora_zero_delta_needs_no_record(rng, dtype):
    weight = random_array(rng, (OUT, IN), dtype)
    before = frozen_copy(weight)
    record = F.lora_merge(weight, random_array(rng, (R, IN), dtype), np.zeros((OUT, R), dtype), 1.5)
    assert_unchanged(weight, before, "weight merged with B = 0")
    assert len(record.index) == 0 and len(record.value) == 0


# ------------------------------------------------------------------------------- LoRA embedding

V, D = 30, 12


@pytest.mark.parametrize("weights", ["typical", "mixed_magnitudes"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lora_embedding_merge(rng, dtype, weights):
    if weights == "typical":
        weight = random_array(rng, (V, D), dtype)
    else:
        weight = mixed_magnitudes(rng, (V, D), dtype)
    lora_a = random_array(rng, (R, V), dtype, 0.1)
    lora_b = random_array(rng, (D, R), dtype, 0.1)
    scale = 0.75
    indices = rng.integers(0, V, size=(3, 7))
    before = frozen_copy(weight)
    y_unmerged = F.lora_embedding_forward(indices, weight, lora_a, lora_b, scale)
    record = F.lora_embedding_merge(weight, lora_a, lora_b, scale)
    assert record_bytes_equal(record, before.T)
    args = (before, lora_a, lora_b, scale)
    if weights == "typical":
        assert_close(
            weight,
            ref.lora_embedding_merged_weight(*args),
            bound_of(ref.lora_embedding_merged_weight, *args),
            dtype,
            R + 2,
            "merged",
        )
        y_merged = F.lora_embedding_forward(indices, weight, lora_a, lora_b, 0.0)
        y_bound = bound_of(ref.lora_embedding_forward, indices, *args)
        assert_close(
            y_merged,
            y_unmerged.astype(np.float64),
            2 * y_bound,
            dtype,
            R + 2,
            "merged forward vs unmerged forward",
        )
    F.lora_embedding_unmerge(weight, lora_a, lora_b, scale, record)
    assert_unchanged(weight, before, "weight after 1 cycle")
    for _ in range(100):
        record = F.lora_embedding_merge(weight, lora_a, lora_b, scale)
        F.lora_embedding_unmerge(weight, lora_a, lora_b, scale, record)
    assert_unchanged(weight, before, "weight after 100 cycles")


# ------------------------------------------------------------------------------- IA3

IA3_VARIANTS = {
    "output_bias": dict(bias=True),
    "output_no_bias": dict(bias=False),
    "output_fan_in_fan_out": dict(bias=True, fan_in_fan_out=True),
    "feedforward": dict(feedforward=True),
    "feedforward_bias": dict(feedforward=True, bias=True),
    "feedforward_fan_in_fan_out": dict(feedforward=True, fan_in_fan_out=True),
}


def special_l(rng, n, dtype):
    """Scales with exact zeros, values that underflow or overflow W*l, negatives and ones."""
    l = (1 + 0.1 * rng.standard_normal(n)).astype(dtype)
    tiny = np.finfo(dtype).tiny
    specials = [0.0, tiny / 8, 1e-30, -1e-20, 1.0, -2.5, 1e20, 3 * tiny]
    l[: len(specials)] = np.array(specials[:n], dtype=dtype)
    return l


def ia3_problem(rng, dtype, variant, data):
    kw = dict(IA3_VARIANTS[variant])
    has_bias = kw.pop("bias", False)
    ff = kw.get("feedforward", False)
    fifo = kw.get("fan_in_fan_out", False)
    shape = (IN, OUT) if fifo else (OUT, IN)
    n = IN if ff else OUT
    l_shape = (1, n) if ff else (n, 1)
    if data == "typical":
        weight = random_array(rng, shape, dtype, 0.05)
        bias = random_array(rng, (OUT,), dtype) if has_bias else None
        l = (1 + 0.1 * rng.standard_normal(n)).astype(dtype)
    else:
        weight = mixed_magnitudes(rng, shape, dtype)
        bias = mixed_magnitudes(rng, (OUT,), dtype) if has_bias else None
        l = special_l(rng, n, dtype)
    return weight, bias, l.reshape(l_shape), kw


@pytest.mark.parametrize("variant", list(IA3_VARIANTS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ia3_merge_matches_reference_and_forward(rng, dtype, variant):
    weight, bias, l, kw = ia3_problem(rng, dtype, variant, "typical")
    x = random_array(rng, (M, IN), dtype)
    y_unmerged, _ = F.ia3_linear_forward(x, weight, bias, l, **kw)
    w_before = frozen_copy(weight)
    b_before = None if bias is None else frozen_copy(bias)
    w_record, b_record = F.ia3_merge(weight, l, bias=bias, **kw)
    want_w, want_b = ref.ia3_merged(w_before, l, bias=b_before, **kw)
    assert_close(weight, want_w, np.abs(want_w), dtype, 1, "merged weight")
    if not kw.get("fan_in_fan_out"):
        assert record_bytes_equal(w_record, w_before)
    if bias is None or kw.get("feedforward"):
        assert b_record is None
        if bias is not None:
            assert_unchanged(bias, b_before, "feedforward bias (IA3 input scaling leaves it)")
    else:
        assert_close(bias, want_b, np.abs(want_b), dtype, 1, "merged bias")
        assert record_bytes_equal(b_record, b_before.reshape(1, OUT))
    ones = np.ones_like(l)
    y_merged, _ = F.ia3_linear_forward(x, weight, bias, ones, **kw)
    y_bound, _ = bound_of(ref.ia3_linear_forward, x, w_before, b_before, l, **kw)
    assert_close(
        y_merged,
        y_unmerged.astype(np.float64),
        2 * y_bound,
        dtype,
        M + IN + OUT,
        "merged forward vs unmerged forward",
    )
    F.ia3_unmerge(weight, l, (w_record, b_record), bias=bias, **kw)
    assert_unchanged(weight, w_before, "weight after merge + unmerge")
    if bias is not None:
        assert_unchanged(bias, b_before, "bias after merge + unmerge")


@pytest.mark.parametrize("data", ["typical", "extreme"])
@pytest.mark.parametrize("variant", list(IA3_VARIANTS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ia3_hundred_cycles_bit_exact(rng, dtype, variant, data):
    """Including l with zeros (W*l = 0 cannot be divided back), l that underflows or overflows
    W*l, and weights spanning the whole exponent range."""
    weight, bias, l, kw = ia3_problem(rng, dtype, variant, data)
    w_before = frozen_copy(weight)
    b_before = None if bias is None else frozen_copy(bias)
    with np.errstate(all="ignore"):
        for cycle in range(100):
            records = F.ia3_merge(weight, l, bias=bias, **kw)
            F.ia3_unmerge(weight, l, records, bias=bias, **kw)
            if cycle == 0:
                assert_unchanged(weight, w_before, "weight after 1 cycle")
    assert_unchanged(weight, w_before, "weight after 100 cycles")
    if bias is not None:
        assert_unchanged(bias, b_before, "bias after 100 cycles")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ia3_zero_scale_is_recorded(rng, dtype):
    """A zero in l wipes its row in the merge; the record must hold every nonzero of that row."""
    weight = random_array(rng, (OUT, IN), dtype)
    l = np.ones((OUT, 1), dtype)
    l[5] = 0.0
    before = frozen_copy(weight)
    w_record, _ = F.ia3_merge(weight, l)
    assert np.all(weight[5] == 0)
    assert set(range(5 * IN, 6 * IN)) <= set(np.asarray(w_record.index).tolist())
    F.ia3_unmerge(weight, l, (w_record, None))
    assert_unchanged(weight, before, "weight")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ia3_record_small_on_typical_data(rng, dtype):
    weight = random_array(rng, (96, 128), dtype, 0.05)
    l = (1 + 0.1 * rng.standard_normal((96, 1))).astype(dtype)
    w_record, _ = F.ia3_merge(weight, l)
    assert 0 < len(w_record.index) < 0.1 * weight.size, (len(w_record.index), weight.size)


@pytest.mark.parametrize("data", ["typical", "extreme"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ia3_embedding_merge(rng, dtype, data):
    if data == "typical":
        weight = random_array(rng, (V, D), dtype)
        l = (1 + 0.1 * rng.standard_normal(D)).astype(dtype)
    else:
        weight = mixed_magnitudes(rng, (V, D), dtype)
        l = special_l(rng, D, dtype)
    before = frozen_copy(weight)
    indices = rng.integers(0, V, size=(9,))
    y_unmerged = F.ia3_embedding_forward(indices, weight, l)
    with np.errstate(all="ignore"):
        record = F.ia3_embedding_merge(weight, l)
        want = ref.ia3_embedding_merged_weight(before, l)
    assert record_bytes_equal(record, before)
    if data == "typical":
        assert_close(weight, want, np.abs(want), dtype, 1, "merged weight")
        y_merged = F.ia3_embedding_forward(indices, weight, np.ones_like(l))
        np.testing.assert_array_equal(y_merged, y_unmerged)
    F.ia3_embedding_unmerge(weight, l, record)
    assert_unchanged(weight, before, "weight after 1 cycle")
    for _ in range(100):
        record = F.ia3_embedding_merge(weight, l)
        F.ia3_embedding_unmerge(weight, l, record)
    assert_unchanged(weight, before, "weight after 100 cycles")


# ------------------------------------------------------------------------------- torch weights
# A torch weight merges in two C calls: a count pass that keeps ΔW in a scratch, the record
# allocated with torch, then the merge reading ΔW from the scratch (functional._merge). Its result
# and record are the NumPy path's (one C call that runs the GEMMs in both of its passes).


def torch_copy(array):
    """A torch tensor holding a copy of array in the same memory layout (transposed views stay
    transposed)."""
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.array(array, order="K", copy=True))


def assert_same_record(ours, expected, name):
    np.testing.assert_array_equal(np.asarray(ours.index), np.asarray(expected.index), name)
    assert np.asarray(ours.value).tobytes() == np.asarray(expected.value).tobytes(), name


@pytest.mark.parametrize("weights", ["typical", "mixed_magnitudes"])
@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lora_merge_of_torch_weight_matches_numpy_path(rng, dtype, variant, weights):
    p = lora_problem(rng, dtype, variant, weights)
    kw = p["kw"]
    before = frozen_copy(p["weight"])
    weight = torch_copy(p["weight"])
    lora_a, lora_b = torch_copy(p["lora_a"]), torch_copy(p["lora_b"])
    record = F.lora_merge(weight, lora_a, lora_b, p["scale"], **kw)
    numpy_record = F.lora_merge(p["weight"], p["lora_a"], p["lora_b"], p["scale"], **kw)
    assert_unchanged(weight.numpy(), p["weight"], "torch-merged weight vs the NumPy path's")
    assert_same_record(record, numpy_record, "torch record vs the NumPy path's")
    assert record_bytes_equal(record, logical(before, kw))
    if weights == "typical":
        args = (before, p["lora_a"], p["lora_b"], p["scale"])
        assert_close(
            weight.numpy(),
            ref.lora_merged_weight(*args, **kw),
            bound_of(ref.lora_merged_weight, *args, **kw),
            dtype,
            R + 2,
            "merged weight",
        )
    F.lora_unmerge(weight, lora_a, lora_b, p["scale"], record, **kw)
    assert_unchanged(weight.numpy(), before, "torch weight after merge + unmerge")


@pytest.mark.parametrize("weights", ["typical", "mixed_magnitudes"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lora_embedding_merge_of_torch_weight_matches_numpy_path(rng, dtype, weights):
    weight = (
        random_array(rng, (V, D), dtype)
        if weights == "typical"
        else mixed_magnitudes(rng, (V, D), dtype)
    )
    lora_a, lora_b = random_array(rng, (R, V), dtype, 0.1), random_array(rng, (D, R), dtype, 0.1)
    before = frozen_copy(weight)
    tw, ta, tb = torch_copy(weight), torch_copy(lora_a), torch_copy(lora_b)
    record = F.lora_embedding_merge(tw, ta, tb, 0.75)
    numpy_record = F.lora_embedding_merge(weight, lora_a, lora_b, 0.75)
    assert_unchanged(tw.numpy(), weight, "torch-merged weight vs the NumPy path's")
    assert_same_record(record, numpy_record, "torch record vs the NumPy path's")
    if weights == "typical":
        args = (before, lora_a, lora_b, 0.75)
        assert_close(
            tw.numpy(),
            ref.lora_embedding_merged_weight(*args),
            bound_of(ref.lora_embedding_merged_weight, *args),
            dtype,
            R + 2,
            "merged",
        )
    F.lora_embedding_unmerge(tw, ta, tb, 0.75, record)
    assert_unchanged(tw.numpy(), before, "torch weight after merge + unmerge")


def counted_with_delta(rng, dtype):
    """A torch weight, its adapter, and the count pass's result with a NaN-filled ΔW scratch."""
    torch = pytest.importorskip("torch")
    from cpeft import _C

    weight = torch_copy(random_array(rng, (OUT, IN), dtype, 0.02))
    lora_a = torch_copy(random_array(rng, (R, IN), dtype, 1 / math.sqrt(IN)))
    lora_b = torch_copy(random_array(rng, (OUT, R), dtype, 0.01))
    delta = torch.full((OUT * IN,), float("nan"), dtype=weight.dtype)
    count = _C.lora_merge(weight, lora_a, lora_b, 2.0, count_only=True, delta=delta)
    return _C, torch, weight, lora_a, lora_b, delta, count


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lora_merge_applies_the_delta_its_count_pass_kept(rng, dtype):
    """ΔW is computed once: the count pass writes all of it to the scratch (compared without
    assuming its layout), and the merge pass takes it from there instead of running the GEMMs
    again (a zeroed scratch merges nothing)."""
    _C, torch, weight, lora_a, lora_b, delta, count = counted_with_delta(rng, dtype)
    before = frozen_copy(weight.numpy())
    assert count > 0
    assert_unchanged(weight.numpy(), before, "weight after the count pass")
    want = ref.lora_delta(lora_a.numpy(), lora_b.numpy(), 2.0, OUT).reshape(-1)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(
        np.sort(delta.numpy()), np.sort(want), rtol=tol, atol=tol * np.abs(want).max()
    )
    delta.zero_()
    record = _C.lora_merge(
        weight,
        lora_a,
        lora_b,
        2.0,
        delta=delta,
        index=torch.empty(0, dtype=torch.int64),
        value=torch.empty(0, dtype=weight.dtype),
    )
    assert len(record[0]) == 0
    assert_unchanged(weight.numpy(), before, "weight merged with a zeroed ΔW scratch")


@pytest.mark.parametrize("entry", ["lora_merge", "lora_embedding_merge"])
def test_functional_torch_merge_hands_one_delta_to_both_calls(rng, monkeypatch, entry):
    """cpeft.functional's side of computing ΔW once: the count pass and the merge of a torch
    weight get the same scratch, so the merge reads what the count pass computed."""
    from cpeft import _C

    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return getattr(_C, entry)(*args, **kwargs)

    monkeypatch.setattr(F, "_C", type("RecordingC", (), {entry: staticmethod(recording)}))
    shapes = {
        "lora_merge": ((OUT, IN), (R, IN), (OUT, R)),
        "lora_embedding_merge": ((V, D), (R, V), (D, R)),
    }[entry]
    weight, lora_a, lora_b = (
        torch_copy(random_array(rng, shape, np.float32, 0.1)) for shape in shapes
    )
    getattr(F, entry)(weight, lora_a, lora_b, 0.5)
    assert [bool(kw.get("count_only")) for kw in calls] == [True, False]
    assert calls[0]["delta"] is calls[1]["delta"] and calls[0]["delta"].numel() == weight.numel()


@pytest.mark.parametrize("changed", ["weight", "delta"])
def test_lora_merge_refuses_a_weight_or_delta_changed_after_the_count_pass(rng, changed):
    """The merge counts again (from the scratch, without GEMMs) before it writes anything, so a
    weight or scratch changed between the two calls gives a record of the wrong size, refused
    with the weight untouched."""
    _C, torch, weight, lora_a, lora_b, delta, count = counted_with_delta(rng, np.float32)
    assert 0 < count < weight.numel() // 2
    if changed == "weight":
        weight.zero_()  # 0 + d - d is 0 again: nothing to record
    else:
        delta.fill_(1.0)  # W + 1 - 1 loses low bits of almost every element
    before = frozen_copy(weight.numpy())
    with pytest.raises(ValueError, match="record.index must have exactly .* entries"):
        _C.lora_merge(
            weight,
            lora_a,
            lora_b,
            2.0,
            delta=delta,
            index=torch.empty(count, dtype=torch.int64),
            value=torch.empty(count, dtype=weight.dtype),
        )
    assert_unchanged(weight.numpy(), before, "weight after the refused merge")


def test_lora_merge_delta_is_checked(rng):
    from cpeft import _C

    weight = random_array(rng, (OUT, IN), np.float32)
    lora_a, lora_b = random_array(rng, (R, IN), np.float32), random_array(rng, (OUT, R), np.float32)
    before = frozen_copy(weight)
    bad = {
        "dtype float32": np.empty(OUT * IN, np.float64),
        r"shape \(432,\)": np.empty((OUT, IN), np.float32),
        "writeable": np.empty(OUT * IN, np.float32),
        "aliases": weight.reshape(-1),
        "contiguous": np.empty(2 * OUT * IN, np.float32)[::2],
    }
    bad["writeable"].flags.writeable = False
    for message, delta in bad.items():
        with pytest.raises(ValueError, match=f"delta.*{message}|{message}.*delta"):
            _C.lora_merge(weight, lora_a, lora_b, 1.0, count_only=True, delta=delta)
        assert_unchanged(weight, before, f"weight after a delta refused for {message}")
