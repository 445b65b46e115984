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

from test_layers_torch import CASE_NAMES, case, reference_output  # noqa: E402

import cpeft as lora  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tolerances between two computations of the same function in one dtype (a merged layer against
# an unmerged one: the merge rounds W + ΔW once more).
TOLERANCE = {
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}

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

    adapters_before = {
        n: p.detach().clone() for n, p in layer.named_parameters() if "lora_" in n or "ia3_" in n
    }
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


@pytest.mark.parametrize(
    "name", ["Linear", "MergedLinear", "Embedding", "IA3Linear", "IA3Linear-feedforward", "Conv2d"]
)
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
INPUT_DTYPES = [
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.int64,
    torch.bool,
]
INDEX_DTYPES = [
    torch.int64,
    torch.int32,
    torch.int16,
    torch.uint8,
    torch.bool,
    torch.float32,
    torch.float64,
]
AUTOCAST = [None, torch.bfloat16, torch.float16]


def plain_torch_twin(layer):
    """The torch module whose dtype behaviour the layer must have, with the layer's weights."""
    if isinstance(layer, lora.ConvLoRA):
        return copy.deepcopy(layer.conv)
    if isinstance(layer, nn.Embedding):
        return nn.Embedding.from_pretrained(
            layer.weight.detach().clone(), freeze=False, padding_idx=layer.padding_idx
        )
    twin = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.weight.dtype
    )
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
        for input_dtype in INDEX_DTYPES if embedding else INPUT_DTYPES:
            probe = x.to(input_dtype)
            for autocast_dtype in AUTOCAST:
                expected = outcome(twin, probe, autocast_dtype)
                for mode in (True, False):
                    layer.train(mode)
                    got = outcome(layer, probe, autocast_dtype)
                    if embedding:
                        got, expected_here = (
                            index_message_prefix(got),
                            index_message_prefix(expected),
                        )
                    else:
                        expected_here = expected
                    if got != expected_here:
                        mismatches.append(
                            (
                                layer_dtype,
                                input_dtype,
                                autocast_dtype,
                                "train" if mode else "eval",
                                got,
                                expected_here,
                            )
                        )
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
    layer, x = case(name, dtype=dtype)
    x = input_in(x, dtype)
    tolerance = TOLERANCE.get(dtype, dict(rtol=1e-5, atol=1e-5))
    with torch.no_grad():
        expected = reference_output(layer, x)
        for mode in (True, False):
            y = layer.train(mode)(x)
            assert y.dtype == dtype
            torch.testing.assert_close(y.float(), expected.float(), **tolerance)


# ---------------------------------------------------------------------------------------------
# Defect 6: integer buffers in modules_to_save round-trip (cpeft <-> cpeft, cpeft <-> peft).


