"""Every entry point of cpeft.functional rejects bad input with the documented exception type and
a message naming the offending argument, and leaves every array it was given untouched."""

import ctypes
import sys

import numpy as np
import pytest

from cpeft import functional as F

M, IN, OUT, R, V, D = 4, 5, 6, 2, 7, 3
DT = np.float32

# The entry points' positional arguments, in order (tests/fuzz/generator.py reads it too).
POSITIONAL = {
    "lora_linear_forward": ("x", "weight", "bias", "lora_a", "lora_b", "scale"),
    "lora_linear_backward": ("grad_out", "x", "weight", "lora_a", "lora_b", "xa", "scale"),
    "lora_embedding_forward": ("indices", "weight", "lora_a", "lora_b", "scale"),
    "lora_embedding_backward": ("grad_out", "indices", "lora_a", "lora_b", "scale"),
    "ia3_linear_forward": ("x", "weight", "bias", "ia3_l"),
    "ia3_linear_backward": ("grad_out", "x", "weight", "ia3_l", "base"),
    "ia3_embedding_forward": ("indices", "weight", "ia3_l"),
    "ia3_embedding_backward": ("grad_out", "indices", "weight", "ia3_l"),
    "lora_merge": ("weight", "lora_a", "lora_b", "scale"),
    "lora_unmerge": ("weight", "lora_a", "lora_b", "scale", "record"),
    "lora_embedding_merge": ("weight", "lora_a", "lora_b", "scale"),
    "lora_embedding_unmerge": ("weight", "lora_a", "lora_b", "scale", "record"),
    "ia3_merge": ("weight", "ia3_l"),
    "ia3_unmerge": ("weight", "ia3_l", "records"),
    "ia3_embedding_merge": ("weight", "ia3_l"),
    "ia3_embedding_unmerge": ("weight", "ia3_l", "record"),
    "dropout_mask": ("shape", "p", "seed", "offset"),
}


def arr(*shape, dtype=DT):
    return np.random.default_rng(sum(shape) + len(shape)).standard_normal(shape).astype(dtype)


def indices(*values, dtype=np.int64):
    return np.array(values, dtype=dtype)


def valid_args(entry):
    """A valid call of ``entry`` (M=4 rows, IN=5, OUT=6, R=2, V=7, D=3, float32)."""
    lora_linear = dict(
        x=arr(M, IN),
        weight=arr(OUT, IN),
        bias=arr(OUT),
        lora_a=arr(R, IN),
        lora_b=arr(OUT, R),
        scale=0.5,
    )
    lora_emb = dict(
        indices=indices(0, 3, 6, 3), weight=arr(V, D), lora_a=arr(R, V), lora_b=arr(D, R), scale=0.5
    )
    ia3_linear = dict(x=arr(M, IN), weight=arr(OUT, IN), bias=arr(OUT), ia3_l=arr(OUT, 1))
    ia3_emb = dict(indices=indices(0, 3, 6, 3), weight=arr(V, D), ia3_l=arr(D))
    table = {
        "lora_linear_forward": lora_linear,
        "lora_linear_backward": dict(lora_linear, grad_out=arr(M, OUT), xa=arr(M, R), bias=None),
        "lora_embedding_forward": lora_emb,
        "lora_embedding_backward": dict(
            grad_out=arr(M, D),
            indices=lora_emb["indices"],
            lora_a=lora_emb["lora_a"],
            lora_b=lora_emb["lora_b"],
            scale=0.5,
        ),
        "ia3_linear_forward": ia3_linear,
        "ia3_linear_backward": dict(ia3_linear, grad_out=arr(M, OUT), base=arr(M, OUT), bias=None),
        "ia3_embedding_forward": ia3_emb,
        "ia3_embedding_backward": dict(ia3_emb, grad_out=arr(M, D)),
        "lora_merge": dict(weight=arr(OUT, IN), lora_a=arr(R, IN), lora_b=arr(OUT, R), scale=0.5),
        "lora_embedding_merge": dict(
            weight=arr(V, D), lora_a=arr(R, V), lora_b=arr(D, R), scale=0.5
        ),
        "ia3_merge": dict(weight=arr(OUT, IN), ia3_l=arr(OUT, 1)),
        "ia3_embedding_merge": dict(weight=arr(V, D), ia3_l=arr(D)),
        "dropout_mask": dict(shape=(M, IN), p=0.5, seed=1, offset=0),
    }
    for merge in ("lora_merge", "lora_embedding_merge", "ia3_merge", "ia3_embedding_merge"):
        unmerge = merge.replace("merge", "unmerge")
        args = dict(table[merge])
        record = call(merge, dict(args, weight=args["weight"].copy()))
        args["records" if unmerge == "ia3_unmerge" else "record"] = record
        table[unmerge] = args
    table["lora_linear_backward"].pop("bias")
    table["ia3_linear_backward"].pop("bias")
    return {k: v for k, v in table[entry].items()}


