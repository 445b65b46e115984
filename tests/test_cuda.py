"""cpeft.functional on CUDA tensors against float64 references, plus GPU-only behaviour.

Tolerance rule (issue 3): for fp16/bf16 (and fp32) the largest error of cpeft against the float64
reference must be at most 2x the largest error torch itself makes evaluating the same formula in
that precision on the same inputs (3x for gradients). Both are measured against one reference:
the formula evaluated in float64 on the low-precision values handed to cpeft. A floor of a few
ulps of the output's largest magnitude covers formulas torch happens to compute exactly.

Everything here needs an NVIDIA GPU and a CUDA build of cpeft; elsewhere each test is skipped
with that reason. Inputs also arrive through DLPack from CuPy and JAX where those import.
"""

import math

import numpy as np
import pytest

try:
    import torch
except ImportError:  # pragma: no cover - the CPU-only CI has torch, the reason stays accurate
    torch = None

from conftest import skip_without_cuda
from cpeft import functional as F


@pytest.fixture(autouse=True)
def _needs_cuda():
    """Skips each test here without a GPU and a CUDA build; probed when a test runs, never at
    import (collecting this module touches no GPU)."""
    skip_without_cuda()


LOW = ("float16", "bfloat16", "float32")
FWD_FACTOR, GRAD_FACTOR = 2.0, 3.0
# (M, IN, OUT, R): the awkward sizes of the issue (1, 3, 113, 1023) in every position.
SHAPES = [(1, 3, 1, 1), (3, 113, 1023, 4), (113, 1023, 3, 8), (1023, 113, 113, 16)]


def tdtype(name):
    return getattr(torch, name)


def dev():
    return torch.device("cuda", torch.cuda.current_device())


def randn(*shape, dtype="float32", scale=1.0, device=None):
    return (torch.randn(*shape, dtype=torch.float64, device=device or dev()) * scale).to(
        tdtype(dtype) if isinstance(dtype, str) else dtype
    )


def check(name, got, ref, torch_lp, factor):
    """got/torch_lp: results in the test precision; ref: float64 on the same inputs."""
    assert got is not None, f"{name}: not computed"
    assert tuple(got.shape) == tuple(ref.shape), (
        f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    )
    ref = ref.double()
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    err_torch = (torch_lp.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    # float64: torch's run IS the reference, so the floor (about 1e-12 relative) is the bound.
    ulps = 4096 if got.dtype == torch.float64 else 2
    floor = ulps * torch.finfo(got.dtype).eps * scale
    assert err <= factor * err_torch + floor, (
        f"{name}: max error {err:.3e} exceeds {factor}x torch's {err_torch:.3e} "
        f"(+ floor {floor:.3e}) in {got.dtype}"
    )


def autograd_run(fn, inputs, grad_names, grad_out, dtype):
    """fn(**inputs) in `dtype` with autograd; returns (output, {name: grad})."""
    leaves = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype).clone().requires_grad_(k in grad_names)
        leaves[k] = v
    out = fn(**leaves)
    out.backward(grad_out.to(dtype))
    return out.detach(), {k: leaves[k].grad for k in grad_names}


def both(fn, inputs, grad_names, grad_out, dtype):
    """(reference float64 run, torch run in dtype) of the same formula on the same values."""
    return (
        autograd_run(fn, inputs, grad_names, grad_out, torch.float64),
        autograd_run(fn, inputs, grad_names, grad_out, dtype),
    )


def cpu_mask(m, n, p, seed, offset):
    return torch.from_numpy(np.asarray(F.dropout_mask((m, n), p, seed, offset, dtype="float64")))


# --------------------------------------------------------------------------------------------
# LoRA linear
# --------------------------------------------------------------------------------------------


