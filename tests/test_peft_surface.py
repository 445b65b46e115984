"""The rest of peft's everyday surface (issue 13), checked against the real Hugging Face peft 0.21:
adapter dtype (autocast_adapter_dtype), merge and save options, loading options, PeftType,
inject_adapter_in_model and get_base_model_state_dict. Outputs, gradients and files are compared
with peft's own on the same models and adapter values; files cross in both directions."""

import json
import os
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from torch import nn  # noqa: E402

import cpeft  # noqa: E402
from conftest import skip_without_cuda  # noqa: E402
from cpeft.peft import (  # noqa: E402
    ADAPTER_BIN_WEIGHTS_NAME,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    IA3Config,
    LoraConfig,
    PeftModel,
    PeftType,
    get_base_model_state_dict,
    get_peft_model,
    inject_adapter_in_model,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


class MLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 8)
        self.head = nn.Linear(8, 3)
        self.to(dtype)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(h)))))


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return MLP(dtype).eval()


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def ids(seed=1, vocab=50):
    return torch.randint(0, vocab, (4, 7), generator=torch.Generator().manual_seed(seed))


def adapter_items(model):
    """{name: parameter} of every adapter parameter, named the same way for cpeft and peft: the
    module path plus lora_A / lora_B / ia3_l (embeddings' lora_embedding_A/B read lora_A/B)."""
    items = {}
    for name, parameter in model.named_parameters():
        parts = [
            p for p in name.split(".") if p not in ("default", "weight", "base_model", "model")
        ]
        if any(p.startswith(("lora_", "ia3_")) for p in parts):
            items[".".join(parts).replace("lora_embedding_", "lora_")] = parameter
    return items


def copy_adapters(source, destination):
    """peft's adapter values into cpeft's layers (or the reverse), matched by name and shape."""
    src, dst = adapter_items(source), adapter_items(destination)
    assert sorted(src) == sorted(dst)
    with torch.no_grad():
        for key, parameter in dst.items():
            parameter.copy_(src[key].reshape(parameter.shape))


def randomize(model, seed=5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, parameter in adapter_items(model).items():
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.dtype)
            parameter.copy_(1.0 + 0.3 * noise if "ia3_l" in key else 0.3 * noise)


def lora(**kwargs):
    kwargs.setdefault("target_modules", ["lin0", "lin1", "emb"])
    return LoraConfig(r=4, lora_alpha=8, **kwargs), hf_peft.LoraConfig(r=4, lora_alpha=8, **kwargs)


def ia3():
    kwargs = {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}
    return IA3Config(**kwargs), hf_peft.IA3Config(**kwargs)


# ------------------------------------------------------------------------------------ PeftType