def call(entry, args):
    names = POSITIONAL[entry]
    keywords = {k: v for k, v in args.items() if k not in names}
    return getattr(F, entry)(*[args[n] for n in names], **keywords)


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def non_blas(shape, dtype=DT):
    """A view every second element along the last axis: no BLAS leading dimension exists."""
    return np.zeros(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]


def overlapping(shape_a, shape_b, shift):
    """Two views of one buffer that share elements."""
    buf = np.zeros(int(np.prod(shape_a)) + int(np.prod(shape_b)), DT)
    return (
        buf[: int(np.prod(shape_a))].reshape(shape_a),
        buf[shift : shift + int(np.prod(shape_b))].reshape(shape_b),
    )


def overlapping_x_out(_args):
    x, out = overlapping((M, IN), (M, OUT), 10)
    x[...] = arr(M, IN)
    return {"x": x, "out": out}


def overlapping_grads(_args):
    ga, gb = overlapping((R, IN), (OUT, R), 4)
    return {"grad_lora_a": ga, "grad_lora_b": gb}


def bad_record(entry, field):
    """A record whose index or value does not fit the weight."""

    def change(args):
        key = "records" if entry == "ia3_unmerge" else "record"
        record = args[key][0] if entry == "ia3_unmerge" else args[key]
        size = args["weight"].size
        if field == "index_range":
            new = type(record)(np.array([size + 3], np.int64), np.zeros(1, DT))
        elif field == "value_dtype":
            new = type(record)(np.array([0], np.int64), np.zeros(1, np.float64))
        else:
            new = type(record)(np.array([0, 1], np.int64), np.zeros(1, DT))
        return {key: (new, args[key][1]) if entry == "ia3_unmerge" else new}

    return change


X = r"\bx\b"
CASES = []


def case(entry, change, exc, match, name):
    CASES.append(pytest.param(entry, change, exc, match, id=f"{entry}-{name}"))