def lora_formula(x, weight, bias, lora_a, lora_b, mask, scale, seg, groups):
    xd = x if mask is None else x * mask.to(x.dtype)
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    lora = []
    for k, g in enumerate(groups):
        xa_k = xd @ lora_a[k * lora_b.shape[1] : (k + 1) * lora_b.shape[1]].T
        lora.append((g, (xa_k @ lora_b[k * seg : (k + 1) * seg].T) * scale))
    parts = []
    out = weight.shape[0]
    for g0 in range(out // seg):
        block = y[:, g0 * seg : (g0 + 1) * seg]
        for g, term in lora:
            if g == g0:
                block = block + term
        parts.append(block)
    return torch.cat(parts, dim=1)


def run_lora(
    dtype,
    m,
    in_f,
    out_f,
    r,
    *,
    bias=True,
    dropout=0.0,
    seed=3,
    offset=0,
    enable_lora=None,
    fan_in_fan_out=False,
    stream=None,
):
    dt = tdtype(dtype)
    groups_mask = enable_lora or [True]
    G, K = len(groups_mask), sum(groups_mask)
    seg = out_f // G
    x = randn(m, in_f, dtype=dtype)
    weight = randn(out_f, in_f, dtype=dtype, scale=in_f**-0.5)
    b = randn(out_f, dtype=dtype) if bias else None
    lora_a = randn(r * K, in_f, dtype=dtype, scale=in_f**-0.5)
    lora_b = randn(seg * K, r, dtype=dtype, scale=r**-0.5)
    g = randn(m, out_f, dtype=dtype)
    scale = 0.75
    stored_w = weight.T.contiguous() if fan_in_fan_out else weight
    kw = dict(
        fan_in_fan_out=fan_in_fan_out,
        enable_lora=enable_lora,
        dropout=dropout,
        seed=seed,
        offset=offset,
        stream=stream,
    )
    y, xa = F.lora_linear_forward(x, stored_w, b, lora_a, lora_b, scale, **kw)
    grads = F.lora_linear_backward(
        g, x, stored_w, lora_a, lora_b, xa, scale, grad_bias=bias, grad_weight=True, **kw
    )
    if stream is not None:
        torch.cuda.ExternalStream(stream).synchronize()
    mask = cpu_mask(m, in_f, dropout, seed, offset).to(x.device) if dropout > 0 else None
    enabled = [i for i, e in enumerate(groups_mask) if e]
    inputs = dict(x=x, weight=weight, bias=b, lora_a=lora_a, lora_b=lora_b)
    names = ["x", "weight", "lora_a", "lora_b"] + (["bias"] if bias else [])
    formula = lambda x, weight, bias, lora_a, lora_b: lora_formula(  # noqa: E731
        x, weight, bias, lora_a, lora_b, mask, scale, seg, enabled
    )
    (y64, g64), (ylp, glp) = both(formula, inputs, names, g, dt)
    check("y", y, y64, ylp, FWD_FACTOR)
    xa64 = (x.double() * (mask if mask is not None else 1)) @ lora_a.double().T
    xalp = (x * (mask.to(dt) if mask is not None else 1)) @ lora_a.T
    check("xa", xa, xa64, xalp, FWD_FACTOR)
    check("grad_x", grads.x, g64["x"], glp["x"], GRAD_FACTOR)
    check("grad_lora_a", grads.lora_a, g64["lora_a"], glp["lora_a"], GRAD_FACTOR)
    check("grad_lora_b", grads.lora_b, g64["lora_b"], glp["lora_b"], GRAD_FACTOR)
    gw = grads.weight.T if fan_in_fan_out else grads.weight
    check("grad_weight", gw, g64["weight"], glp["weight"], GRAD_FACTOR)
    if bias:
        check("grad_bias", grads.bias, g64["bias"], glp["bias"], GRAD_FACTOR)
    return y, xa, grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", LOW)
def test_lora_linear(dtype, shape):
    run_lora(dtype, *shape)


@pytest.mark.parametrize("dtype", LOW + ("float64",))
def test_lora_linear_dropout_no_bias(dtype):
    run_lora(dtype, 113, 1023, 113, 8, bias=False, dropout=0.3, seed=11, offset=5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lora_linear_dropout_several_chunks(dtype):
    """M x IN above the 2^23-element dropout chunk: the chunk loop and the fp32 grad_a scratch."""
    run_lora(dtype, 1100, 8192, 64, 4, bias=False, dropout=0.1, seed=7, offset=3)


@pytest.mark.parametrize("enable_lora", [[True, False, True], [False, True, False], [True, True]])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lora_linear_grouped(dtype, fan_in_fan_out, enable_lora):
    run_lora(
        dtype,
        37,
        113,
        5 * len(enable_lora),
        4,
        enable_lora=enable_lora,
        fan_in_fan_out=fan_in_fan_out,
        dropout=0.2,
    )


@pytest.mark.parametrize("offset", [7, 2**64 - 5 * 113 - 2])  # crossing 2^64 at row 5
def test_dropout_masks_identical_forward_backward_and_cpu(rank_r_path, offset):
    """With A = I, B = I, W = 0 and scale 1: xa = drop(x) exactly and the LoRA part of grad_x is
    mask ⊙ g exactly, so both sides of the GPU mask are compared bit for bit with the CPU mask."""
    m, n, p, seed = 37, 113, 0.4, 1234  # offsets not a multiple of 4, odd row length
    x = randn(m, n)
    eye = torch.eye(n, device=dev())
    zero_w = torch.zeros(n, n, device=dev())
    g = randn(m, n)
    kw = dict(dropout=p, seed=seed, offset=offset)
    _, xa = F.lora_linear_forward(x, zero_w, None, eye, eye, 1.0, **kw)
    grads = F.lora_linear_backward(
        g, x, zero_w, eye, eye, xa, 1.0, grad_lora_a=False, grad_lora_b=False, **kw
    )
    mask = cpu_mask(m, n, p, seed, offset).float().to(x.device)
    assert torch.equal(xa, x * mask)
    assert torch.equal(grads.x, g * mask)
    assert 0 < (mask == 0).sum().item() < mask.numel()


# --------------------------------------------------------------------------------------------
# The rank-r kernels (cuda/rank_r.cu) against the float64 reference, and the cuBLAS path they
# replace (CPEFT_CUDA_RANK_R=cublas, read on every call): awkward sizes around their tiles (rows
# per block 16, column chunks of 128 and 512, rank tiles 16 and 32, register tiles of 8 rows)
# --------------------------------------------------------------------------------------------

RANK_R_PATHS = ("own", "cublas")


@pytest.fixture(params=RANK_R_PATHS)
def rank_r_path(request, monkeypatch):
    if request.param == "cublas":
        monkeypatch.setenv("CPEFT_CUDA_RANK_R", "cublas")
    else:
        monkeypatch.delenv("CPEFT_CUDA_RANK_R", raising=False)
    return request.param


# (M, IN, OUT, R): M around the 16-row blocks and 8-row tiles, IN odd and around the 512-column
# chunk, R = 1, 3, 16 (one narrow tile), 17 and 33 (a wide tile, then a tile remainder), 64.
RANK_R_SHAPES = [
    (1, 1, 1, 1),
    (17, 513, 7, 3),
    (37, 1023, 113, 16),
    (129, 127, 515, 17),
    (23, 2049, 64, 33),
    (65, 257, 33, 64),
]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("shape", RANK_R_SHAPES)
@pytest.mark.parametrize("dtype", LOW + ("float64",))
def test_lora_linear_rank_r_kernels(rank_r_path, dtype, shape, dropout):
    run_lora(dtype, *shape, bias=False, dropout=dropout, seed=5, offset=1)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lora_linear_empty_rows(rank_r_path, dtype, dropout):
    """M == 0: empty y, xa and grad_x; grad_a, grad_b and grad_weight exactly zero."""
    y, xa, grads = run_lora(dtype, 0, 33, 17, 4, dropout=dropout)
    assert y.shape == (0, 17) and xa.shape == (0, 4) and grads.x.shape == (0, 33)
    for name in ("lora_a", "lora_b", "weight", "bias"):
        assert torch.count_nonzero(getattr(grads, name)).item() == 0, name


@pytest.mark.parametrize("offset", [2**64 - 1, 2**64 - 4 * 113 - 3, 2**63 + 2])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lora_linear_dropout_offsets_near_2_64(rank_r_path, dtype, offset):
    """Counters offset + m*IN + i wrap modulo 2^64 inside the kernels exactly as on the CPU."""
    run_lora(dtype, 37, 113, 29, 3, bias=False, dropout=0.3, seed=2**64 - 3, offset=offset)


def test_lora_linear_column_major_input(rank_r_path):
    """x handed as a column-major view: the kernels' strided loads, not their 4-wide ones."""
    x = randn(113, 37).T
    weight, lora_a = randn(29, 113), randn(16, 113)
    lora_b, g = randn(29, 16), randn(37, 29)
    kw = dict(dropout=0.25, seed=9, offset=3)
    y, xa = F.lora_linear_forward(x, weight, None, lora_a, lora_b, 0.5, **kw)
    grads = F.lora_linear_backward(g, x, weight, lora_a, lora_b, xa, 0.5, **kw)
    xc = x.contiguous()
    y_c, xa_c = F.lora_linear_forward(xc, weight, None, lora_a, lora_b, 0.5, **kw)
    grads_c = F.lora_linear_backward(g, xc, weight, lora_a, lora_b, xa_c, 0.5, **kw)
    mask = cpu_mask(37, 113, 0.25, 9, 3).to(x.device)
    ref_xa = (x.double() * mask) @ lora_a.double().T
    assert (xa.double() - ref_xa).abs().max().item() < 1e-4
    torch.testing.assert_close(y, y_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads.lora_a, grads_c.lora_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads.x, grads_c.x, rtol=1e-5, atol=1e-5)


def test_lora_linear_rank_r_kernels_deterministic():
    """Two runs of one backward give the same bits (no atomics in the row reductions)."""
    x, weight = randn(1000, 1023, dtype="bfloat16"), randn(515, 1023, dtype="bfloat16")
    lora_a, lora_b = randn(16, 1023, dtype="bfloat16"), randn(515, 16, dtype="bfloat16")
    g = randn(1000, 515, dtype="bfloat16")
    kw = dict(dropout=0.1, seed=4, offset=0)
    _, xa = F.lora_linear_forward(x, weight, None, lora_a, lora_b, 2.0, **kw)
    first = F.lora_linear_backward(g, x, weight, lora_a, lora_b, xa, 2.0, **kw)
    second = F.lora_linear_backward(g, x, weight, lora_a, lora_b, xa, 2.0, **kw)
    for name in ("x", "lora_a", "lora_b"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


# --------------------------------------------------------------------------------------------
# LoRA embedding
# --------------------------------------------------------------------------------------------


def embedding_formula(indices, padding_idx, scale):
    def f(weight, lora_a, lora_b):
        base = torch.nn.functional.embedding(indices, weight, padding_idx=padding_idx)
        after_a = torch.nn.functional.embedding(indices, lora_a.T, padding_idx=padding_idx)
        return base + (after_a @ lora_b.T) * scale

    return f


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32] if torch else [])
@pytest.mark.parametrize("n,vocab,dim,r", [(1, 3, 1, 1), (113, 1023, 3, 4), (1023, 113, 113, 16)])
@pytest.mark.parametrize("dtype", LOW)
def test_lora_embedding(dtype, n, vocab, dim, r, index_dtype):
    dt = tdtype(dtype)
    indices = torch.randint(0, vocab, (n,), device=dev())
    padding_idx = int(indices[0]) if n > 2 else None
    weight = randn(vocab, dim, dtype=dtype)
    lora_a = randn(r, vocab, dtype=dtype)
    lora_b = randn(dim, r, dtype=dtype, scale=r**-0.5)
    g = randn(n, dim, dtype=dtype)
    scale = 1.5
    idx = indices.to(index_dtype)
    y = F.lora_embedding_forward(idx, weight, lora_a, lora_b, scale, padding_idx=padding_idx)
    grads = F.lora_embedding_backward(
        g, idx, lora_a, lora_b, scale, padding_idx=padding_idx, grad_weight=True
    )
    inputs = dict(weight=weight, lora_a=lora_a, lora_b=lora_b)
    (y64, g64), (ylp, glp) = both(
        embedding_formula(indices, padding_idx, scale),
        inputs,
        ["weight", "lora_a", "lora_b"],
        g,
        dt,
    )
    check("y", y, y64, ylp, FWD_FACTOR)
    check("grad_lora_a", grads.lora_a, g64["lora_a"], glp["lora_a"], GRAD_FACTOR)
    check("grad_lora_b", grads.lora_b, g64["lora_b"], glp["lora_b"], GRAD_FACTOR)
    check("grad_weight", grads.weight, g64["weight"], glp["weight"], GRAD_FACTOR)


@pytest.mark.parametrize(
    "n,vocab,dim,r",
    [(9, 5, 513, 1), (17, 1000, 1029, 3), (0, 7, 5, 2), (31, 64, 127, 17), (8, 33, 64, 64)],
)
@pytest.mark.parametrize("dtype", LOW + ("float64",))
def test_lora_embedding_rank_r_kernels(rank_r_path, dtype, n, vocab, dim, r):
    """The one-pass forward and the rank-r backward products at awkward sizes: tokens around
    the 8-row tiles, D odd and around the 512-column blocks, R across the rank tiles, N = 0."""
    dt = tdtype(dtype)
    indices = torch.randint(0, vocab, (n,), device=dev())
    weight = randn(vocab, dim, dtype=dtype)
    lora_a = randn(r, vocab, dtype=dtype)
    lora_b = randn(dim, r, dtype=dtype, scale=r**-0.5)
    g = randn(n, dim, dtype=dtype)
    y = F.lora_embedding_forward(indices, weight, lora_a, lora_b, 0.5)
    grads = F.lora_embedding_backward(g, indices, lora_a, lora_b, 0.5)
    inputs = dict(weight=weight, lora_a=lora_a, lora_b=lora_b)
    (y64, g64), (ylp, glp) = both(
        embedding_formula(indices, None, 0.5), inputs, ["weight", "lora_a", "lora_b"], g, dt
    )
    check("y", y, y64, ylp, FWD_FACTOR)
    check("grad_lora_a", grads.lora_a, g64["lora_a"], glp["lora_a"], GRAD_FACTOR)
    check("grad_lora_b", grads.lora_b, g64["lora_b"], glp["lora_b"], GRAD_FACTOR)


def test_lora_embedding_out_of_range_cuda_indices_give_nan_rows_and_no_gradient(rank_r_path):
    vocab, dim, r = 11, 5, 2
    indices = torch.tensor([0, vocab, 3, -1, 3], device=dev())
    weight, lora_a, lora_b = randn(vocab, dim), randn(r, vocab), randn(dim, r)
    g = randn(5, dim)
    y = F.lora_embedding_forward(indices, weight, lora_a, lora_b, 1.0)
    assert torch.isnan(y[1]).all() and torch.isnan(y[3]).all()
    assert torch.isfinite(y[[0, 2, 4]]).all()
    grads = F.lora_embedding_backward(g, indices, lora_a, lora_b, 1.0, grad_weight=True)
    expected_w = torch.zeros_like(weight)
    expected_w[0] = g[0]
    expected_w[3] = g[2] + g[4]
    torch.testing.assert_close(grads.weight, expected_w)
    assert torch.isfinite(grads.lora_a).all() and torch.isfinite(grads.lora_b).all()


# --------------------------------------------------------------------------------------------
# IA3
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", LOW)
def test_ia3_linear(dtype, shape, feedforward):
    m, in_f, out_f, _ = shape
    dt = tdtype(dtype)
    x = randn(m, in_f, dtype=dtype)
    weight = randn(out_f, in_f, dtype=dtype, scale=in_f**-0.5)
    b = randn(out_f, dtype=dtype)
    l = (1 + 0.5 * randn(in_f if feedforward else out_f)).to(dt)  # noqa: E741
    g = randn(m, out_f, dtype=dtype)
    y, base = F.ia3_linear_forward(
        x, weight, b, l, feedforward=feedforward, keep_base=not feedforward
    )
    grads = F.ia3_linear_backward(
        g, x, weight, l, base, feedforward=feedforward, grad_bias=True, grad_weight=True
    )

    def formula(x, weight, bias, l):  # noqa: E741
        if feedforward:
            return (x * l) @ weight.T + bias
        return (x @ weight.T + bias) * l

    inputs = dict(x=x, weight=weight, bias=b, l=l)
    (y64, g64), (ylp, glp) = both(formula, inputs, ["x", "weight", "bias", "l"], g, dt)
    check("y", y, y64, ylp, FWD_FACTOR)
    check("grad_x", grads.x, g64["x"], glp["x"], GRAD_FACTOR)
    check("grad_l", grads.ia3_l, g64["l"], glp["l"], GRAD_FACTOR)
    check("grad_bias", grads.bias, g64["bias"], glp["bias"], GRAD_FACTOR)
    check("grad_weight", grads.weight, g64["weight"], glp["weight"], GRAD_FACTOR)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ia3_linear_partial_requests(dtype):
    """The other code paths: only grad_l (input scaling builds g·W in bounded chunks), only
    grad_x, and a forward without base in both shapes of M."""
    dt = tdtype(dtype)
    for m in (3, 1023):
        x = randn(m, 113, dtype=dtype)
        weight = randn(64, 113, dtype=dtype, scale=113**-0.5)
        g = randn(m, 64, dtype=dtype)
        for feedforward in (False, True):
            l = (1 + 0.5 * randn(113 if feedforward else 64)).to(dt)  # noqa: E741

            def formula(x, weight, l, feedforward=feedforward):
                return (x * l) @ weight.T if feedforward else (x @ weight.T) * l

            inputs = dict(x=x, weight=weight, l=l)
            (y64, g64), (ylp, glp) = both(formula, inputs, ["x", "l"], g, dt)
            y, base = F.ia3_linear_forward(x, weight, None, l, feedforward=feedforward)
            check("y", y, y64, ylp, FWD_FACTOR)
            if not feedforward:
                _, base = F.ia3_linear_forward(x, weight, None, l, keep_base=True)
            only_l = F.ia3_linear_backward(
                g, x, weight, l, base, feedforward=feedforward, grad_x=False
            )
            check("grad_l", only_l.ia3_l, g64["l"], glp["l"], GRAD_FACTOR)
            only_x = F.ia3_linear_backward(
                g, x, weight, l, base, feedforward=feedforward, grad_ia3_l=False
            )
            check("grad_x", only_x.x, g64["x"], glp["x"], GRAD_FACTOR)


@pytest.mark.parametrize("layout", ["dense", "offset_views", "column_major_out"])
@pytest.mark.parametrize("m,in_f,out_f", [(1, 1, 1), (37, 113, 29), (1023, 65, 513)])
@pytest.mark.parametrize("dtype", LOW + ("float64",))
def test_ia3_output_scaling_in_the_gemm(dtype, m, in_f, out_f, layout):
    """Output scaling without a kept base: l as cuBLASLt's alpha vector (plans per problem and
    pointer alignment: views starting one element in), or the fallbacks (fp64; a column-major y,
    whose rows the alpha vector would scale instead of its columns)."""
    dt = tdtype(dtype)
    pad = 1 if layout == "offset_views" else 0
    x = randn(m * in_f + pad, dtype=dtype)[pad:].view(m, in_f)
    weight = randn(out_f * in_f + pad, dtype=dtype, scale=in_f**-0.5)[pad:].view(out_f, in_f)
    b = randn(out_f, dtype=dtype)
    l = (1 + 0.5 * randn(out_f)).to(dt)  # noqa: E741
    out = torch.empty(out_f, m, dtype=dt, device=dev()).T if layout == "column_major_out" else None
    y, base = F.ia3_linear_forward(x, weight, b, l, out=out)
    assert base is None
    formula = lambda x, weight, bias, l: (x @ weight.T + bias) * l  # noqa: E731, E741
    (y64, _), (ylp, _) = both(
        formula,
        dict(x=x, weight=weight, bias=b, l=l),
        ["x"],
        torch.zeros(m, out_f, device=dev()),
        dt,
    )
    check("y", y, y64, ylp, FWD_FACTOR)
    if out is None:
        again, _ = F.ia3_linear_forward(x, weight, b, l)  # the cached plan: the same bits
        assert torch.equal(again, y)


@pytest.mark.parametrize("dtype", LOW)
def test_ia3_embedding(dtype):
    dt = tdtype(dtype)
    n, vocab, dim = 1023, 113, 3
    indices = torch.randint(0, vocab, (n,), device=dev())
    padding_idx = int(indices[5])
    weight = randn(vocab, dim, dtype=dtype)
    l = (1 + 0.5 * randn(dim)).to(dt)  # noqa: E741
    g = randn(n, dim, dtype=dtype)
    y = F.ia3_embedding_forward(indices, weight, l)
    grads = F.ia3_embedding_backward(
        g, indices, weight, l, padding_idx=padding_idx, grad_weight=True
    )

    def formula(weight, l):  # noqa: E741
        return torch.nn.functional.embedding(indices, weight, padding_idx=padding_idx) * l

    (y64, g64), (ylp, glp) = both(formula, dict(weight=weight, l=l), ["weight", "l"], g, dt)
    check("y", y, y64, ylp, FWD_FACTOR)
    check("grad_l", grads.ia3_l, g64["l"], glp["l"], GRAD_FACTOR)
    check("grad_weight", grads.weight, g64["weight"], glp["weight"], GRAD_FACTOR)


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", LOW)
def test_lora_merge_unmerge_bit_exact(dtype, fan_in_fan_out):
    dt = tdtype(dtype)
    out_f, in_f, r, scale = 113, 1023, 8, 2.0
    weight = randn(out_f, in_f, dtype=dtype, scale=0.05)
    stored = weight.T.contiguous() if fan_in_fan_out else weight.clone()
    original = stored.clone()
    lora_a, lora_b = randn(r, in_f, dtype=dtype), randn(out_f, r, dtype=dtype, scale=0.01)
    record = F.lora_merge(stored, lora_a, lora_b, scale, fan_in_fan_out=fan_in_fan_out)
    merged_view = stored.T if fan_in_fan_out else stored
    delta64 = scale * lora_b.double() @ lora_a.double()
    delta_lp = (scale * (lora_b @ lora_a)).to(dt)
    check("merged", merged_view, weight.double() + delta64, weight + delta_lp, FWD_FACTOR)
    assert record.index.numel() == record.value.numel()
    F.lora_unmerge(stored, lora_a, lora_b, scale, record, fan_in_fan_out=fan_in_fan_out)
    bits = torch.int32 if dt == torch.float32 else torch.int16
    assert torch.equal(stored.view(bits), original.view(bits))


def test_lora_merge_100_bf16_cycles_bit_exact():
    weight = randn(257, 511, dtype="bfloat16", scale=0.05)
    original = weight.clone()
    lora_a, lora_b = randn(16, 511, dtype="bfloat16"), randn(257, 16, dtype="bfloat16", scale=0.02)
    total = 0
    for _ in range(100):
        record = F.lora_merge(weight, lora_a, lora_b, 2.0)
        total += record.index.numel()
        F.lora_unmerge(weight, lora_a, lora_b, 2.0, record)
    assert total > 0, "bf16 merging should lose low bits somewhere (else the test proves nothing)"
    assert torch.equal(weight.view(torch.int16), original.view(torch.int16))


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ia3_merge_unmerge_bit_exact(dtype, feedforward):
    dt = tdtype(dtype)
    weight, bias = randn(113, 1023, dtype=dtype), randn(113, dtype=dtype)
    l = (1 + 0.3 * randn(1023 if feedforward else 113)).to(dt)  # noqa: E741
    w0, b0 = weight.clone(), bias.clone()
    records = F.ia3_merge(weight, l, bias=None if feedforward else bias, feedforward=feedforward)
    expected = w0.double() * (l.double() if feedforward else l.double()[:, None])
    check("merged", weight, expected, (w0 * (l if feedforward else l[:, None])), FWD_FACTOR)
    F.ia3_unmerge(weight, l, records, bias=None if feedforward else bias, feedforward=feedforward)
    assert torch.equal(weight.view(torch.int16), w0.view(torch.int16))
    assert torch.equal(bias.view(torch.int16), b0.view(torch.int16))


def test_embedding_merges_bit_exact():
    weight = randn(1023, 113, dtype="bfloat16")
    w0 = weight.clone()
    lora_a, lora_b = randn(4, 1023, dtype="bfloat16"), randn(113, 4, dtype="bfloat16", scale=0.1)
    rec = F.lora_embedding_merge(weight, lora_a, lora_b, 1.5)
    F.lora_embedding_unmerge(weight, lora_a, lora_b, 1.5, rec)
    assert torch.equal(weight.view(torch.int16), w0.view(torch.int16))
    l = (1 + 0.3 * randn(113)).to(torch.bfloat16)  # noqa: E741
    rec = F.ia3_embedding_merge(weight, l)
    F.ia3_embedding_unmerge(weight, l, rec)
    assert torch.equal(weight.view(torch.int16), w0.view(torch.int16))


# --------------------------------------------------------------------------------------------
# Streams, devices and DLPack producers
# --------------------------------------------------------------------------------------------


def test_non_default_stream():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        run_lora("bfloat16", 113, 1023, 113, 8, dropout=0.1, stream=s.cuda_stream)


@pytest.mark.parametrize("producer_side", [True, False], ids=["torch-on-side", "call-on-side"])
def test_tensors_on_a_stream_other_than_the_calls_are_waited_for(producer_side):
    """torch tensors cross through torch's DLPack C exchange API, which orders nothing: that is
    right only when the call runs on torch's current stream. When it does not, the boundary takes
    them through __dlpack__(stream=...), which makes the call's stream wait for torch's. Here x is
    finished by slow work on torch's current stream and the call runs on another (non-blocking)
    stream; its result must be that of the finished x."""
    side = torch.cuda.Stream()
    big = randn(4096, 4096)
    w, a, b = randn(256, 1024, scale=0.03), randn(8, 1024, scale=0.03), randn(256, 8)
    torch.cuda.synchronize()
    producer = side if producer_side else torch.cuda.current_stream()
    call_stream = None if producer_side else side.cuda_stream
    with torch.cuda.stream(producer):
        x = torch.zeros(512, 1024, device=dev())
        for _ in range(8):  # tens of milliseconds of work ahead of x's final value
            big = torch.mm(big, big) * (1.0 / 64.0)
        x.copy_(big[:512, :1024].sign())
        y, _ = F.lora_linear_forward(x, w, None, a, b, 0.5, stream=call_stream)
    torch.cuda.synchronize()
    want = x @ w.T + 0.5 * (x @ a.T) @ b.T
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-3)