class NetWithBatchNorm(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def train_a_little(peft_model, steps=3):
    """Random adapters, then train-mode forwards: the BatchNorm copy's running statistics and
    its int64 num_batches_tracked move away from their initial values."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        peft_model.train()
        for _ in range(steps):
            peft_model(torch.randn(8, 4, generator=generator))
    return peft_model.eval()


def batch_norm_copy(peft_model):
    return peft_model.base_model.model.bn.modules_to_save["default"]


def eval_output(model):
    with torch.no_grad():
        return model(torch.randn(5, 4, generator=torch.Generator().manual_seed(9)))


def assert_unchanged(model, state, module_types):
    assert [type(m) for m in model.modules()] == module_types
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def test_batch_norm_in_modules_to_save_round_trips(tmp_path):
    from cpeft.peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["bn"])
    ours = train_a_little(get_peft_model(NetWithBatchNorm(), config))
    assert int(batch_norm_copy(ours).num_batches_tracked) == 3
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(NetWithBatchNorm(), tmp_path)
    saved, reloaded = ours.get_adapter_state_dict(), loaded.get_adapter_state_dict()
    assert list(saved) == list(reloaded)
    for key, value in saved.items():
        assert reloaded[key].dtype == value.dtype and torch.equal(reloaded[key], value), key
    assert int(batch_norm_copy(loaded).num_batches_tracked) == 3
    torch.testing.assert_close(eval_output(loaded), eval_output(ours), rtol=0, atol=0)


def test_batch_norm_in_modules_to_save_crosses_to_and_from_peft(tmp_path):
    hf_peft = pytest.importorskip("peft")
    from cpeft.peft import LoraConfig, PeftModel, get_peft_model

    ours = train_a_little(
        get_peft_model(
            NetWithBatchNorm(),
            LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["bn"]),
        )
    )
    ours.save_pretrained(tmp_path / "ours")
    theirs_loaded = hf_peft.PeftModel.from_pretrained(NetWithBatchNorm(), tmp_path / "ours").eval()
    assert int(batch_norm_copy(theirs_loaded).num_batches_tracked) == 3
    torch.testing.assert_close(eval_output(theirs_loaded), eval_output(ours), rtol=1e-6, atol=1e-6)

    theirs = train_a_little(
        hf_peft.get_peft_model(
            NetWithBatchNorm(),
            hf_peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["bn"]),
        )
    )
    theirs.save_pretrained(tmp_path / "theirs")
    ours_loaded = PeftModel.from_pretrained(NetWithBatchNorm(), tmp_path / "theirs")
    assert int(batch_norm_copy(ours_loaded).num_batches_tracked) == 3
    torch.testing.assert_close(eval_output(ours_loaded), eval_output(theirs), rtol=1e-6, atol=1e-6)


def test_an_integer_buffer_is_loaded_only_from_its_own_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    from cpeft.peft import ADAPTER_WEIGHTS_NAME, LoraConfig, PeftModel, get_peft_model

    train_a_little(
        get_peft_model(
            NetWithBatchNorm(),
            LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["bn"]),
        )
    ).save_pretrained(tmp_path)
    weights = tmp_path / ADAPTER_WEIGHTS_NAME
    tensors = load_file(weights)
    for key, dtype in (
        ("base_model.model.bn.num_batches_tracked", torch.float32),
        ("base_model.model.bn.running_mean", torch.int64),
    ):
        save_file(dict(tensors, **{key: tensors[key].to(dtype)}), weights)
        model = NetWithBatchNorm()
        state, types = copy.deepcopy(model.state_dict()), [type(m) for m in model.modules()]
        with pytest.raises(ValueError, match=f"{ADAPTER_WEIGHTS_NAME}: key '{key}'"):
            PeftModel.from_pretrained(model, tmp_path)
        assert_unchanged(model, state, types)


# ---------------------------------------------------------------------------------------------
# Defect 12 (Python half): corrupt adapter files are ValueErrors naming the file.


def corrupt_config_cases():
    deep = "[" * 100_000 + "]" * 100_000
    return {
        "nested_far_beyond_the_recursion_limit": lambda text: text[:-1] + f', "r": {deep}}}',
        "a_field_nested_far_beyond_the_recursion_limit": lambda text: (
            text[:-1] + f', "target_modules": {deep}}}'
        ),
        "an_integer_beyond_python_digit_limit": lambda text: (
            text[:-1] + ', "r": 1' + "0" * 5000 + "}"
        ),
        "not_json": lambda text: text[: len(text) // 2],
        "not_utf8": lambda text: "\udcff",
        "a_list": lambda text: "[1, 2]",
        "no_module_matches": lambda text: text.replace('"fc1"', '"nowhere"'),
        "a_field_of_the_wrong_type": lambda text: text[:-1] + ', "lora_dropout": {"p": 0.1}}',
    }


@pytest.mark.parametrize("case_name", list(corrupt_config_cases()))
def test_a_corrupt_adapter_config_is_a_value_error_naming_it(case_name, tmp_path):
    from cpeft.peft import ADAPTER_CONFIG_NAME, LoraConfig, PeftModel, get_peft_model

    get_peft_model(NetWithBatchNorm(), LoraConfig(r=2, target_modules=["fc1"])).save_pretrained(
        tmp_path
    )
    config_path = tmp_path / ADAPTER_CONFIG_NAME
    text = json.dumps(json.loads(config_path.read_text()))
    config_path.write_bytes(
        corrupt_config_cases()[case_name](text).encode("utf-8", "surrogateescape")
    )
    model = NetWithBatchNorm()
    state, types = copy.deepcopy(model.state_dict()), [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as raised:
        PeftModel.from_pretrained(model, tmp_path)
    assert str(config_path) in str(raised.value)
    assert_unchanged(model, state, types)


@pytest.mark.parametrize("cut", ["empty", "header_only", "truncated", "garbage"])
def test_a_corrupt_weights_file_is_a_value_error_naming_it(cut, tmp_path):
    from cpeft.peft import ADAPTER_WEIGHTS_NAME, LoraConfig, PeftModel, get_peft_model

    get_peft_model(NetWithBatchNorm(), LoraConfig(r=2, target_modules=["fc1"])).save_pretrained(
        tmp_path
    )
    weights = tmp_path / ADAPTER_WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(
        {
            "empty": b"",
            "header_only": data[:8],
            "truncated": data[:-3],
            "garbage": bytes(range(256)) * 2,
        }[cut]
    )
    model = NetWithBatchNorm()
    state, types = copy.deepcopy(model.state_dict()), [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as raised:
        PeftModel.from_pretrained(model, tmp_path)
    assert str(weights) in str(raised.value)
    assert_unchanged(model, state, types)


# ---------------------------------------------------------------------------------------------
# Defect 14: a build never reuses what another configuration built.


def build_into(lib, temp, **config):
    """``setup.py build_ext`` into scratch folders, CPU only; returns its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPEFT_")}
    env.update(CPEFT_CUDA="0", **config)
    done = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "build_ext",
            "--build-lib",
            str(lib),
            "--build-temp",
            str(temp),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def built_module(lib):
    (module,) = (lib / "cpeft").glob("_C*.so")
    return module


def build_info_of(lib):
    """build_info() of the module in ``lib``, imported in a fresh interpreter."""
    sources = os.path.join(ROOT, "python", "cpeft")
    for name in os.listdir(sources):
        if name.endswith(".py"):
            with open(os.path.join(sources, name), "rb") as handle:
                (lib / "cpeft" / name).write_bytes(handle.read())
    done = subprocess.run(
        [sys.executable, "-c", "import cpeft, json; print(json.dumps(cpeft.build_info()))"],
        env=dict(os.environ, PYTHONPATH=str(lib)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_build_never_reuses_a_module_built_with_another_configuration(tmp_path):
    """Slow (two real C builds, ~5-20 s each): the stale-build reproducer of the issue was a
    module built with CUDA in one environment that a plain ``pip install .`` elsewhere reused.
    Debug and release stand in for the two configurations here (CUDA needs nvcc)."""
    pytest.importorskip("scipy_openblas32")
    lib, temp = tmp_path / "lib", tmp_path / "temp"

    log = build_into(lib, temp, CPEFT_DEBUG="1")
    assert "building 'cpeft._C' extension" in log
    debug_module = built_module(lib).read_bytes()
    assert build_info_of(lib)["debug"] is True

    stamp = built_module(lib).stat().st_mtime_ns
    log = build_into(lib, temp, CPEFT_DEBUG="1")
    assert "building 'cpeft._C' extension" not in log, "the same configuration rebuilt"
    assert built_module(lib).stat().st_mtime_ns == stamp

    # The debug module is newer than every source, which is all setuptools' own check looks at
    # (the CUDA module of the issue was, too): the release configuration rebuilds regardless.
    log = build_into(lib, temp, CPEFT_DEBUG="0")
    assert "was not built by this configuration; rebuilding" in log
    assert build_info_of(lib)["debug"] is False
    assert built_module(lib).read_bytes() != debug_module
    assert len(list(temp.glob("config-*"))) == 2, "objects of each configuration kept apart"