def test_peft_type_is_a_str_enum_and_the_saved_json_is_unchanged(tmp_path):
    for ours, theirs in (lora(), ia3()):
        assert isinstance(ours.peft_type, PeftType) and isinstance(ours.peft_type, str)
        assert ours.peft_type.value == theirs.peft_type.value
        assert ours.peft_type == theirs.peft_type.value and ours.peft_type == theirs.peft_type
    assert [member.value for member in PeftType] == ["LORA", "IA3"]
    assert all(getattr(hf_peft.PeftType, member.name).value == member.value for member in PeftType)

    our_model = get_peft_model(mlp(), lora()[0])
    their_model = hf_peft.get_peft_model(mlp(), lora()[1])
    our_model.save_pretrained(tmp_path / "ours")
    their_model.save_pretrained(tmp_path / "theirs")
    our_json = json.loads((tmp_path / "ours" / ADAPTER_CONFIG_NAME).read_text())
    their_json = json.loads((tmp_path / "theirs" / ADAPTER_CONFIG_NAME).read_text())
    assert our_json["peft_type"] == their_json["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(mlp(), tmp_path / "theirs")
    assert loaded.peft_config["default"].peft_type is PeftType.LORA


# ------------------------------------------------------------------------------- adapter dtype


def adapter_dtypes(model):
    return {key: parameter.dtype for key, parameter in adapter_items(model).items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_autocast_adapter_dtype_gives_peft_s_dtypes(dtype, autocast, method):
    ours_config, theirs_config = lora() if method == "lora" else ia3()
    ours = get_peft_model(mlp(dtype=dtype), ours_config, autocast_adapter_dtype=autocast)
    theirs = hf_peft.get_peft_model(
        mlp(dtype=dtype), theirs_config, autocast_adapter_dtype=autocast
    )
    assert adapter_dtypes(ours) == adapter_dtypes(theirs)
    expected = torch.float32 if autocast else dtype
    assert set(adapter_dtypes(ours).values()) == {expected}
    # The base weights keep their dtype either way.
    assert ours.get_base_model().lin0.weight.dtype == dtype


def test_autocast_adapter_dtype_is_a_bool():
    with pytest.raises(ValueError, match="autocast_adapter_dtype"):
        get_peft_model(mlp(), lora()[0], autocast_adapter_dtype="yes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_fp32_adapters_on_a_16_bit_model_match_peft_outputs_and_gradients(dtype, method):
    ours_config, theirs_config = lora() if method == "lora" else ia3()
    theirs = hf_peft.get_peft_model(mlp(dtype=dtype), theirs_config)
    randomize(theirs)
    ours = get_peft_model(mlp(dtype=dtype), ours_config)
    copy_adapters(theirs, ours)
    tokens = ids()
    outputs, grads = [], []
    for model in (ours, theirs):
        model.train()
        result = model(tokens)
        assert result.dtype == dtype  # output in the base dtype, as peft
        result.float().square().sum().backward()
        outputs.append(result.detach().float())
        grads.append({key: p.grad for key, p in adapter_items(model).items()})
    # Both round to the 16-bit base dtype once per layer; they differ only by that rounding.
    scale = outputs[1].abs().max()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=float(scale) * 2e-2)
    assert not torch.equal(outputs[1], mlp(dtype=dtype)(tokens).float())  # the adapters matter
    for key, expected in grads[1].items():
        assert grads[0][key].dtype == torch.float32 == expected.dtype, key
        torch.testing.assert_close(
            grads[0][key], expected, rtol=0, atol=float(expected.abs().max()) * 5e-2 + 1e-6, msg=key
        )


def test_fp32_adapters_on_bf16_layer_against_float64_reference():
    """One bf16 linear layer with float32 adapters: forward and every gradient against float64
    math on the same (bf16-valued) inputs, within bf16 output rounding."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 40)).to(torch.bfloat16)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    )
    layer = peft_model.get_base_model()[0]
    a, b = (p for key, p in adapter_items(peft_model).items() if "lora" in key)
    assert a.dtype == b.dtype == torch.float32
    x = torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True)
    y = peft_model(x)
    g = torch.randn_like(y)
    y.backward(g)

    w, bias = layer.weight.double(), layer.bias.double()
    x64, g64 = x.detach().double(), g.double()
    ref = x64 @ w.T + bias + 2.0 * (x64 @ a.detach().double().T) @ b.detach().double().T
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)
    ref_grad_b = 2.0 * g64.T @ (x64 @ a.detach().double().T)
    ref_grad_a = 2.0 * (g64 @ b.detach().double()).T @ x64
    torch.testing.assert_close(b.grad.double(), ref_grad_b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a.grad.double(), ref_grad_a, rtol=1e-5, atol=1e-4)
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cuda_core_takes_fp32_adapters_without_widening_x(dtype, dropout):
    """The CUDA core runs 16-bit x with float32 A and B: gradients of A and B come back in
    float32 and agree with float64 math (given the same dropout mask) to 16-bit input rounding."""
    skip_without_cuda()
    from cpeft import functional

    torch.manual_seed(0)
    device = "cuda"
    m, n_in, n_out, r, scale = 64, 96, 80, 8, 0.5
    x = torch.randn(m, n_in, device=device).to(dtype)
    w = (torch.randn(n_out, n_in, device=device) / 10).to(dtype)
    a = torch.randn(r, n_in, device=device) / 10
    b = torch.randn(n_out, r, device=device) / 10
    g = torch.randn(m, n_out, device=device).to(dtype)
    y, xa = functional.lora_linear_forward(x, w, None, a, b, scale, dropout=dropout, seed=7)
    grads = functional.lora_linear_backward(g, x, w, a, b, xa, scale, dropout=dropout, seed=7)
    assert (
        y.dtype == xa.dtype == dtype and grads.lora_a.dtype == grads.lora_b.dtype == torch.float32
    )
    mask = (
        torch.from_numpy(functional.dropout_mask((m, n_in), dropout, seed=7, dtype="float64")).to(
            device
        )
        if dropout
        else 1.0
    )
    x64, w64, g64 = x.double(), w.double(), g.double()
    a16, b16 = a.to(dtype).double(), b.to(dtype).double()
    xd = x64 * mask
    torch.testing.assert_close(
        y.double(), x64 @ w64.T + scale * (xd @ a16.T) @ b16.T, rtol=2e-2, atol=2e-2
    )
    torch.testing.assert_close(
        grads.lora_b.double(), scale * g64.T @ xa.double(), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        grads.lora_a.double(), scale * ((g64 @ b16).T @ xd), rtol=2e-2, atol=2e-2
    )


# ----------------------------------------------------------------------------- merge options


def test_safe_merge_refuses_non_finite_merges_before_touching_any_weight():
    ours_config, theirs_config = lora()
    ours = get_peft_model(mlp(), ours_config)
    theirs = hf_peft.get_peft_model(mlp(), theirs_config)
    randomize(theirs)
    copy_adapters(theirs, ours)
    tokens = ids()
    expected = ours(tokens)
    # Break only the last targeted layer: the layers merged before it must stay untouched too.
    for model in (ours, theirs):
        lora_b = [p for key, p in adapter_items(model).items() if key.startswith("lin1.lora_B")][0]
        with torch.no_grad():
            lora_b[0, 0] = float("inf")
    before = {k: v.clone() for k, v in get_base_model_state_dict(ours).items()}
    with pytest.raises(ValueError, match="NaNs detected"):
        theirs.merge_and_unload(safe_merge=True)
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge_and_unload(safe_merge=True)
    after = get_base_model_state_dict(ours)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Nothing was swapped out either: the model still holds all its adapters (peft has merged and
    # unloaded the layers before the broken one by then) and unloads cleanly.
    assert len(adapter_items(ours)) == 6 and len(adapter_items(theirs)) == 2
    unloaded = ours.unload()
    with torch.no_grad():
        torch.testing.assert_close(unloaded(tokens), mlp()(tokens), rtol=0, atol=0)
    assert torch.isfinite(expected).all()


def test_safe_merge_result_equals_plain_merge_and_peft():
    ours_config, theirs_config = lora()
    theirs = hf_peft.get_peft_model(mlp(), theirs_config)
    randomize(theirs)
    plain, safe = get_peft_model(mlp(), ours_config), get_peft_model(mlp(), ours_config)
    copy_adapters(theirs, plain)
    copy_adapters(theirs, safe)
    tokens = ids()
    merged_plain = plain.merge_and_unload()
    merged_safe = safe.merge_and_unload(safe_merge=True, progressbar=True)
    merged_theirs = theirs.merge_and_unload(safe_merge=True, progressbar=True)
    assert type(merged_safe) is MLP
    for name, tensor in merged_plain.state_dict().items():
        assert torch.equal(tensor, merged_safe.state_dict()[name]), name
    with torch.no_grad():
        torch.testing.assert_close(merged_safe(tokens), merged_theirs(tokens), **TOL)


def test_merge_and_unload_adapter_names():
    ours_config, theirs_config = lora()
    theirs = hf_peft.get_peft_model(mlp(), theirs_config)
    randomize(theirs)
    tokens = ids()
    with torch.no_grad():
        base_out = mlp()(tokens)
        adapted = theirs(tokens)
    ours = get_peft_model(mlp(), ours_config)
    copy_adapters(theirs, ours)
    with pytest.raises(ValueError, match="adapter_names"):
        ours.merge_and_unload(adapter_names=["other"])
    with pytest.raises(ValueError, match="adapter_names"):
        ours.merge_and_unload(adapter_names="default")
    with pytest.raises(ValueError, match="safe_merge"):
        ours.merge_and_unload(safe_merge=1)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.merge_and_unload(adapter_names=["default"])(tokens), adapted, **TOL
        )
    # An empty list merges nothing, as in peft: the base model comes back.
    again = get_peft_model(mlp(), ours_config)
    copy_adapters(theirs, again)
    their_empty = hf_peft.get_peft_model(mlp(), theirs_config)
    copy_adapters(theirs, their_empty)
    with torch.no_grad():
        torch.testing.assert_close(
            again.merge_and_unload(adapter_names=[])(tokens), base_out, rtol=0, atol=0
        )
        torch.testing.assert_close(
            their_empty.merge_and_unload(adapter_names=[])(tokens), base_out, rtol=0, atol=0
        )


# ------------------------------------------------------------------------------ save and load


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_bin_files_cross_both_ways(method, tmp_path):
    ours_config, theirs_config = lora() if method == "lora" else ia3()
    tokens = ids()
    ours = get_peft_model(mlp(), ours_config)
    randomize(ours)
    with torch.no_grad():
        expected = ours(tokens)
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    assert ADAPTER_BIN_WEIGHTS_NAME in os.listdir(tmp_path / "ours")
    assert ADAPTER_WEIGHTS_NAME not in os.listdir(tmp_path / "ours")
    theirs = hf_peft.PeftModel.from_pretrained(mlp(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens), expected, **TOL)

    theirs.save_pretrained(tmp_path / "theirs", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "theirs")) == sorted(os.listdir(tmp_path / "ours"))
    our_tensors = torch.load(tmp_path / "ours" / ADAPTER_BIN_WEIGHTS_NAME, weights_only=True)
    their_tensors = torch.load(tmp_path / "theirs" / ADAPTER_BIN_WEIGHTS_NAME, weights_only=True)
    assert {k: tuple(v.shape) for k, v in our_tensors.items()} == {
        k: tuple(v.shape) for k, v in their_tensors.items()
    }
    loaded = PeftModel.from_pretrained(mlp(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), expected, **TOL)


def test_safetensors_is_read_before_bin_and_a_bad_bin_is_refused(tmp_path):
    ours_config, _ = lora()
    tokens = ids()
    first = get_peft_model(mlp(), ours_config)
    randomize(first, seed=1)
    second = get_peft_model(mlp(), ours_config)
    randomize(second, seed=2)
    first.save_pretrained(tmp_path)  # safetensors
    second.save_pretrained(tmp_path, safe_serialization=False)  # bin beside it
    with torch.no_grad():
        torch.testing.assert_close(
            PeftModel.from_pretrained(mlp(), tmp_path)(tokens), first(tokens), **TOL
        )
        os.remove(tmp_path / ADAPTER_WEIGHTS_NAME)
        torch.testing.assert_close(
            PeftModel.from_pretrained(mlp(), tmp_path)(tokens), second(tokens), **TOL
        )

    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / ADAPTER_BIN_WEIGHTS_NAME).write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=ADAPTER_BIN_WEIGHTS_NAME):
        PeftModel.from_pretrained(model, tmp_path)
    torch.save([1, 2], tmp_path / ADAPTER_BIN_WEIGHTS_NAME)
    with pytest.raises(ValueError, match="dict of tensors"):
        PeftModel.from_pretrained(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_is_main_process_false_writes_nothing(tmp_path):
    get_peft_model(mlp(), lora()[0]).save_pretrained(tmp_path / "out", is_main_process=False)
    assert not os.path.exists(tmp_path / "out")


def test_from_pretrained_options(tmp_path):
    ours_config, theirs_config = lora()
    theirs = hf_peft.get_peft_model(mlp(), theirs_config)
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    tokens = ids()
    with torch.no_grad():
        expected = theirs(tokens)
    for kwargs in (
        {"torch_device": "cpu"},
        {"device_map": "auto"},
        {"device_map": "cpu"},
        {"device_map": {"": "cpu"}},
        {"device_map": torch.device("cpu"), "torch_device": "cpu"},
        {"low_cpu_mem_usage": True},
        {"config": ours_config},
    ):
        ours = PeftModel.from_pretrained(mlp(), tmp_path, **kwargs)
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens), expected, **TOL, msg=str(kwargs))
        assert not any(p.requires_grad for p in ours.parameters())
    with torch.no_grad():  # peft's subfolder= and its ignored Hub options
        nested = PeftModel.from_pretrained(
            mlp(), tmp_path.parent, subfolder=tmp_path.name, revision="main"
        )
        torch.testing.assert_close(nested(tokens), expected, **TOL)
    trainable = PeftModel.from_pretrained(mlp(), tmp_path, is_trainable=True)
    peft_trainable = hf_peft.PeftModel.from_pretrained(mlp(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == peft_trainable.get_nb_trainable_parameters()
    assert trainable.peft_config["default"].inference_mode is False

    # config= is used instead of the file's: a different rank no longer fits the tensors.
    with pytest.raises(ValueError, match="expected shape"):
        PeftModel.from_pretrained(
            mlp(), tmp_path, config=LoraConfig(r=2, target_modules=["lin0", "lin1", "emb"])
        )
    assert ours_config.inference_mode is False  # the caller's config is not modified
    for bad, match in (
        ({"device_map": {"lin0": "cpu", "lin1": "cpu"}}, "device_map"),
        ({"device_map": "balanced"}, "device_map"),
        ({"torch_device": "nowhere"}, "torch_device"),
        ({"torch_device": "meta"}, "torch_device"),
        ({"device_map": "cuda:7" if torch.cuda.device_count() < 8 else "xla"}, "device_map"),
        ({"torch_device": "cpu", "device_map": "meta"}, "device_map"),
        ({"config": {"r": 4}}, "config"),
        ({"key_mapping": {"a": "b"}}, "key_mapping"),
        ({"ephemeral_gpu_offload": True}, "ephemeral_gpu_offload"),
        ({"adapter_nmae": "typo"}, "adapter_nmae"),
        ({"is_trainable": "no"}, "is_trainable"),
    ):
        model = mlp()
        with pytest.raises((ValueError, TypeError), match=match):
            PeftModel.from_pretrained(model, tmp_path, **bad)
        assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("autocast", [True, False])
def test_from_pretrained_autocast_adapter_dtype_matches_peft(autocast, tmp_path):
    ours_config, theirs_config = lora()
    source = hf_peft.get_peft_model(
        mlp(dtype=torch.bfloat16), theirs_config, autocast_adapter_dtype=False
    )
    randomize(source)
    source.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(
        mlp(dtype=torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast
    )
    theirs = hf_peft.PeftModel.from_pretrained(
        mlp(dtype=torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast
    )
    assert adapter_dtypes(ours) == adapter_dtypes(theirs)
    for key, parameter in adapter_items(ours).items():
        assert torch.equal(parameter.float(), adapter_items(theirs)[key].float()), key


def test_push_to_hub_says_what_is_unsupported():
    peft_model = get_peft_model(mlp(), lora()[0])
    with pytest.raises(NotImplementedError, match="push_to_hub.*save_pretrained"):
        peft_model.push_to_hub("user/repo")


# ---------------------------------------------------------------------------- public functions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inject_adapter_in_model_matches_peft(dtype):
    ours_config, theirs_config = lora()
    model = mlp(dtype=dtype)
    injected = inject_adapter_in_model(ours_config, model)
    assert injected is model
    theirs = hf_peft.inject_adapter_in_model(theirs_config, mlp(dtype=dtype))
    assert adapter_dtypes(injected) == adapter_dtypes(theirs)  # peft keeps the base dtype here
    randomize(theirs)
    copy_adapters(theirs, injected)
    tokens = ids()
    with torch.no_grad():
        torch.testing.assert_close(
            injected(tokens).float(),
            theirs(tokens).float(),
            **(TOL if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}),
        )
    # The base weights are frozen and only the adapters train, as after peft's injection.
    assert sorted(k for k, p in adapter_items(injected).items() if p.requires_grad) == sorted(
        k for k, p in adapter_items(theirs).items() if p.requires_grad
    )
    with pytest.raises(ValueError, match="adapter_name"):
        inject_adapter_in_model(ours_config, mlp(), adapter_name="")
    # cpeft's extra keyword gives peft's get_peft_model dtypes instead.
    upcast = inject_adapter_in_model(ours_config, mlp(dtype=dtype), autocast_adapter_dtype=True)
    assert set(adapter_dtypes(upcast).values()) == {torch.float32}


def test_get_base_model_state_dict_matches_peft():
    config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    ours = get_peft_model(bert(), config)
    theirs = hf_peft.get_peft_model(
        bert(),
        hf_peft.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    randomize(ours)
    with (
        torch.no_grad()
    ):  # the trained copy of the classifier changes; the base state dict must not
        for model in (ours, theirs):
            for name, parameter in model.named_parameters():
                if "modules_to_save" in name:
                    parameter.add_(1.0)
    our_state, their_state = (
        get_base_model_state_dict(ours),
        hf_peft.get_base_model_state_dict(theirs),
    )
    assert list(our_state) == list(their_state) == list(bert().state_dict())
    reference = bert().state_dict()
    for key, tensor in our_state.items():
        assert torch.equal(tensor, reference[key]), key
        assert torch.equal(their_state[key], reference[key]), key
    with pytest.raises(TypeError, match="PeftModel"):
        get_base_model_state_dict(bert())


# ------------------------------------------------------------------ Conv and attention targets


class ConvNet(nn.Module):
    """Every conv shape peft's LoRA layout covers: strided/padded kernels in 1, 2 and 3 dims,
    pointwise convs with and without stride (the core's LoRA-linear path), a grouped conv, and
    attention."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.p1 = nn.Conv1d(6, 5, 1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.p2 = nn.Conv2d(6, 8, 1, stride=2)
        self.g3 = nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1), groups=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x1, x2, x3, q):
        a = self.p1(self.c1(x1))
        b = self.p2(torch.relu(self.c2(x2)))
        c = self.g3(x3)
        o, _ = self.attn(q, q, q, need_weights=False)
        return torch.cat([a.flatten(1), b.flatten(1), c.flatten(1), o.flatten(1)], dim=1)


def conv_net(seed=0):
    torch.manual_seed(seed)
    return ConvNet()


def conv_inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 9, generator=generator),
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.randn(2, 4, 3, 5, 5, generator=generator),
        torch.randn(2, 5, 8, generator=generator),
    )