def test_two_concurrent_streams():
    """Two streams, each its own problem, queued interleaved: per-stream workspaces keep them
    apart (a shared workspace would corrupt the dropout chunks)."""
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    problems = []
    for s in streams:
        with torch.cuda.stream(s):
            x = randn(1023, 1023, dtype="bfloat16")
            w = randn(513, 1023, dtype="bfloat16", scale=0.03)
            a = randn(8, 1023, dtype="bfloat16", scale=0.03)
            b = randn(513, 8, dtype="bfloat16")
        problems.append((x, w, a, b))
    torch.cuda.synchronize()
    results = [[], []]
    for _ in range(5):
        for i, s in enumerate(streams):
            x, w, a, b = problems[i]
            with torch.cuda.stream(s):
                y, xa = F.lora_linear_forward(
                    x, w, None, a, b, 0.5, dropout=0.1, seed=i, stream=s.cuda_stream
                )
                grads = F.lora_linear_backward(
                    x[:, :513].contiguous(),
                    x,
                    w,
                    a,
                    b,
                    xa,
                    0.5,
                    dropout=0.1,
                    seed=i,
                    stream=s.cuda_stream,
                )
            results[i].append((y, grads.lora_a))
    torch.cuda.synchronize()
    for i in range(2):
        x, w, a, b = problems[i]
        y_ref, _ = F.lora_linear_forward(x, w, None, a, b, 0.5, dropout=0.1, seed=i)
        ga_ref = F.lora_linear_backward(
            x[:, :513].contiguous(),
            x,
            w,
            a,
            b,
            F.lora_linear_forward(x, w, None, a, b, 0.5, dropout=0.1, seed=i)[1],
            0.5,
            dropout=0.1,
            seed=i,
        ).lora_a
        for y, ga in results[i]:
            assert torch.equal(y, y_ref)
            assert torch.equal(ga, ga_ref)