def common_linear_cases(entry, lora):
    """Cases shared by the LoRA/IA3 linear forward and backward."""
    case(entry, {"x": object()}, TypeError, X, "x_object")
    case(entry, {"x": "not an array"}, TypeError, X, "x_str")
    case(entry, {"weight": object()}, TypeError, "weight", "weight_object")
    case(entry, {"x": arr(M, IN).astype(np.int32)}, ValueError, X, "x_int32")
    case(entry, {"x": arr(M, IN).astype(np.float16)}, ValueError, X, "x_float16")
    case(entry, {"x": np.ones((), DT)}, ValueError, X, "x_0d")
    case(entry, {"weight": arr(OUT, IN).astype(np.float64)}, ValueError, "weight", "weight_mixed")
    case(entry, {"weight": arr(OUT, IN, 1)}, ValueError, "weight", "weight_3d")
    case(entry, {"weight": arr(OUT * IN)}, ValueError, "weight", "weight_1d")
    case(entry, {"weight": arr(OUT, IN + 1)}, ValueError, f"weight|{X}", "weight_in_mismatch")
    case(entry, {"x": arr(M, IN + 1)}, ValueError, f"weight|{X}", "x_in_mismatch")
    case(entry, {"fan_in_fan_out": True}, ValueError, f"weight|{X}", "fan_in_fan_out_layout")
    if lora:
        case(entry, {"lora_a": object()}, TypeError, "lora_a", "lora_a_object")
        case(entry, {"lora_b": [[1.0]]}, (TypeError, ValueError), "lora_b", "lora_b_list")
        case(entry, {"lora_a": arr(R, IN).astype(np.float64)}, ValueError, "lora_a", "lora_a_mixed")
        case(entry, {"lora_b": arr(OUT, R).astype(np.int64)}, ValueError, "lora_b", "lora_b_int64")
        case(entry, {"lora_a": arr(R * IN)}, ValueError, "lora_a", "lora_a_1d")
        case(entry, {"lora_a": arr(1, R, IN)}, ValueError, "lora_a", "lora_a_3d")
        case(entry, {"lora_b": arr(OUT)}, ValueError, "lora_b", "lora_b_1d")
        case(entry, {"lora_a": arr(R, IN + 1)}, ValueError, "lora_a", "lora_a_in_mismatch")
        case(entry, {"lora_b": arr(OUT + 1, R)}, ValueError, "lora_b", "lora_b_out_mismatch")
        case(entry, {"lora_b": arr(OUT, R + 1)}, ValueError, "lora_[ab]", "rank_mismatch")
        for bad in (float("nan"), float("inf"), -float("inf")):
            case(entry, {"scale": bad}, ValueError, "scale", f"scale_{bad}")
        case(entry, {"scale": "half"}, TypeError, "scale", "scale_str")
        for bad in (-0.1, 1.5, float("nan")):
            case(entry, {"dropout": bad}, ValueError, "dropout", f"dropout_{bad}")
        case(entry, {"seed": -1}, ValueError, "seed", "seed_negative")
        case(entry, {"offset": -1}, ValueError, "offset", "offset_negative")
        case(entry, {"enable_lora": [True] * 4}, ValueError, "enable_lora", "enable_not_dividing")
        case(entry, {"enable_lora": [False, False]}, ValueError, "enable_lora", "enable_all_false")
        case(entry, {"enable_lora": []}, ValueError, "enable_lora", "enable_empty")
        case(
            entry,
            {"enable_lora": [True, False]},
            ValueError,
            "lora_b|enable_lora",
            "enable_lora_b_rows",
        )
    else:
        case(entry, {"ia3_l": object()}, TypeError, "ia3_l", "ia3_l_object")
        case(entry, {"ia3_l": arr(OUT, 1).astype(np.float64)}, ValueError, "ia3_l", "ia3_l_mixed")
        case(entry, {"ia3_l": arr(OUT + 1)}, ValueError, "ia3_l", "ia3_l_numel")
        case(entry, {"ia3_l": arr(OUT, 1, 1)}, ValueError, "ia3_l", "ia3_l_3d")
        case(entry, {"ia3_l": arr(2, 3)}, ValueError, "ia3_l", "ia3_l_not_vector")
        feedforward = {"feedforward": True}
        if entry.endswith("backward"):
            feedforward["base"] = None
        case(entry, feedforward, ValueError, "ia3_l", "feedforward_numel")


# ---- LoRA linear
E = "lora_linear_forward"
common_linear_cases(E, lora=True)
case(E, {"bias": object()}, TypeError, "bias", "bias_object")
case(E, {"bias": arr(OUT, 1)}, ValueError, "bias", "bias_2d")
case(E, {"bias": arr(OUT + 1)}, ValueError, "bias", "bias_length")
case(E, {"bias": arr(OUT).astype(np.float64)}, ValueError, "bias", "bias_mixed")
case(E, {"out": np.zeros((M, OUT + 1), DT)}, ValueError, "out", "out_shape")
case(E, {"out": np.zeros((M, OUT), np.float64)}, ValueError, "out", "out_dtype")
case(E, {"out": read_only(np.zeros((M, OUT), DT))}, ValueError, "out", "out_read_only")
case(E, {"out": non_blas((M, OUT))}, ValueError, "out", "out_not_blas")
case(E, {"out": object()}, TypeError, "out", "out_object")
case(E, overlapping_x_out, ValueError, "out", "out_overlaps_x")
case(E, {"out_xa": np.zeros((M, R + 1), DT)}, ValueError, "out_xa", "out_xa_shape")
case(E, {"out_xa": read_only(np.zeros((M, R), DT))}, ValueError, "out_xa", "out_xa_read_only")
case(E, lambda a: {"out_xa": a["lora_a"].T[:M]}, ValueError, "out_xa", "out_xa_views_lora_a")