CONV_TARGETS = ["c1", "p1", "c2", "p2", "g3"]


def zero_out_proj_lora_b(model):
    """peft 0.21's MultiheadAttention adds the out_proj delta twice (in its forward and in its
    merge; see test_mha_matches_plain_torch_and_peft), so comparisons with peft keep that delta 0."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "out_proj.lora_B" in name:
                parameter.zero_()


@pytest.mark.parametrize("lora_bias", [False, True])
def test_conv_lora_matches_peft_outputs_gradients_and_files(lora_bias, tmp_path):
    kwargs = dict(r=4, lora_alpha=8, target_modules=CONV_TARGETS, lora_bias=lora_bias)
    theirs = hf_peft.get_peft_model(conv_net(), hf_peft.LoraConfig(**kwargs))
    ours = get_peft_model(conv_net(), LoraConfig(**kwargs))
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert {k: tuple(v.shape) for k, v in our_state.items()} == {
        k: tuple(v.shape) for k, v in their_state.items()
    }
    randomize(theirs)
    with torch.no_grad():
        for key, tensor in our_state.items():
            tensor.copy_(their_state[key])
    inputs = conv_inputs()
    outputs = []
    for model in (ours, theirs):
        model.train()
        result = model(*inputs)
        result.square().sum().backward()
        outputs.append(result.detach())
    torch.testing.assert_close(outputs[0], outputs[1], **TOL)
    their_params = dict(theirs.named_parameters())
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert sorted(n for n, _ in trained) == sorted(
        n for n, p in their_params.items() if p.requires_grad
    )
    for name, parameter in trained:
        torch.testing.assert_close(
            parameter.grad, their_params[name].grad, rtol=1e-4, atol=1e-4, msg=name
        )

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    our_file = safetensors_torch.load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME)
    their_file = safetensors_torch.load_file(tmp_path / "theirs" / ADAPTER_WEIGHTS_NAME)
    assert {k: v.shape for k, v in our_file.items()} == {k: v.shape for k, v in their_file.items()}
    assert (
        json.loads((tmp_path / "ours" / ADAPTER_CONFIG_NAME).read_text())["lora_bias"] is lora_bias
    )
    with torch.no_grad():
        torch.testing.assert_close(
            hf_peft.PeftModel.from_pretrained(conv_net(), tmp_path / "ours")(*inputs),
            outputs[1],
            **TOL,
        )
        torch.testing.assert_close(
            PeftModel.from_pretrained(conv_net(), tmp_path / "theirs")(*inputs), outputs[1], **TOL
        )


@pytest.mark.parametrize("lora_bias", [False, True])
def test_conv_merge_is_exact_and_matches_peft(lora_bias):
    targets = ["c1", "c2", "p2"]  # peft refuses to merge grouped convs; see below
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, lora_bias=lora_bias)
    theirs = hf_peft.get_peft_model(conv_net(), hf_peft.LoraConfig(**kwargs))
    randomize(theirs)
    ours = get_peft_model(conv_net(), LoraConfig(**kwargs))
    with torch.no_grad():
        for key, tensor in ours.state_dict().items():
            tensor.copy_(theirs.state_dict()[key])
    inputs = conv_inputs()
    with torch.no_grad():
        unmerged = ours(*inputs)
        before = {k: v.clone() for k, v in get_base_model_state_dict(ours).items()}
        ours.merge_adapter()
        torch.testing.assert_close(ours(*inputs), unmerged, rtol=1e-5, atol=1e-5)
        ours.unmerge_adapter()
        after = get_base_model_state_dict(ours)
        assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
        merged = ours.merge_and_unload()
        assert type(merged.c2) is nn.Conv2d
        torch.testing.assert_close(
            merged(*inputs), theirs.merge_and_unload()(*inputs), rtol=1e-5, atol=1e-5
        )

    grouped = get_peft_model(conv_net(), LoraConfig(r=4, target_modules=["g3"]))
    their_grouped = hf_peft.get_peft_model(
        conv_net(), hf_peft.LoraConfig(r=4, target_modules=["g3"])
    )
    for model in (grouped, their_grouped):
        with pytest.raises(NotImplementedError, match="groups > 1"):
            model.merge_and_unload()


def test_conv_targets_peft_refuses_are_refused_untouched():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.dilated = nn.Conv2d(4, 4, 3, dilation=2, padding=2)
            self.grouped = nn.Conv2d(4, 4, 3, groups=4)
            self.c1 = nn.Conv1d(4, 4, 3)

    for config, match in (
        (LoraConfig(r=4, target_modules=["dilated"]), "dilation"),
        (LoraConfig(r=2, target_modules=["grouped"]), "divisible by groups"),
        (IA3Config(target_modules=["c1"]), "nn.Conv1d"),
    ):
        model = Odd()
        with pytest.raises(ValueError, match=match):
            get_peft_model(model, config)
        assert all(type(m) in (Odd, nn.Conv1d, nn.Conv2d) for m in model.modules())
    with pytest.raises(ValueError, match="lora_bias"):
        get_peft_model(mlp(), LoraConfig(target_modules=["emb"], lora_bias=True))
    with pytest.raises(ValueError, match="lora_bias"):
        hf_peft.get_peft_model(mlp(), hf_peft.LoraConfig(target_modules=["emb"], lora_bias=True))


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_conv_matches_peft(feedforward, tmp_path):
    kwargs = dict(
        target_modules=["c2", "p2", "g3"], feedforward_modules=["p2", "g3"] if feedforward else []
    )
    theirs = hf_peft.get_peft_model(conv_net(), hf_peft.IA3Config(**kwargs))
    ours = get_peft_model(conv_net(), IA3Config(**kwargs))
    randomize(theirs)
    with torch.no_grad():
        for key, tensor in ours.state_dict().items():
            tensor.copy_(theirs.state_dict()[key])
    inputs = conv_inputs()
    results = []
    for model in (ours, theirs):
        model.train()
        result = model(*inputs)
        result.square().sum().backward()
        results.append(result.detach())
    torch.testing.assert_close(results[0], results[1], **TOL)
    their_params = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(
                parameter.grad, their_params[name].grad, rtol=1e-4, atol=1e-4, msg=name
            )
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(
            hf_peft.PeftModel.from_pretrained(conv_net(), tmp_path / "ours")(*inputs),
            results[1],
            **TOL,
        )
        torch.testing.assert_close(
            PeftModel.from_pretrained(conv_net(), tmp_path / "theirs")(*inputs), results[1], **TOL
        )
        before = {k: v.clone() for k, v in get_base_model_state_dict(ours).items()}
        ours.merge_adapter()
        torch.testing.assert_close(ours(*inputs), results[0], rtol=1e-5, atol=1e-5)
        ours.unmerge_adapter()
        assert all(torch.equal(before[k], v) for k, v in get_base_model_state_dict(ours).items())


def mha_reference(model, lora, inputs):
    """Plain torch: the wrapped attention with W + s·B·A for in_proj and out_proj."""
    reference = conv_net()
    attn = reference.attn
    with torch.no_grad():
        layer = lora.base_model.model.attn
        out_layer = layer.base_layer.out_proj
        attn.in_proj_weight += (
            layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        ) * layer.scaling["default"]
        attn.out_proj.weight += (
            out_layer.lora_B["default"].weight @ out_layer.lora_A["default"].weight
        ) * out_layer.scaling["default"]
        return attn(inputs[3], inputs[3], inputs[3], need_weights=False)[0]


def test_mha_matches_plain_torch_and_peft(tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=["attn"])
    theirs = hf_peft.get_peft_model(conv_net(), hf_peft.LoraConfig(**config))
    ours = get_peft_model(conv_net(), LoraConfig(**config))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    randomize(theirs)
    with torch.no_grad():
        for key, tensor in ours.state_dict().items():
            tensor.copy_(theirs.state_dict()[key])
    inputs = conv_inputs()
    with torch.no_grad():
        attn_out = ours.base_model.model.attn(inputs[3], inputs[3], inputs[3], need_weights=False)[
            0
        ]
        torch.testing.assert_close(attn_out, mha_reference(conv_net(), ours, inputs), **TOL)
        # peft 0.21 adds out_proj's delta twice, so with it non-zero the outputs differ...
        their_out = theirs.base_model.model.attn(
            inputs[3], inputs[3], inputs[3], need_weights=False
        )[0]
        assert not torch.allclose(attn_out, their_out, **TOL)
    # ...and agree, with gradients, when it is zero.
    zero_out_proj_lora_b(ours)
    zero_out_proj_lora_b(theirs)
    results = []
    for model in (ours, theirs):
        model.train()
        result = model(*inputs)
        result.square().sum().backward()
        results.append(result.detach())
    torch.testing.assert_close(results[0], results[1], **TOL)
    their_params = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(
                parameter.grad, their_params[name].grad, rtol=1e-4, atol=1e-4, msg=name
            )
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(
            hf_peft.PeftModel.from_pretrained(conv_net(), tmp_path / "ours")(*inputs),
            results[1],
            **TOL,
        )
        torch.testing.assert_close(
            PeftModel.from_pretrained(conv_net(), tmp_path / "theirs")(*inputs), results[1], **TOL
        )


def test_mha_merge_unmerge_unload():
    ours = get_peft_model(conv_net(), LoraConfig(r=4, lora_alpha=8, target_modules=["attn"]))
    randomize(ours)
    inputs = conv_inputs()
    with torch.no_grad():
        expected = ours(*inputs)
        before = {k: v.clone() for k, v in get_base_model_state_dict(ours).items()}
        assert list(before) == list(conv_net().state_dict())
        ours.merge_adapter(safe_merge=True)
        torch.testing.assert_close(ours(*inputs), expected, rtol=1e-5, atol=1e-5)
        with ours.disable_adapter():  # unmerges first, as in peft
            disabled = ours(*inputs)
        assert all(torch.equal(before[k], v) for k, v in get_base_model_state_dict(ours).items())
        torch.testing.assert_close(disabled, conv_net()(*inputs), rtol=1e-6, atol=1e-6)
        merged = ours.merge_and_unload()
        assert type(merged.attn) is nn.MultiheadAttention and type(
            merged.attn.out_proj
        ) is not type(ours)
        assert not any(isinstance(m, cpeft.BaseTunerLayer) for m in merged.modules())
        torch.testing.assert_close(merged(*inputs), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="IA3"):
        get_peft_model(conv_net(), IA3Config(target_modules=["attn"]))


def test_lora_bias_on_linear_matches_peft_and_merges_into_the_bias(tmp_path):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], lora_bias=True)
    theirs = hf_peft.get_peft_model(mlp(), hf_peft.LoraConfig(**kwargs))
    ours = get_peft_model(mlp(), LoraConfig(**kwargs))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    randomize(theirs)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                parameter.copy_(torch.linspace(-1, 1, parameter.numel()))
        for key, tensor in ours.state_dict().items():
            tensor.copy_(theirs.state_dict()[key])
    tokens = ids()
    results = []
    for model in (ours, theirs):
        model.train()
        result = model(tokens)
        result.square().sum().backward()
        results.append(result.detach())
    torch.testing.assert_close(results[0], results[1], **TOL)
    their_params = dict(theirs.named_parameters())
    bias_grads = [
        n
        for n, p in ours.named_parameters()
        if p.requires_grad and n.endswith("lora_B.default.bias")
    ]
    assert len(bias_grads) == 2
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(
                parameter.grad, their_params[name].grad, rtol=1e-4, atol=1e-4, msg=name
            )
    ours.save_pretrained(tmp_path)
    assert "base_model.model.lin0.lora_B.bias" in safetensors_torch.load_file(
        tmp_path / ADAPTER_WEIGHTS_NAME
    )
    with torch.no_grad():
        torch.testing.assert_close(
            hf_peft.PeftModel.from_pretrained(mlp(), tmp_path)(tokens), results[1], **TOL
        )
        before = {k: v.clone() for k, v in get_base_model_state_dict(ours).items()}
        ours.merge_adapter()
        torch.testing.assert_close(ours(tokens), results[0], rtol=1e-5, atol=1e-5)
        assert not torch.equal(get_base_model_state_dict(ours)["lin0.bias"], before["lin0.bias"])
        ours.unmerge_adapter()
        assert all(torch.equal(before[k], v) for k, v in get_base_model_state_dict(ours).items())
        torch.testing.assert_close(
            ours.merge_and_unload()(tokens), theirs.merge_and_unload()(tokens), rtol=1e-5, atol=1e-5
        )


def test_lora_bias_without_a_base_bias_trains_but_cannot_merge():
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["0"], lora_bias=True, init_lora_weights=False)
    )
    x = torch.randn(3, 8)
    peft_model(x).sum().backward()
    bias = peft_model.base_model.model[0].lora_B["default"].bias
    torch.testing.assert_close(
        bias.grad, torch.full((8,), 3.0 * peft_model.base_model.model[0].scaling["default"])
    )
    with pytest.raises(RuntimeError, match="no bias"):
        peft_model.merge_and_unload()


@pytest.mark.parametrize("autocast", [True, False])
def test_add_adapter_and_load_adapter_autocast_like_peft(autocast, tmp_path):
    ours_config, theirs_config = lora()
    source = get_peft_model(mlp(dtype=torch.bfloat16), ours_config, autocast_adapter_dtype=False)
    randomize(source)
    source.save_pretrained(tmp_path)
    ours = get_peft_model(mlp(dtype=torch.bfloat16), ours_config)
    theirs = hf_peft.get_peft_model(mlp(dtype=torch.bfloat16), theirs_config)
    ours.add_adapter(
        "second", LoraConfig(r=2, target_modules=["lin0"]), autocast_adapter_dtype=autocast
    )
    theirs.add_adapter(
        "second", hf_peft.LoraConfig(r=2, target_modules=["lin0"]), autocast_adapter_dtype=autocast
    )
    ours.load_adapter(tmp_path, "third", autocast_adapter_dtype=autocast)
    theirs.load_adapter(tmp_path, "third", autocast_adapter_dtype=autocast)

    def dtypes(model):
        return {
            name.replace("lora_embedding_", "lora_"): p.dtype
            for name, p in model.named_parameters()
            if "lora_" in name
        }

    assert dtypes(ours) == dtypes(theirs)
    assert {d for n, d in dtypes(ours).items() if ".third." in n} == {
        torch.float32 if autocast else torch.bfloat16
    }
    ours.set_adapter("third")
    theirs.set_adapter("third")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()).float(), theirs(ids()).float(), rtol=2e-2, atol=2e-2)


def test_conv_and_attention_with_fp32_adapters_on_a_bf16_model():
    targets = ["c1", "c2", "p2", "attn"]
    model = conv_net().to(torch.bfloat16)
    ours = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    theirs = hf_peft.get_peft_model(
        conv_net().to(torch.bfloat16), hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    with torch.no_grad():
        for key, tensor in ours.state_dict().items():
            theirs.state_dict()[key].copy_(tensor)
    zero_out_proj_lora_b(ours)
    zero_out_proj_lora_b(theirs)
    inputs = tuple(t.to(torch.bfloat16) for t in conv_inputs())
    results = []
    for peft_model in (ours, theirs):
        result = peft_model(*inputs)
        assert result.dtype == torch.bfloat16
        result.float().square().sum().backward()
        results.append(result.detach().float())
    torch.testing.assert_close(
        results[0], results[1], rtol=0, atol=float(results[1].abs().max()) * 3e-2
    )
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name


def test_get_peft_model_refuses_what_cpeft_does_not_do():
    with pytest.raises(TypeError, match="mixed"):
        get_peft_model(mlp(), lora()[0], mixed=True)
    with pytest.raises(ValueError, match="low_cpu_mem_usage"):
        get_peft_model(mlp(), lora()[0], low_cpu_mem_usage="yes")


def test_core_boundary_keeps_one_dtype_on_the_cpu_and_in_merges():
    """float32 adapters beside 16-bit data exist on CUDA only; on the CPU (and in every merge)
    the adapters must share the weight's dtype, and the error names the argument."""
    import numpy as np

    from cpeft import functional

    x = np.ones((3, 4))
    weight = np.ones((5, 4))
    lora_a, lora_b = np.ones((2, 4), np.float32), np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match="lora_a must have the same dtype as weight"):
        functional.lora_linear_forward(x, weight, None, lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match="lora_b must have the same dtype as lora_a"):
        functional.lora_linear_forward(x, weight, None, lora_a.astype(np.float64), lora_b, 1.0)
    with pytest.raises(ValueError, match="lora_a must have the same dtype as weight"):
        functional.lora_merge(weight.copy(), lora_a, lora_b, 1.0)
    y, xa = functional.lora_linear_forward(
        x, weight, None, lora_a.astype(np.float64), lora_b.astype(np.float64), 1.0
    )
    grads = functional.lora_linear_backward(
        np.ones((3, 5)), x, weight, lora_a.astype(np.float64), lora_b.astype(np.float64), xa, 1.0
    )
    assert grads.lora_a.dtype == grads.lora_b.dtype == np.float64
    np.testing.assert_allclose(y, x @ weight.T + (x @ np.ones((4, 2))) @ np.ones((2, 5)))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("adapters", [1, 2])
