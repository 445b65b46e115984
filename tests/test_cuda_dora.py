"""DoRA on CUDA against float64 references, with tests/test_cuda.py's rule: cpeft's largest error
is at most 2x (3x for gradients) the largest error torch makes evaluating peft's formula in the
same precision on the same inputs. Skipped without an NVIDIA GPU and a CUDA build of cpeft."""

import pytest
from test_cuda import FWD_FACTOR, GRAD_FACTOR, LOW, both, check, cpu_mask, dev, randn, tdtype

from conftest import skip_without_cuda
from cpeft import functional as F


@pytest.fixture(autouse=True)
def _needs_cuda():
    """Probed when a test runs, never at import (see tests/conftest.py)."""
    skip_without_cuda()


torch = pytest.importorskip("torch")

SHAPES = [(1, 3, 1, 1), (3, 113, 1023, 4), (113, 1023, 3, 8), (1023, 113, 113, 16)]


def dora_formula(x, weight, bias, lora_a, lora_b, magnitude, mask, scale):
    """peft 0.21's DoraLinearLayer with variants.py's handling of dropout; n detached."""
    norm = torch.linalg.norm(weight + scale * (lora_b @ lora_a), dim=1).detach()
    c = magnitude / norm
    xd = x if mask is None else x * mask.to(x.dtype)
    lora = ((xd @ lora_a.T) @ lora_b.T) * scale
    if mask is None:
        y = c * (x @ weight.T) + c * lora
    else:
        y = x @ weight.T + (c - 1) * (xd @ weight.T) + c * lora
    return y if bias is None else y + bias


def run_dora(
    dtype,
    m,
    in_f,
    out_f,
    r,
    *,
    bias=True,
    dropout=0.0,
    seed=3,
    fan_in_fan_out=False,
    keep_base=True,
):
    dt = tdtype(dtype)
    x = randn(m, in_f, dtype=dtype)
    weight = randn(out_f, in_f, dtype=dtype, scale=in_f**-0.5)
    b = randn(out_f, dtype=dtype) if bias else None
    lora_a = randn(r, in_f, dtype=dtype, scale=in_f**-0.5)
    lora_b = randn(out_f, r, dtype=dtype, scale=r**-0.5)
    magnitude = (torch.rand(out_f, device=dev(), dtype=torch.float64) + 0.5).to(dt)
    g = randn(m, out_f, dtype=dtype)
    scale = 0.75
    stored_w = weight.T.contiguous() if fan_in_fan_out else weight
    kw = dict(fan_in_fan_out=fan_in_fan_out, dropout=dropout, seed=seed)
    y, xa, base, norm = F.dora_linear_forward(
        x, stored_w, b, lora_a, lora_b, magnitude, scale, keep_base=keep_base, **kw
    )
    grads = F.dora_linear_backward(
        g,
        x,
        stored_w,
        lora_a,
        lora_b,
        magnitude,
        norm,
        xa,
        base,
        scale,
        grad_bias=bias,
        grad_magnitude=keep_base,
        **kw,
    )
    mask = cpu_mask(m, in_f, dropout, seed, 0).to(x.device) if dropout > 0 else None
    inputs = dict(x=x, weight=weight, bias=b, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude)
    names = (
        ["x", "lora_a", "lora_b"]
        + (["magnitude"] if keep_base else [])
        + (["bias"] if bias else [])
    )
    formula = lambda **t: dora_formula(mask=mask, scale=scale, **t)  # noqa: E731
    (y64, g64), (ylp, glp) = both(formula, inputs, names, g, dt)
    check("y", y, y64, ylp, FWD_FACTOR)
    n64 = torch.linalg.norm(weight.double() + scale * lora_b.double() @ lora_a.double(), dim=1)
    nlp = torch.linalg.norm(weight + scale * lora_b @ lora_a, dim=1)
    check("norm", norm, n64, nlp, FWD_FACTOR)
    for name in names:
        got = getattr(grads, name)
        check(f"grad_{name}", got, g64[name], glp[name], GRAD_FACTOR)
    return y, grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", LOW)
def test_dora_linear(dtype, shape):
    run_dora(dtype, *shape)


@pytest.mark.parametrize("dtype", LOW + ("float64",))
def test_dora_linear_dropout_fan_in_fan_out(dtype):
    run_dora(dtype, 113, 1023, 113, 8, dropout=0.3, seed=11, fan_in_fan_out=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dora_linear_dropout_several_chunks(dtype):
    run_dora(dtype, 1100, 8192, 64, 4, bias=False, dropout=0.1, seed=7)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("m", [16, 1100])
def test_dora_linear_without_base(dtype, m):
    """M > IN folds c into copies of W and B (no pass over y); M <= IN scales y in place."""
    run_dora(dtype, m, 256, 96, 8, keep_base=False)


def embedding_formula(weight, lora_a, lora_b, magnitude, idx, scale):
    norm = torch.linalg.norm(weight.T + scale * (lora_b @ lora_a), dim=1).detach()
    c = magnitude / norm
    return c * weight[idx] + c * ((lora_a.T[idx] @ lora_b.T) * scale)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
def test_dora_embedding(dtype, index_dtype):
    dt = tdtype(dtype)
    v, d, r, n = 1023, 113, 8, 300
    weight = randn(v, d, dtype=dtype)
    lora_a = randn(r, v, dtype=dtype, scale=0.3)
    lora_b = randn(d, r, dtype=dtype, scale=0.3)
    magnitude = (torch.rand(d, device=dev(), dtype=torch.float64) * 30 + 10).to(dt)
    idx = torch.randint(0, v, (n,), device=dev(), dtype=getattr(torch, index_dtype))
    g = randn(n, d, dtype=dtype)
    y, norm = F.dora_embedding_forward(idx, weight, lora_a, lora_b, magnitude, 0.5)
    grads = F.dora_embedding_backward(
        g, idx, weight, lora_a, lora_b, magnitude, norm, 0.5, padding_idx=int(idx[0])
    )
    inputs = dict(weight=weight, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude)
    formula = lambda **t: embedding_formula(idx=idx.long(), scale=0.5, **t)  # noqa: E731
    (y64, g64), (ylp, glp) = both(formula, inputs, ["lora_b", "magnitude"], g, dt)
    check("y", y, y64, ylp, FWD_FACTOR)
    check("grad_lora_b", grads.lora_b, g64["lora_b"], glp["lora_b"], GRAD_FACTOR)
    check("grad_magnitude", grads.magnitude, g64["magnitude"], glp["magnitude"], GRAD_FACTOR)
    # grad_lora_a with padding_idx: rows at idx[0] contribute nothing (peft's F.embedding).
    keep = (idx != idx[0]).double().unsqueeze(1)
    c = magnitude.double() / torch.linalg.norm(
        weight.double().T + 0.5 * lora_b.double() @ lora_a.double(), dim=1
    )
    per_row = 0.5 * (g.double() * c) @ lora_b.double() * keep
    want = torch.zeros(r, v, dtype=torch.float64, device=dev())
    want.index_add_(1, idx.long(), per_row.T)
    err = (grads.lora_a.double() - want).abs().max().item()
    assert err <= 8 * torch.finfo(dt).eps * max(want.abs().max().item(), 1.0) * 4