E = "lora_linear_backward"
common_linear_cases(E, lora=True)
case(E, {"grad_out": object()}, TypeError, "grad_out", "grad_out_object")
case(E, {"grad_out": arr(M, OUT + 1)}, ValueError, "grad_out", "grad_out_width")
case(E, {"grad_out": arr(M + 1, OUT)}, ValueError, f"grad_out|{X}", "grad_out_rows")
case(E, {"grad_out": arr(M, OUT).astype(np.float64)}, ValueError, "grad_out", "grad_out_mixed")
case(E, {"xa": arr(M, R + 1)}, ValueError, "xa", "xa_width")
case(E, {"xa": arr(M + 1, R)}, ValueError, "xa", "xa_rows")
case(E, {"xa": arr(M, R).astype(np.int32)}, ValueError, "xa", "xa_int32")
case(E, {"xa": object()}, TypeError, "xa", "xa_object")
case(E, {"grad_x": np.zeros((M, IN + 1), DT)}, ValueError, "grad_x", "grad_x_shape")
case(E, {"grad_x": np.zeros((M, IN), np.float64)}, ValueError, "grad_x", "grad_x_dtype")
case(E, {"grad_x": read_only(np.zeros((M, IN), DT))}, ValueError, "grad_x", "grad_x_read_only")
case(E, {"grad_x": non_blas((M, IN))}, ValueError, "grad_x", "grad_x_not_blas")
case(E, {"grad_lora_a": np.zeros((R + 1, IN), DT)}, ValueError, "grad_lora_a", "grad_a_shape")
case(E, {"grad_lora_b": np.zeros((OUT, R + 1), DT)}, ValueError, "grad_lora_b", "grad_b_shape")
case(E, {"grad_bias": np.zeros((OUT + 1,), DT)}, ValueError, "grad_bias", "grad_bias_shape")
case(E, {"grad_weight": np.zeros((IN, OUT), DT)}, ValueError, "grad_weight", "grad_weight_layout")
case(E, lambda a: {"grad_lora_a": a["lora_a"]}, ValueError, "grad_lora_a", "grad_a_is_lora_a")
case(E, lambda a: {"grad_x": a["x"]}, ValueError, "grad_x", "grad_x_is_x")
case(E, lambda a: {"grad_weight": a["weight"]}, ValueError, "grad_weight", "grad_weight_is_w")
case(E, overlapping_grads, ValueError, "grad_lora_[ab]", "grad_outputs_overlap")

# ---- LoRA embedding
for E in ("lora_embedding_forward", "lora_embedding_backward"):
    case(E, {"indices": object()}, TypeError, "indices", "indices_object")
    case(
        E,
        {"indices": indices(0, 3, 6, 3).astype(np.float64)},
        ValueError,
        "indices",
        "indices_float",
    )
    case(
        E, {"indices": indices(0, 3, 6, 3).astype(np.int16)}, ValueError, "indices", "indices_int16"
    )
    case(E, {"indices": indices(0, 3, V, 3)}, IndexError, "(?i)indices|index", "index_equals_V")
    case(E, {"indices": indices(0, -1, 2, 3)}, IndexError, "(?i)indices|index", "index_negative")
    case(E, {"indices": indices(0, 3, 2**40, 3)}, IndexError, "(?i)indices|index", "index_huge")
    case(
        E,
        {"indices": indices(0, 3, V, 3, dtype=np.int32)},
        IndexError,
        "(?i)indices|index",
        "index_equals_V_int32",
    )
    case(E, {"lora_a": object()}, TypeError, "lora_a", "lora_a_object")
    case(E, {"lora_b": arr(D, R + 1)}, ValueError, "lora_[ab]", "rank_mismatch")
    case(E, {"lora_a": arr(R * V)}, ValueError, "lora_a", "lora_a_1d")
    case(E, {"lora_b": arr(D, R).astype(np.float64)}, ValueError, "lora_b", "lora_b_mixed")
    for bad in (float("nan"), float("inf")):
        case(E, {"scale": bad}, ValueError, "scale", f"scale_{bad}")
    for bad in (V, -V - 1, 100):
        case(E, {"padding_idx": bad}, ValueError, "padding_idx", f"padding_idx_{bad}")