def test_mha_core_path_equals_torch_attention_with_the_deltas(batch_first, adapters):
    """Unmasked self-attention without weights runs both projections on the core; it must equal
    torch's own attention on W + s·B·A (forward and every gradient), batched or not."""
    torch.manual_seed(0)
    base = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    reference = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    reference.load_state_dict(base.state_dict())
    holder = nn.Module()
    holder.attn = base
    peft_model = get_peft_model(
        holder, LoraConfig(r=4, lora_alpha=8, target_modules=["attn"], init_lora_weights=False)
    )
    if adapters == 2:
        peft_model.add_adapter(
            "other", LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False)
        )
        peft_model.base_model.set_adapter(["default", "other"])
    layer = peft_model.base_model.model.attn
    names = layer.active_adapters
    x = torch.randn(3, 5, 8, requires_grad=True)
    out = layer(x, x, x, need_weights=False)[0]
    delta_in = sum(
        (layer.lora_B[a].weight @ layer.lora_A[a].weight) * layer.scaling[a] for a in names
    )
    out_layer = layer.base_layer.out_proj
    delta_out = sum(
        (out_layer.lora_B[a].weight @ out_layer.lora_A[a].weight) * out_layer.scaling[a]
        for a in names
    )
    x_ref = x.detach().clone().requires_grad_(True)
    reference.in_proj_weight.data += delta_in.detach()
    reference.out_proj.weight.data += delta_out.detach()
    expected = reference(x_ref, x_ref, x_ref, need_weights=False)[0]
    torch.testing.assert_close(out, expected, **TOL)
    # The general path (need_weights=True) agrees too, and so do the gradients of both paths.
    general = layer(x, x, x, need_weights=True)[0]
    torch.testing.assert_close(general, expected, **TOL)
    grads = torch.autograd.grad(
        out.square().sum(), [x] + [p for p in layer.parameters() if p.requires_grad]
    )
    general_grads = torch.autograd.grad(
        general.square().sum(), [x] + [p for p in layer.parameters() if p.requires_grad]
    )
    for ours_grad, their_grad in zip(grads, general_grads):
        torch.testing.assert_close(
            ours_grad, their_grad, rtol=1e-4, atol=1e-5 * float(their_grad.abs().max())
        )
    expected.square().sum().backward()
    torch.testing.assert_close(
        grads[0], x_ref.grad, rtol=1e-4, atol=1e-5 * float(x_ref.grad.abs().max())
    )
    unbatched = layer(
        x[0] if batch_first else x[:, 0],
        x[0] if batch_first else x[:, 0],
        x[0] if batch_first else x[:, 0],
        need_weights=False,
    )[0]
    torch.testing.assert_close(unbatched, out[0] if batch_first else out[:, 0], **TOL)


