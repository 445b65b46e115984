"""cpeft's peft-style API checked against the real Hugging Face peft on small models built from
configs (no download): same target matching, same parameter counts, same adapter files, and
adapters that cross between the two libraries in both directions with equal outputs."""

import io
import json
import math
import os
import warnings
from contextlib import redirect_stdout

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from cpeft import BaseTunerLayer  # noqa: E402
from cpeft.peft import (  # noqa: E402
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    IA3Config,
    LoraConfig,
    PeftModel,
    get_peft_model,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def bert(seed=0, classifier=False, hidden=32):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    return cls(config).eval()


def tokens(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (3, 9), generator=generator)


def output(model, ids):
    with torch.no_grad():
        result = model(ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def randomize_adapters(model, seed=5):
    """Non-trivial adapter values, so that a lost or misplaced tensor changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "ia3_l" in name or "modules_to_save" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(1.0 + 0.3 * noise if "ia3_l" in name else 0.2 * noise)


def to_peft_config(config):
    if isinstance(config, LoraConfig):
        return hf_peft.LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=config.target_modules,
            bias=config.bias,
            use_rslora=config.use_rslora,
            modules_to_save=config.modules_to_save,
            task_type=config.task_type,
        )
    return hf_peft.IA3Config(
        target_modules=config.target_modules,
        feedforward_modules=config.feedforward_modules,
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
    )


CASES = {
    "gpt2-lora-conv1d-embedding": (
        gpt2,
        LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "mlp.c_proj", "wte"]),
    ),
    "gpt2-lora-regex-rslora-bias": (
        gpt2,
        LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            bias="lora_only",
            target_modules=r".*\.h\.1\.(attn\.c_attn|mlp\.c_fc)",
        ),
    ),
    "bert-lora-bias-all": (
        bert,
        LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], bias="all"),
    ),
    "bert-seqcls-lora": (
        lambda: bert(classifier=True),
        LoraConfig(r=4, target_modules=["query", "key"], task_type="SEQ_CLS"),
    ),
    "gpt2-ia3": (
        gpt2,
        IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    ),
    "bert-ia3": (
        bert,
        IA3Config(
            target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        ),
    ),
}


def replaced_paths(model):
    return sorted(
        name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)
    )


def peft_replaced_paths(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted(
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_targets_counts_and_file_layout_as_peft(case, tmp_path):
    make, config = CASES[case]
    ours = get_peft_model(make(), config)
    theirs = hf_peft.get_peft_model(make(), to_peft_config(config))
    assert replaced_paths(ours.get_base_model()) == [
        p.removeprefix("base_model.model.") for p in peft_replaced_paths(theirs)
    ]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    printed = []
    for model in (ours, theirs):
        with redirect_stdout(io.StringIO()) as buffer:
            model.print_trainable_parameters()
        printed.append(buffer.getvalue())
    assert printed[0] == printed[1]
    assert printed[0].startswith("trainable params: ")

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    our_tensors = safetensors_torch.load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME)
    their_tensors = safetensors_torch.load_file(tmp_path / "theirs" / ADAPTER_WEIGHTS_NAME)
    assert {k: tuple(v.shape) for k, v in our_tensors.items()} == {
        k: tuple(v.shape) for k, v in their_tensors.items()
    }
    our_json = json.loads((tmp_path / "ours" / ADAPTER_CONFIG_NAME).read_text())
    their_json = json.loads((tmp_path / "theirs" / ADAPTER_CONFIG_NAME).read_text())
    assert set(our_json) - {"auto_mapping"} == set(their_json) - {"auto_mapping"}
    for key in (
        "peft_type",
        "bias",
        "fan_in_fan_out",
        "task_type",
        "inference_mode",
        "r",
        "lora_alpha",
        "use_rslora",
        "init_ia3_weights",
    ):
        assert our_json.get(key) == their_json.get(key), key
    assert (
        sorted(our_json["target_modules"]) == sorted(their_json["target_modules"])
        if isinstance(their_json["target_modules"], list)
        else our_json["target_modules"] == their_json["target_modules"]
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_written_by_peft_loads_in_cpeft_with_equal_outputs(case, tmp_path):
    make, config = CASES[case]
    ids = tokens()
    base_out = output(make(), ids)
    theirs = hf_peft.get_peft_model(make(), to_peft_config(config))
    randomize_adapters(theirs)
    theirs.eval()
    expected = output(theirs, ids)
    assert not torch.allclose(expected, base_out, **TOL)  # the adapter matters
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(output(ours, ids), expected, **TOL)
    assert ours.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as peft does


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_written_by_cpeft_loads_in_peft_with_equal_outputs(case, tmp_path):
    make, config = CASES[case]
    ids = tokens()
    ours = get_peft_model(make(), config)
    randomize_adapters(ours)
    ours.eval()
    expected = output(ours, ids)
    assert not torch.allclose(expected, output(make(), ids), **TOL)
    ours.save_pretrained(tmp_path)

    theirs = hf_peft.PeftModel.from_pretrained(make(), tmp_path)
    theirs.eval()
    torch.testing.assert_close(output(theirs, ids), expected, **TOL)


def test_pretrained_weights_kept_and_only_adapters_train():
    model = gpt2()
    ids = tokens()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    base_out = output(model, ids)
    wte = model.transformer.wte.weight
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc", "wte"]))
    # LoRA starts as the identity (B = 0 for linear, A = 0 for embeddings) on the kept weights.
    torch.testing.assert_close(output(peft_model, ids), base_out, rtol=0, atol=1e-6)
    assert model.transformer.wte.weight is wte and model.lm_head.weight is wte  # still tied

    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = peft_model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = output(peft_model.eval(), ids)
    assert not torch.allclose(trained, base_out, atol=1e-4)
    assert all("lora_" in name for name, p in peft_model.named_parameters() if p.requires_grad)
    # As in peft, a targeted module's own tensors now sit under <path>.base_layer.
    after = {name.replace(".base_layer", ""): tensor for name, tensor in model.state_dict().items()}
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_disable_adapter_merge_and_unload_and_unload():
    ids = tokens()
    base_out = output(gpt2(), ids)
    peft_model = get_peft_model(
        gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    )
    randomize_adapters(peft_model)
    adapted = output(peft_model, ids)
    with peft_model.disable_adapter():
        torch.testing.assert_close(output(peft_model, ids), base_out, rtol=0, atol=0)
    torch.testing.assert_close(output(peft_model, ids), adapted, rtol=0, atol=0)

    merged = peft_model.merge_and_unload()
    assert not replaced_paths(merged)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(output(merged, ids), adapted, **TOL)

    other = get_peft_model(gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    randomize_adapters(other)
    plain = other.unload()
    assert not replaced_paths(plain)
    torch.testing.assert_close(output(plain, ids), base_out, rtol=0, atol=0)


def test_ia3_merge_and_unload_matches_peft():
    ids = tokens()
    config = CASES["bert-ia3"][1]
    ours = get_peft_model(bert(), config)
    theirs = hf_peft.get_peft_model(bert(), to_peft_config(config))
    randomize_adapters(ours)
    randomize_adapters(theirs)
    torch.testing.assert_close(
        output(ours.merge_and_unload(), ids), output(theirs.merge_and_unload(), ids), **TOL
    )


def test_modules_to_save_trains_a_copy_and_disable_uses_the_original():
    ids = tokens()
    model = bert(classifier=True)
    original_weight = model.classifier.weight.detach().clone()
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    )
    copy_weight = peft_model.base_model.model.classifier.modules_to_save["default"].weight
    assert copy_weight.requires_grad
    assert not peft_model.base_model.model.classifier.original_module.weight.requires_grad
    with torch.no_grad():
        copy_weight.add_(1.0)
    changed = output(peft_model, ids)
    with peft_model.disable_adapter():
        torch.testing.assert_close(
            output(peft_model, ids), output(bert(classifier=True), ids), rtol=0, atol=0
        )
    assert torch.equal(
        peft_model.base_model.model.classifier.original_module.weight, original_weight
    )
    torch.testing.assert_close(output(peft_model.merge_and_unload(), ids), changed, rtol=0, atol=0)


def test_init_lora_weights_variants_follow_peft():
    for init in (True, "gaussian"):
        peft_model = get_peft_model(
            bert(hidden=64), LoraConfig(r=16, target_modules=["query"], init_lora_weights=init)
        )
        layer = peft_model.base_model.model.encoder.layer[0].attention.self.query
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.count_nonzero(lora_b) == 0
        if init == "gaussian":
            assert abs(lora_a.std().item() - 1 / 16) < 0.2 / 16
        else:
            bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
            assert lora_a.abs().max().item() <= bound
            assert lora_a.std().item() > bound / 3
    peft_model = get_peft_model(
        bert(), LoraConfig(r=4, target_modules=["query"], init_lora_weights=False)
    )
    lora_b = (
        peft_model.base_model.model.encoder.layer[0].attention.self.query.lora_B["default"].weight
    )
    assert torch.count_nonzero(lora_b) == lora_b.numel()
    rslora = get_peft_model(
        bert(), LoraConfig(r=16, lora_alpha=8, target_modules=["query"], use_rslora=True)
    )
    assert rslora.base_model.model.encoder.layer[0].attention.self.query.scaling[
        "default"
    ] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": True}, "r"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"init_lora_weights": 1}, "init_lora_weights"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"target_modules": ["q", 3]}, "target_modules"),
        ({"target_modules": "(unclosed"}, "target_modules"),
        ({"task_type": "CLASSIFY"}, "task_type"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
        ({"modules_to_save": 5}, "modules_to_save"),
    ],
)
def test_lora_config_rejects_bad_values_naming_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        LoraConfig(**kwargs)


def test_ia3_config_validation_and_feedforward_subset_rule():
    with pytest.raises(ValueError, match="feedforward_modules"):
        IA3Config(target_modules=["key", "value"], feedforward_modules=["output.dense"])
    with pytest.raises(ValueError, match="feedforward_modules"):
        hf_peft.IA3Config(target_modules=["key", "value"], feedforward_modules=["output.dense"])
    with pytest.raises(ValueError, match="init_ia3_weights"):
        IA3Config(target_modules=["key"], init_ia3_weights="no")
    IA3Config(
        target_modules=r".*key", feedforward_modules=["output.dense"]
    )  # regex: no subset check


@pytest.mark.parametrize(
    "target_modules",
    [
        ["attention.self.query"],
        ["query"],
        ["0.attention.self.query"],
        ["uery"],
        r"encoder\.layer\.\d\.attention\.self\.(query|value)",
        r"query",
        ["dense"],
        "all-linear",
    ],
)
def test_target_matching_equals_peft(target_modules):
    def attempt(module_factory, get):
        try:
            return peft_paths_or_ours(get(module_factory(), target_modules))
        except ValueError as exc:
            return (
                "ValueError"
                if "not found" in str(exc) or "matched no module" in str(exc)
                else str(exc)
            )

    def peft_paths_or_ours(model):
        return [
            p.removeprefix("base_model.model.")
            for p in (
                peft_replaced_paths(model)
                if isinstance(model, hf_peft.PeftModel)
                else replaced_paths(model)
            )
        ]

    ours = attempt(
        bert, lambda m, t: get_peft_model(m, LoraConfig(r=2, target_modules=t)).get_base_model()
    )
    theirs = attempt(
        bert, lambda m, t: hf_peft.get_peft_model(m, hf_peft.LoraConfig(r=2, target_modules=t))
    )
    assert ours == theirs


def test_unsupported_target_and_already_adapted_model_are_refused_untouched():
    model = bert()
    with pytest.raises(ValueError, match="LayerNorm"):
        get_peft_model(model, LoraConfig(target_modules=["LayerNorm"]))
    assert not replaced_paths(model)
    get_peft_model(model, LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="already contains"):
        get_peft_model(model, LoraConfig(target_modules=["value"]))


# ------------------------------------------------------------------------------ bad adapter files


@pytest.fixture
def saved_lora(tmp_path):
    peft_model = get_peft_model(gpt2(), LoraConfig(r=4, target_modules=["c_attn", "wte"]))
    randomize_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    return tmp_path


def snapshot(model):
    return (
        [type(m).__name__ for m in model.modules()],
        {name: tensor.clone() for name, tensor in model.state_dict().items()},
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def assert_refused_untouched(model, directory, error, *patterns):
    before = snapshot(model)
    with pytest.raises(error) as info:
        PeftModel.from_pretrained(model, directory)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    after = snapshot(model)
    assert before[0] == after[0] and before[2] == after[2]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_missing_directory_and_files(saved_lora, tmp_path):
    assert_refused_untouched(gpt2(), tmp_path / "nowhere", FileNotFoundError, "nowhere")
    os.remove(saved_lora / ADAPTER_WEIGHTS_NAME)
    assert_refused_untouched(gpt2(), saved_lora, FileNotFoundError, ADAPTER_WEIGHTS_NAME)
    os.remove(saved_lora / ADAPTER_CONFIG_NAME)
    assert_refused_untouched(gpt2(), saved_lora, FileNotFoundError, ADAPTER_CONFIG_NAME)


def test_invalid_json_and_wrong_adapter_type(saved_lora):
    config_path = saved_lora / ADAPTER_CONFIG_NAME
    text = config_path.read_text()
    config_path.write_text(text[: len(text) // 2])
    assert_refused_untouched(gpt2(), saved_lora, ValueError, ADAPTER_CONFIG_NAME, "invalid JSON")
    data = json.loads(text)
    config_path.write_text(json.dumps(dict(data, peft_type="PREFIX_TUNING")))
    assert_refused_untouched(
        gpt2(), saved_lora, ValueError, ADAPTER_CONFIG_NAME, "peft_type", "PREFIX_TUNING"
    )
    config_path.write_text(json.dumps(dict(data, use_qalora=True)))
    assert_refused_untouched(gpt2(), saved_lora, ValueError, "use_qalora")
    config_path.write_text(json.dumps(dict(data, r=-1)))
    assert_refused_untouched(gpt2(), saved_lora, ValueError, ADAPTER_CONFIG_NAME, "r:")
    # An IA3 config next to LoRA tensors: every key mismatches.
    config_path.write_text(
        json.dumps({"peft_type": "IA3", "target_modules": ["c_attn"], "feedforward_modules": []})
    )
    assert_refused_untouched(gpt2(), saved_lora, ValueError, ADAPTER_WEIGHTS_NAME, "ia3_l")


def test_truncated_and_corrupt_safetensors(saved_lora):
    weights_path = saved_lora / ADAPTER_WEIGHTS_NAME
    data = weights_path.read_bytes()
    weights_path.write_bytes(data[: len(data) - 100])
    assert_refused_untouched(gpt2(), saved_lora, ValueError, ADAPTER_WEIGHTS_NAME)
    weights_path.write_bytes(b"\xff" * 64)
    assert_refused_untouched(gpt2(), saved_lora, ValueError, ADAPTER_WEIGHTS_NAME)
    weights_path.write_bytes(b"")
    assert_refused_untouched(gpt2(), saved_lora, ValueError, ADAPTER_WEIGHTS_NAME)


def test_keys_and_shapes_that_do_not_match_the_model(saved_lora):
    weights_path = saved_lora / ADAPTER_WEIGHTS_NAME
    tensors = safetensors_torch.load_file(weights_path)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"

    safetensors_torch.save_file({k: v for k, v in tensors.items() if k != key}, weights_path)
    assert_refused_untouched(gpt2(), saved_lora, ValueError, ADAPTER_WEIGHTS_NAME, key, "missing")

    safetensors_torch.save_file(
        dict(tensors, **{"base_model.model.transformer.extra.lora_A.weight": torch.zeros(4, 32)}),
        weights_path,
    )
    assert_refused_untouched(
        gpt2(), saved_lora, ValueError, "base_model.model.transformer.extra.lora_A.weight"
    )

    safetensors_torch.save_file(dict(tensors, **{key: torch.zeros(95, 4)}), weights_path)
    assert_refused_untouched(gpt2(), saved_lora, ValueError, key, "(96, 4)", "(95, 4)")

    safetensors_torch.save_file(tensors, weights_path)
    torch.manual_seed(0)
    wider = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=100, n_positions=64)
    )
    assert_refused_untouched(wider, saved_lora, ValueError, ADAPTER_WEIGHTS_NAME, "expected shape")
    assert isinstance(
        PeftModel.from_pretrained(gpt2(), saved_lora), PeftModel
    )  # the restored file loads