E = "lora_embedding_forward"
case(E, {"lora_a": arr(R, V + 1)}, ValueError, "lora_a|weight", "vocab_mismatch")
case(E, {"weight": arr(V, D).astype(np.float64)}, ValueError, "weight", "weight_mixed")
case(E, {"weight": arr(V * D)}, ValueError, "weight", "weight_1d")
case(E, {"lora_b": arr(D + 1, R)}, ValueError, "lora_b|weight", "dim_mismatch")
case(E, {"out": np.zeros((M, D + 1), DT)}, ValueError, "out", "out_shape")
case(E, {"out": np.zeros((M, D), np.float64)}, ValueError, "out", "out_dtype")
case(E, {"out": read_only(np.zeros((M, D), DT))}, ValueError, "out", "out_read_only")
case(E, {"out": non_blas((M, D))}, ValueError, "out", "out_not_blas")
case(E, lambda a: {"out": a["weight"][:M]}, ValueError, "out", "out_is_weight")
E = "lora_embedding_backward"
case(E, {"grad_out": arr(M, D + 1)}, ValueError, "grad_out|lora_b", "grad_out_width")
case(E, {"grad_out": arr(M + 1, D)}, ValueError, "grad_out|indices", "grad_out_rows")
case(E, {"grad_weight": np.zeros((V, D + 1), DT)}, ValueError, "grad_weight", "grad_w_shape")
case(
    E,
    {"grad_lora_a": read_only(np.zeros((R, V), DT))},
    ValueError,
    "grad_lora_a",
    "grad_a_read_only",
)
case(E, lambda a: {"grad_lora_b": a["lora_b"]}, ValueError, "grad_lora_b", "grad_b_is_lora_b")

# ---- IA3 linear
E = "ia3_linear_forward"
common_linear_cases(E, lora=False)
case(E, {"bias": arr(OUT + 1)}, ValueError, "bias", "bias_length")
case(E, {"out": np.zeros((M, OUT + 1), DT)}, ValueError, "out", "out_shape")
case(E, {"out": read_only(np.zeros((M, OUT), DT))}, ValueError, "out", "out_read_only")
case(
    E,
    {"keep_base": True, "out_base": np.zeros((M, OUT + 1), DT)},
    ValueError,
    "out_base",
    "out_base_shape",
)
case(
    E,
    {"keep_base": True, "out_base": non_blas((M, OUT))},
    ValueError,
    "out_base",
    "out_base_not_blas",
)
case(E, overlapping_x_out, ValueError, "out", "out_overlaps_x")
E = "ia3_linear_backward"
common_linear_cases(E, lora=False)
case(E, {"base": None}, ValueError, "base", "base_missing_for_grad_l")
case(E, {"base": arr(M, OUT + 1)}, ValueError, "base", "base_shape")
case(E, {"base": arr(M, OUT).astype(np.float64)}, ValueError, "base", "base_mixed")
case(E, {"grad_out": arr(M, OUT + 1)}, ValueError, "grad_out", "grad_out_width")
case(E, {"grad_ia3_l": np.zeros((OUT + 1, 1), DT)}, ValueError, "grad_ia3_l", "grad_l_shape")
case(E, {"grad_x": read_only(np.zeros((M, IN), DT))}, ValueError, "grad_x", "grad_x_read_only")
case(E, lambda a: {"grad_ia3_l": a["ia3_l"]}, ValueError, "grad_ia3_l", "grad_l_is_l")

# ---- IA3 embedding
for E in ("ia3_embedding_forward", "ia3_embedding_backward"):
    case(E, {"indices": indices(0, 3, V, 3)}, IndexError, "(?i)indices|index", "index_equals_V")
    case(
        E,
        {"indices": indices(0, 3, 6, 3).astype(np.float32)},
        ValueError,
        "indices",
        "indices_float",
    )
    case(E, {"ia3_l": arr(D + 1)}, ValueError, "ia3_l", "ia3_l_numel")
    case(E, {"ia3_l": arr(D).astype(np.float64)}, ValueError, "ia3_l", "ia3_l_mixed")
    case(E, {"weight": object()}, TypeError, "weight", "weight_object")
    case(E, {"weight": arr(V, D, 1)}, ValueError, "weight", "weight_3d")
E = "ia3_embedding_forward"
case(E, {"out": np.zeros((M, D + 1), DT)}, ValueError, "out", "out_shape")
case(E, {"out": read_only(np.zeros((M, D), DT))}, ValueError, "out", "out_read_only")
E = "ia3_embedding_backward"
case(E, {"padding_idx": V}, ValueError, "padding_idx", "padding_idx_V")
case(E, {"grad_out": arr(M, D + 1)}, ValueError, "grad_out", "grad_out_width")
case(E, {"grad_weight": np.zeros((V + 1, D), DT)}, ValueError, "grad_weight", "grad_w_shape")

