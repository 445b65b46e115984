"""Issue 12, the Python-level defects: layers and adapter files under hostile callers.

* dtype or device changes while merged (``l.eval(); l.half(); l.train()``) leave a layer that
  trains correctly, and no exception leaves a layer half-changed (defect 5);
* the layers follow torch's dtype rules: whatever plain torch raises for an input dtype, the
  layer raises the same way, merged or not; nothing is cast silently (defect 11);
* adapters with integer buffers (a BatchNorm in ``modules_to_save``) round-trip, also through the
  real peft (defect 6);
* every corrupt adapter file is a ValueError naming it, and the model is left unchanged
  (defect 12, the Python half);
* a build never reuses objects built with another configuration (defect 14).
"""
import copy
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import cpeft as lora  # noqa: E402
from test_layers_torch import CASE_NAMES, case, make_layers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tolerances between two computations of the same function in one dtype (a merged layer against
# an unmerged one: the merge rounds W + ΔW once more).
TOLERANCE = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
             torch.float64: dict(rtol=1e-12, atol=1e-12)}

CONVERSIONS = {
    "half": (torch.float16, lambda module: module.half()),
    "to_bfloat16": (torch.bfloat16, lambda module: module.to(torch.bfloat16)),
    "double": (torch.float64, lambda module: module.double()),
    # Through a parent module: nn.Module._apply recurses into the layer.
    "parent_to_float16": (torch.float16, lambda module: nn.Sequential(module).to(torch.float16)),
}


def input_in(x, dtype):
    return x.to(dtype) if x.is_floating_point() else x


def sgd_step(layer, x, probe_seed=3):
    y = layer(x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(probe_seed)).to(y.dtype)
    (y * probe).sum().backward()
    with torch.no_grad():
        for param in layer.parameters():
            if param.grad is not None:
                param -= 0.1 * param.grad
    layer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Defect 5: dtype changes while merged.


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
@pytest.mark.parametrize("name", CASE_NAMES)
def test_dtype_change_while_merged_leaves_a_layer_that_trains(name, conversion):
    dtype, convert = CONVERSIONS[conversion]
    layer, x = case(name, dtype=torch.float32)
    fresh = copy.deepcopy(layer)
    convert(fresh)  # the reference: converted while unmerged
    x = input_in(x, dtype)

    layer.eval()
    assert layer.merged
    convert(layer)
    assert layer.merged and not layer.training
    with torch.no_grad():
        merged_y = layer(x)
        assert merged_y.dtype == dtype
        torch.testing.assert_close(merged_y, fresh(x), **TOLERANCE[dtype])

    assert layer.train() is layer
    assert layer.training and not layer.merged
    fresh_state = fresh.state_dict()
    for key, value in layer.state_dict().items():
        assert value.dtype == fresh_state[key].dtype, key
        assert torch.equal(value, fresh_state[key]), f"{key}: not the unmerged original converted"
    assert not [n for n, _ in layer.named_buffers() if n.startswith("_merge_")]

    adapters_before = {n: p.detach().clone() for n, p in layer.named_parameters()
                       if "lora_" in n or "ia3_" in n}
    sgd_step(layer, x)
    sgd_step(fresh, x)
    for n, p in layer.named_parameters():
        if n in adapters_before:
            assert not torch.equal(p, adapters_before[n]), f"{n} was not trained"
    for (n, p), p_ref in zip(layer.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
    torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)

    # And the eval/train cycle keeps working in the new dtype.
    before = copy.deepcopy(layer.state_dict())
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fresh(x), **TOLERANCE[dtype])
    layer.train()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", CASE_NAMES)
def test_the_issue_reproducer_half_while_merged_then_train(name):
    layer, x = case(name, dtype=torch.float32)
    layer.eval()
    layer.half()
    layer.train()
    assert layer.training and not layer.merged
    adapters = [p for n, p in layer.named_parameters() if "lora_" in n or "ia3_" in n]
    layer(input_in(x, torch.float16)).float().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


@pytest.mark.parametrize("name", ["Linear", "MergedLinear", "Embedding", "IA3Linear",
                                  "IA3Linear-feedforward", "Conv2d"])
def test_a_failing_unmerge_or_merge_leaves_the_flags_as_they_were(name, monkeypatch):
    layer, x = case(name, dtype=torch.float32)
    before = copy.deepcopy(layer.state_dict())
    layer.eval()

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    with monkeypatch.context() as patch:
        patch.setattr(layer, "_unmerge_tensors", fail)
        with pytest.raises(RuntimeError, match="injected"):
            layer.train()
        assert not layer.training and layer.merged
    layer.train()
    assert layer.training and not layer.merged
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key

    with monkeypatch.context() as patch:
        patch.setattr(layer, "_merge_tensors", fail)
        with pytest.raises(RuntimeError, match="injected"):
            layer.eval()
        assert layer.training and not layer.merged
    with torch.no_grad():
        expected = copy.deepcopy(layer)(x)
        torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["Linear", "Embedding", "IA3Linear", "Conv1d"])
