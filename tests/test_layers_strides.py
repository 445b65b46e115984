"""Layers take whatever strides torch hands them (issue 8, item 1), on every device: the expanded
(stride-0) gradients of ``y.sum()`` and ``y.mean()``, a cross-entropy loss, non-contiguous,
expanded, 3-D and 4-D inputs and non-contiguous indices. Every case is compared in float64 with
the same layer written in plain torch ops (test_layers_torch.reference_output)."""

import copy

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from test_layers_torch import CASE_NAMES, case, nonzero_adapters, reference_output  # noqa: E402

import cpeft as lora  # noqa: E402
from cpeft import _autograd  # noqa: E402


def cross_entropy(y):
    """Cross-entropy over the last dim, targets fixed by a seeded generator."""
    logits = y.reshape(-1, y.shape[-1])
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, y.shape[-1], (logits.shape[0],), generator=generator)
    return F.cross_entropy(logits, target.to(y.device))


LOSSES = {"sum": torch.sum, "mean": torch.mean, "cross_entropy": cross_entropy}


def assert_same_function_and_gradients(layer, x, loss=torch.sum):
    """layer(x) and its gradients (parameters and a float x) equal the plain torch reference."""
    reference = copy.deepcopy(layer)
    if x.is_floating_point():
        x = x.detach().requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
    else:
        x_ref = x
    y, y_ref = layer(x), reference_output(reference, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    loss(y).backward()
    loss(y_ref).backward()
    for (name, p), p_ref in zip(layer.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(
                p.grad, p_ref.grad, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}"
            )
    if x.is_floating_point():
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("name", CASE_NAMES)
def test_loss_straight_after_the_layer(name, loss, device):
    """.sum() and .mean() hand the backward an expanded gradient (every stride 0)."""
    layer, x = case(name, device=device)
    assert_same_function_and_gradients(layer, x, LOSSES[loss])


def strided_views(x):
    """Views of values shaped like x (..., IN) whose memory is not a contiguous block."""
    big = torch.randn(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
    views = {
        "every_other_column": big[..., ::2],
        "expanded_rows": torch.randn(x.shape[-1], dtype=x.dtype, device=x.device).expand(x.shape),
        "leading_dims_permuted": torch.randn(
            (x.shape[1], x.shape[0]) + x.shape[2:], dtype=x.dtype, device=x.device
        ).transpose(0, 1),
    }
    views["every_other_row"] = torch.randn(
        (2 * x.shape[0],) + x.shape[1:], dtype=x.dtype, device=x.device
    )[::2]
    return views


LINEAR_NAMES = [n for n in CASE_NAMES if "Linear" in n]


@pytest.mark.parametrize(
    "view", ["every_other_column", "expanded_rows", "leading_dims_permuted", "every_other_row"]
)
@pytest.mark.parametrize("name", LINEAR_NAMES)
def test_non_contiguous_inputs(name, view, device):
    layer, x = case(name, device=device)
    x = torch.randn((3, 2, x.shape[-1]), dtype=x.dtype, device=device)
    views = strided_views(x)
    assert not views[view].is_contiguous()
    assert_same_function_and_gradients(layer, views[view], torch.mean)


@pytest.mark.parametrize("leading", [(4,), (2, 3), (2, 3, 2), (1, 1, 1)])
@pytest.mark.parametrize("name", LINEAR_NAMES)
def test_2d_3d_4d_inputs(name, leading, device):
    layer, x = case(name, device=device)
    x = torch.randn(leading + (x.shape[-1],), dtype=x.dtype, device=device)
    assert_same_function_and_gradients(layer, x, cross_entropy)


@pytest.mark.parametrize("name", ["Embedding", "IA3Embedding"])
def test_non_contiguous_and_4d_indices(name, device):
    layer, _ = case(name, device=device)
    indices = torch.tensor([[0, 1, 4, 10], [3, 1, 1, 7], [2, 2, 9, 5]], device=device)
    assert_same_function_and_gradients(layer, indices.t(), torch.sum)
    layer, _ = case(name, device=device)
    assert_same_function_and_gradients(layer, indices.reshape(3, 1, 2, 2), torch.mean)


def test_gradient_of_a_loss_twice_through_the_same_layer(device):
    """A layer used twice gets an accumulated gradient; the second use's gradient is expanded."""
    torch.manual_seed(0)
    layer = nonzero_adapters(lora.Linear(5, 5, r=2, dtype=torch.float64, device=device))
    reference = copy.deepcopy(layer)
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    layer(layer(x)).mean().backward()
    reference_output(reference, reference_output(reference, x)).mean().backward()
    for p, p_ref in zip(layer.parameters(), reference.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-12, atol=1e-12)


def test_cuda_view_copies_only_what_cublas_cannot_take():
    """The CUDA path's one copy (the CUDA boundary never copies): stride-0 and strided tensors
    become contiguous; contiguous tensors and transposed matrices stay views. The rule is
    device-independent, so it is checked here on CPU tensors."""
    contiguous = torch.randn(4, 6)
    assert _autograd._cuda_view(contiguous) is contiguous
    transposed = torch.randn(6, 4).t()
    assert _autograd._cuda_view(transposed) is transposed
    assert _autograd._cuda_view(None) is None
    for view in (
        torch.randn(6).expand(4, 6),
        torch.randn(4, 12)[:, ::2],
        torch.randn(3, 2, 6).transpose(0, 1),
        torch.ones(()).expand(2, 3, 6),
    ):
        copy_ = _autograd._cuda_view(view)
        assert copy_.is_contiguous() and copy_.data_ptr() != view.data_ptr()
        assert torch.equal(copy_, view)


def dora_layers(device):
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=device)
    return {
        "DoraLinear": (
            lora.Linear(7, 5, r=2, lora_alpha=4, use_dora=True, **kw),
            torch.randn(2, 3, 7, **kw),
        ),
        "DoraLinear-fan_in_fan_out": (
            lora.Linear(7, 5, r=2, use_dora=True, fan_in_fan_out=True, **kw),
            torch.randn(4, 7, **kw)[::2],
        ),
        "DoraEmbedding": (
            lora.Embedding(11, 5, r=2, use_dora=True, padding_idx=1, **kw),
            torch.tensor([[0, 1, 4, 10], [3, 1, 1, 7]], device=device).t(),
        ),
    }


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("name", ["DoraLinear", "DoraLinear-fan_in_fan_out", "DoraEmbedding"])
def test_dora_layers_take_any_strides(name, loss, device):
    """DoRA has no plain-torch reference here (tests/test_dora_torch.py compares it with peft):
    the gradients a loss hands the layer (expanded for sum and mean) must give what the same
    gradient made contiguous gives, with a contiguous input."""
    layer, x = dora_layers(device)[name]
    nonzero_adapters(layer)
    twin = copy.deepcopy(layer)
    y = layer(x.requires_grad_(True) if x.is_floating_point() else x)
    LOSSES[loss](y).backward()
    x_twin = x.detach().contiguous()
    if x.is_floating_point():
        x_twin.requires_grad_(True)
    y_twin = twin(x_twin)
    probe = y_twin.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(LOSSES[loss](probe), probe)
    y_twin.backward(grad.contiguous())
    torch.testing.assert_close(y, y_twin, rtol=1e-12, atol=1e-12)
    for (p_name, p), p_twin in zip(layer.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (p_twin.grad is None), p_name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_twin.grad, rtol=1e-12, atol=1e-12)
    if x.is_floating_point():
        torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-12, atol=1e-12)