# ---- merges
for E in ("lora_merge", "lora_unmerge"):
    case(E, {"weight": object()}, TypeError, "weight", "weight_object")
    case(E, lambda a: {"weight": read_only(a["weight"])}, ValueError, "weight", "weight_read_only")
    case(E, {"weight": arr(OUT, IN).astype(np.int32)}, ValueError, "weight", "weight_int32")
    case(E, {"lora_b": arr(OUT, R).astype(np.float64)}, ValueError, "lora_b", "lora_b_mixed")
    case(E, {"lora_b": arr(OUT, R + 1)}, ValueError, "lora_[ab]", "rank_mismatch")
    case(E, {"lora_a": arr(R, IN + 1)}, ValueError, "lora_a|weight", "lora_a_in_mismatch")
    case(E, {"fan_in_fan_out": True}, ValueError, "weight|lora_[ab]", "fan_in_fan_out_layout")
    case(E, {"enable_lora": [True] * 4}, ValueError, "enable_lora", "enable_not_dividing")
    case(E, {"enable_lora": [False, False, False]}, ValueError, "enable_lora", "enable_all_false")
    for bad in (float("nan"), float("inf")):
        case(E, {"scale": bad}, ValueError, "scale", f"scale_{bad}")
for E in ("lora_embedding_merge", "lora_embedding_unmerge"):
    case(E, lambda a: {"weight": read_only(a["weight"])}, ValueError, "weight", "weight_read_only")
    case(E, {"lora_a": arr(R, V + 1)}, ValueError, "lora_a|weight", "vocab_mismatch")
    case(E, {"lora_b": arr(D, R + 1)}, ValueError, "lora_[ab]", "rank_mismatch")
    case(E, {"scale": float("nan")}, ValueError, "scale", "scale_nan")
for E in ("ia3_merge", "ia3_unmerge"):
    case(E, lambda a: {"weight": read_only(a["weight"])}, ValueError, "weight", "weight_read_only")
    case(E, {"ia3_l": arr(OUT + 1, 1)}, ValueError, "ia3_l", "ia3_l_numel")
    case(E, {"ia3_l": arr(OUT, 1).astype(np.float64)}, ValueError, "ia3_l", "ia3_l_mixed")
    case(E, {"feedforward": True}, ValueError, "ia3_l", "feedforward_numel")
    case(E, {"weight": arr(OUT * IN)}, ValueError, "weight", "weight_1d")
case("ia3_merge", {"bias": arr(OUT + 1)}, ValueError, "bias", "bias_length")
case("ia3_merge", {"bias": read_only(arr(OUT))}, ValueError, "bias", "bias_read_only")
case("ia3_merge", {"bias": arr(OUT).astype(np.float64)}, ValueError, "bias", "bias_mixed")
for E in ("ia3_embedding_merge", "ia3_embedding_unmerge"):
    case(E, lambda a: {"weight": read_only(a["weight"])}, ValueError, "weight", "weight_read_only")
    case(E, {"ia3_l": arr(D + 1)}, ValueError, "ia3_l", "ia3_l_numel")
for E in ("lora_unmerge", "lora_embedding_unmerge", "ia3_unmerge", "ia3_embedding_unmerge"):
    key = "records" if E == "ia3_unmerge" else "record"
    case(E, {key: object()}, TypeError, "record", "record_object")
    case(E, bad_record(E, "index_range"), ValueError, "record", "record_index_out_of_range")
    case(E, bad_record(E, "value_dtype"), ValueError, "record", "record_value_dtype")
    case(E, bad_record(E, "lengths"), ValueError, "record", "record_length_mismatch")

# ---- dropout_mask
E = "dropout_mask"
for bad in (-0.1, 1.1, float("nan")):
    case(E, {"p": bad}, ValueError, r"\bp\b|dropout", f"p_{bad}")