def test_workspace_cannot_grow_under_graph_capture_until_reserved():
    """Nothing in a captured call allocates or synchronizes (issue 8, item 7): a call whose
    stream workspace would have to grow while the stream is captured into a CUDA graph raises,
    naming cuda_reserve_workspace; after the reservation (and a warm-up call) the same call
    captures, and a replay equals the eager result."""
    from cpeft import _C

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    # nbytes 0 never grows: it creates the stream's context and reports what it already holds
    # (streams come from torch's pool, so an earlier test may have grown this one).
    held = _C.cuda_reserve_workspace(0, stream=s.cuda_stream)
    out_f = held // 4 + 1  # IA3 output scaling takes OUT floats of workspace: more than held
    x, w, l = randn(3, 1), randn(out_f, 1), randn(out_f)
    expected = F.ia3_linear_forward(x, w, None, l)
    torch.cuda.synchronize()
    out = torch.zeros_like(expected)
    with pytest.raises(RuntimeError, match="cuda_reserve_workspace"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=s):
            F.ia3_linear_forward(x, w, None, l, out=out, stream=s.cuda_stream)
    torch.cuda.synchronize()
    assert _C.cuda_reserve_workspace(0, stream=s.cuda_stream) == held, "grew under capture"
    reserved = _C.cuda_reserve_workspace(4 * out_f, stream=s.cuda_stream)
    assert reserved >= 4 * out_f and reserved % (1 << 20) == 0
    with torch.cuda.stream(s):
        F.ia3_linear_forward(x, w, None, l, out=out, stream=s.cuda_stream)
    s.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        F.ia3_linear_forward(x, w, None, l, out=out, stream=s.cuda_stream)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    assert _C.cuda_reserve_workspace(0, stream=s.cuda_stream) == reserved
    # Growing after the capture must not free the buffer the graph was captured with: the
    # replay still writes it (compute-sanitizer's memcheck in gpu_check.sh would flag a free).
    assert _C.cuda_reserve_workspace(2 * reserved + 1, stream=s.cuda_stream) > reserved
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_reserve_workspace_refuses_a_capturing_stream():
    from cpeft import _C

    s = torch.cuda.Stream()
    with pytest.raises(RuntimeError, match="before the capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=s):
            _C.cuda_reserve_workspace(1 << 20, stream=s.cuda_stream)
    torch.cuda.synchronize()


def test_second_device_is_honoured():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(1):
        run_lora("bfloat16", 33, 113, 64, 4)


def test_cupy_inputs():
    cupy = pytest.importorskip("cupy")
    x, w, a, b = (
        cupy.asarray(np.random.randn(*s).astype(np.float32))
        for s in [(37, 113), (64, 113), (4, 113), (64, 4)]
    )
    y, xa = F.lora_linear_forward(x, w, None, a, b, 0.5)
    xn, wn, an, bn = (cupy.asnumpy(t).astype(np.float64) for t in (x, w, a, b))
    ref = xn @ wn.T + 0.5 * (xn @ an.T) @ bn.T
    np.testing.assert_allclose(cupy.asnumpy(y), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cupy.asnumpy(xa), xn @ an.T, rtol=1e-4, atol=1e-4)


def test_jax_inputs_with_torch_outputs():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX has no GPU backend here")
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal(s).astype(np.float32) for s in [(37, 113), (64, 113), (4, 113), (64, 4)]
    ]
    x, w, a, b = (jnp.asarray(t) for t in arrays)
    out = torch.empty(37, 64, device=dev())
    out_xa = torch.empty(37, 4, device=dev())
    y, xa = F.lora_linear_forward(x, w, None, a, b, 0.5, out=out, out_xa=out_xa)
    torch.cuda.synchronize()
    xn, wn, an, bn = (t.astype(np.float64) for t in arrays)
    ref = xn @ wn.T + 0.5 * (xn @ an.T) @ bn.T
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-4, atol=1e-4)


def test_torch_inputs_through_raw_dlpack_capsules_match_tensors():
    x, w, a, b = randn(17, 33), randn(9, 33), randn(2, 33), randn(9, 2)
    y_t, _ = F.lora_linear_forward(x, w, None, a, b, 1.0)
    out = torch.empty(17, 9, device=dev())
    out_xa = torch.empty(17, 2, device=dev())
    F.lora_linear_forward(
        *(t.__dlpack__() for t in (x, w)),
        None,
        *(t.__dlpack__() for t in (a, b)),
        1.0,
        out=out,
        out_xa=out_xa,
    )
    torch.cuda.synchronize()
    assert torch.equal(out, y_t)
    assert math.isfinite(out.abs().max().item())