def test_weights_retyped_behind_the_layers_back_still_unmerge(name):
    """``weight.data = weight.data.half()`` bypasses ``_apply``: the record stays float32 and the
    CPU core has no float16 unmerge; train() unmerges in float32 and rounds back."""
    layer, x = case(name, dtype=torch.float32)
    weight = layer.conv.weight if isinstance(layer, lora.ConvLoRA) else layer.weight
    original = weight.detach().clone()
    layer.eval()
    weight.data = weight.data.half()
    layer.train()
    assert layer.training and not layer.merged
    torch.testing.assert_close(weight.float(), original, rtol=2e-3, atol=2e-3)


def test_moving_a_merged_layer_to_meta_leaves_it_unmerged():
    layer, _ = case("Linear", dtype=torch.float32)
    layer.eval().to("meta")
    assert layer.weight.is_meta and not layer.merged
    assert layer.train() is layer and not layer.merged


# ---------------------------------------------------------------------------------------------
# Defect 11: torch's dtype rules, no silent casts.

LAYER_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INPUT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                torch.bool]
INDEX_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.float32,
                torch.float64]
AUTOCAST = [None, torch.bfloat16, torch.float16]


def plain_torch_twin(layer):
    """The torch module whose dtype behaviour the layer must have, with the layer's weights."""
    if isinstance(layer, lora.ConvLoRA):
        return copy.deepcopy(layer.conv)
    if isinstance(layer, nn.Embedding):
        return nn.Embedding.from_pretrained(layer.weight.detach().clone(), freeze=False,
                                            padding_idx=layer.padding_idx)
    twin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                     dtype=layer.weight.dtype)
    with torch.no_grad():
        twin.weight.copy_(layer.weight.T if layer.fan_in_fan_out else layer.weight)
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
    return twin


def outcome(module, x, autocast_dtype):
    """The output dtype, or (exception type, message) when the call raises."""
    try:
        if autocast_dtype is None:
            return module(x).dtype
        with torch.autocast("cpu", dtype=autocast_dtype):
            return module(x).dtype
    except Exception as exc:  # noqa: BLE001 - the exception itself is what is compared
        return type(exc), str(exc)


def index_message_prefix(result):
    # torch names a bool tensor "CPUBoolType" in this one message, cpeft "torch.BoolTensor".
    if isinstance(result, tuple):
        return result[0], result[1].split(" but got")[0]
    return result


@pytest.mark.parametrize("name", CASE_NAMES)
def test_input_dtypes_follow_torch_merged_or_not(name):
    mismatches = []
    for layer_dtype in LAYER_DTYPES:
        layer, x = case(name, dtype=layer_dtype)
        twin = plain_torch_twin(layer)
        embedding = isinstance(layer, nn.Embedding)
        for input_dtype in (INDEX_DTYPES if embedding else INPUT_DTYPES):
            probe = x.to(input_dtype)
            for autocast_dtype in AUTOCAST:
                expected = outcome(twin, probe, autocast_dtype)
                for mode in (True, False):
                    layer.train(mode)
                    got = outcome(layer, probe, autocast_dtype)
                    if embedding:
                        got, expected_here = index_message_prefix(got), index_message_prefix(expected)
                    else:
                        expected_here = expected
                    if got != expected_here:
                        mismatches.append((layer_dtype, input_dtype, autocast_dtype,
                                           "train" if mode else "eval", got, expected_here))
    assert not mismatches, "\n".join(map(str, mismatches[:10]))


def test_the_issue_reproducers_raise_as_torch_does():
    linear = lora.Linear(4, 3, r=2)
    with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype, but got Long"):
        linear(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="but got Double and Float"):
        linear(torch.ones(2, 4, dtype=torch.float64))
    embedding = lora.Embedding(5, 3, r=2)
    for indices in (torch.tensor([1.7]), torch.tensor([True])):
        with pytest.raises(RuntimeError, match="'indices' to have one of the following scalar"):
            embedding(indices)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_layer_given_its_own_dtype_returns_it_and_matches_torch(name, dtype):
    """The CPU core computes float16/bfloat16 in float32 internally; what the caller sees is the
    layer's dtype, with values close to the plain-torch function in that dtype."""
    from test_layers_torch import reference_output

    layer, x = case(name, dtype=dtype)
    x = input_in(x, dtype)
    tolerance = TOLERANCE.get(dtype, dict(rtol=1e-5, atol=1e-5))
    with torch.no_grad():
        expected = reference_output(layer, x)
        for mode in (True, False):
            y = layer.train(mode)(x)
            assert y.dtype == dtype
            torch.testing.assert_close(y.float(), expected.float(), **tolerance)