case(E, {"seed": -1}, ValueError, "seed", "seed_negative")
case(E, {"offset": -5}, ValueError, "offset", "offset_negative")
case(E, {"dtype": "int32"}, ValueError, "dtype", "dtype_int32")
case(E, {"dtype": "float16"}, ValueError, "dtype", "dtype_float16")
case(E, {"shape": (M, -1)}, ValueError, "shape", "shape_negative")
case(E, {"shape": object()}, TypeError, "shape", "shape_object")


def snapshot(value):
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, tuple):
        return tuple(snapshot(v) for v in value)
    return None


def assert_same(after, before, name):
    if isinstance(before, np.ndarray):
        assert np.array_equal(after, before, equal_nan=True), f"{name} was modified"
    elif isinstance(before, tuple):
        for i, (a, b) in enumerate(zip(after, before)):
            assert_same(a, b, f"{name}[{i}]")


@pytest.mark.parametrize("entry,change,exc,match", CASES)
def test_rejected(entry, change, exc, match):
    """The unchanged call succeeds (on copies), so the one change is what gets rejected; after
    the rejection every array, inputs and caller-provided outputs alike, is as it was."""
    args = valid_args(entry)
    call(entry, {k: snapshot(v) if isinstance(v, np.ndarray) else v for k, v in args.items()})
    args.update(change(args) if callable(change) else change)
    for name, value in args.items():
        is_output = name.startswith("out") or (name.startswith("grad_") and name != "grad_out")
        if is_output and isinstance(value, np.ndarray) and value.flags.writeable:
            value[...] = -7.25
    before = {name: snapshot(value) for name, value in args.items()}
    with pytest.raises(exc, match=match):
        call(entry, args)
    for name, value in args.items():
        assert_same(value, before[name], name)


def test_every_entry_point_has_cases():
    covered = {p.values[0] for p in CASES}
    assert covered == set(POSITIONAL)
    assert len(CASES) > 150


# ---- a CUDA request where no CUDA device can run it


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
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


_CAPSULE_NAME = ctypes.c_char_p(b"dltensor")


class FakeCudaTensor:
    """A DLPack producer claiming a CUDA device (kDLCUDA = 2) over host memory that is never
    meant to be dereferenced: the consumer must refuse before touching it."""

    def __init__(self, array):
        self.array = np.ascontiguousarray(array)
        self.shape = (ctypes.c_int64 * array.ndim)(*array.shape)
        self.strides = (ctypes.c_int64 * array.ndim)(
            *[s // array.itemsize for s in self.array.strides]
        )
        code = 0 if array.dtype.kind == "i" else 2
        self.managed = _DLManagedTensor(
            _DLTensor(
                self.array.ctypes.data,
                _DLDevice(2, 0),
                array.ndim,
                _DLDataType(code, array.itemsize * 8, 1),
                self.shape,
                self.strides,
                0,
            ),
            None,
            None,
        )

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, **kwargs):
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self.managed), _CAPSULE_NAME, None)


def test_cuda_request_without_cuda_device():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        pytest.skip("a CUDA device is present; tests/test_cuda.py covers CUDA")
    args = valid_args("lora_embedding_forward")
    fake = {k: FakeCudaTensor(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    fake["out"] = FakeCudaTensor(np.zeros((M, D), DT))
    with pytest.raises((RuntimeError, BufferError), match="(?i)cuda|device"):
        call("lora_embedding_forward", fake)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(nbytes=-1), ValueError, "nbytes must be an int >= 0"),
        (dict(nbytes=1.5), TypeError, "nbytes"),
        (dict(nbytes="1"), TypeError, "nbytes"),
        (dict(nbytes=1, stream="s"), TypeError, "stream"),
        (dict(nbytes=1, stream=-1), ValueError, "stream"),
        (dict(nbytes=1, device=-1), ValueError, "device must be None or a CUDA device index"),
        (dict(nbytes=1, device=1 << 20), ValueError, "device must be None or a CUDA device index"),
    ],
)
def test_cuda_reserve_workspace_bad_arguments(kwargs, error, words):
    from cpeft import _C

    with pytest.raises(error, match=words):
        _C.cuda_reserve_workspace(**kwargs)


def test_cuda_reserve_workspace_without_cuda_says_so():
    import cpeft
    from cpeft import _C

    if cpeft.build_info()["cuda"]:
        pytest.skip("this build has CUDA: tests/test_cuda.py covers the reservation")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _C.cuda_reserve_workspace(1 << 20)