def test_safe_merge_in_merge_adapter_and_on_a_layer(tmp_path):
    ours = get_peft_model(mlp(), lora()[0])
    randomize(ours)
    before = {k: v.clone() for k, v in get_base_model_state_dict(ours).items()}
    layer = ours.base_model.model.lin1
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected.*default"):
        ours.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert not any(m.merged for m in ours.modules() if isinstance(m, cpeft.BaseTunerLayer))
    assert all(torch.equal(before[k], v) for k, v in get_base_model_state_dict(ours).items())
    # load_adapter takes the same loading options as from_pretrained.
    source = get_peft_model(mlp(), lora()[0])
    randomize(source, seed=9)
    source.save_pretrained(tmp_path, safe_serialization=False)
    ours.load_adapter(
        tmp_path, "loaded", torch_device="cpu", device_map={"": "cpu"}, low_cpu_mem_usage=True
    )
    ours.set_adapter("loaded")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), source(ids()), **TOL)
    with pytest.raises(ValueError, match="device_map"):
        ours.load_adapter(tmp_path, "again", device_map={"lin0": "cpu", "lin1": "cpu"})
    assert "again" not in ours.peft_config


def resnet(seed=0):
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
    )
    return transformers.ResNetForImageClassification(config).eval()


def test_transformers_resnet_with_conv_lora_trains_and_crosses_to_peft(tmp_path):
    """A peft-style program on a small transformers ResNet: LoRA on every convolution (7x7 stride 2
    stem, 3x3 blocks, 1x1 strided shortcut), the classifier trained as modules_to_save."""
    config = dict(r=4, lora_alpha=8, target_modules=["convolution"], modules_to_save=["classifier"])
    ours = get_peft_model(resnet(), LoraConfig(**config))
    theirs = hf_peft.get_peft_model(resnet(), hf_peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 1])
    # Trained in eval mode: BatchNorm's running statistics are base-model state that no adapter
    # file carries, so they must not move for the reloaded model to match.
    ours.eval()
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    with torch.no_grad():
        start = ours(images, labels=labels).loss.item()
    for _ in range(5):
        loss = ours(images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ours.eval()
    with torch.no_grad():
        assert ours(images, labels=labels).loss.item() < start
        expected = ours(images).logits
    ours.save_pretrained(tmp_path)
    with torch.no_grad():
        loaded = hf_peft.PeftModel.from_pretrained(resnet(), tmp_path).eval()
        torch.testing.assert_close(loaded(images).logits, expected, rtol=1e-4, atol=1e-5)
        merged = ours.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, cpeft.BaseTunerLayer) for m in merged.modules())
        torch.testing.assert_close(merged(images).logits, expected, rtol=1e-4, atol=1e-5)


def test_conv_lora_takes_unbatched_inputs_like_torch():
    ours = get_peft_model(
        conv_net(), LoraConfig(r=4, target_modules=CONV_TARGETS, init_lora_weights=False)
    )
    x1, x2, x3, _ = conv_inputs()
    model = ours.base_model.model
    with torch.no_grad():
        for layer, x in (
            (model.c1, x1),
            (model.p1, model.c1(x1)),
            (model.c2, x2),
            (model.p2, model.c2(x2)),
            (model.g3, x3),
        ):
            torch.testing.assert_close(layer(x[0]), layer(x)[0], **TOL)
