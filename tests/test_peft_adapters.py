"""Several adapters per model with peft's API and files, the adapter-layer protocol, per-layer
configuration (rank_pattern, alpha_pattern, layers_to_transform, exclude_modules), checked
against the real Hugging Face peft 0.21 on small models built from configs (no download)."""

import json
import os
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import cpeft  # noqa: E402
from cpeft import (  # noqa: E402
    BaseTunerLayer,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


def gpt2(seed=0, layers=2):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=layers,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def bert(seed=0, layers=2):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def tokens(seed=1, batch=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (batch, 9), generator=generator)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def randomize(model, seed=5):
    """Non-trivial values for every adapter tensor (same seed, same values in both libraries:
    parameters are visited in name order)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name or "ia3_l" in name or "modules_to_save" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(1.0 + 0.3 * noise if "ia3_l" in name else 0.2 * noise)


ADAPTERS = {
    "default": (
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]),
        hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]),
    ),
    "wide": (
        LoraConfig(r=8, lora_alpha=4, target_modules=["c_attn", "c_fc", "wte"]),
        hf_peft.LoraConfig(r=8, lora_alpha=4, target_modules=["c_attn", "c_fc", "wte"]),
    ),
    "small": (
        LoraConfig(r=2, lora_alpha=2, use_rslora=True, target_modules=["mlp.c_proj"]),
        hf_peft.LoraConfig(r=2, lora_alpha=2, use_rslora=True, target_modules=["mlp.c_proj"]),
    ),
}


def build(library):
    model = gpt2()
    index = 0 if library == "cpeft" else 1
    make = get_peft_model if library == "cpeft" else hf_peft.get_peft_model
    peft_model = make(model, ADAPTERS["default"][index])
    for name in ("wide", "small"):
        peft_model.add_adapter(name, ADAPTERS[name][index])
    randomize(peft_model)
    return peft_model.eval()


def test_several_adapters_match_peft_per_active_adapter_and_requires_grad():
    ours, theirs = build("cpeft"), build("peft")
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())  # peft's in-model key layout
    ids = tokens()
    outputs = set()
    for name in ("default", "wide", "small"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert ours.active_adapter == theirs.active_adapter == name
        assert ours.active_adapters == theirs.active_adapters == [name]
        expected = logits(theirs, ids)
        torch.testing.assert_close(logits(ours, ids), expected, **TOL)
        outputs.add(round(float(expected.sum()), 3))
        ours_grad = {n for n, p in ours.named_parameters() if p.requires_grad}
        theirs_grad = {n for n, p in theirs.named_parameters() if p.requires_grad}
        assert ours_grad == theirs_grad and ours_grad
    assert len(outputs) == 3  # each adapter changes the model differently
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_several_active_adapters_are_summed_as_in_peft():
    ours, theirs = build("cpeft"), build("peft")
    ours.base_model.set_adapter(["default", "wide"])
    theirs.base_model.set_adapter(["default", "wide"])
    torch.testing.assert_close(logits(ours, tokens()), logits(theirs, tokens()), **TOL)


def test_save_layout_and_files_cross_both_ways(tmp_path):
    ours, theirs = build("cpeft"), build("peft")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for name in ("default", "wide", "small"):
        sub = "" if name == "default" else name
        ours_tensors = safetensors_torch.load_file(
            tmp_path / "ours" / sub / "adapter_model.safetensors"
        )
        theirs_tensors = safetensors_torch.load_file(
            tmp_path / "theirs" / sub / "adapter_model.safetensors"
        )
        assert sorted(ours_tensors) == sorted(theirs_tensors), name
        for key, tensor in theirs_tensors.items():
            torch.testing.assert_close(ours_tensors[key], tensor, rtol=0, atol=0)
        ours_json = json.loads((tmp_path / "ours" / sub / "adapter_config.json").read_text())
        assert ours_json["r"] == ADAPTERS[name][1].r
    assert (tmp_path / "ours" / "README.md").read_text().startswith("---\n")
    assert "library_name: peft" in (tmp_path / "ours" / "README.md").read_text()

    ids = tokens()
    for writer in ("ours", "theirs"):
        directory = tmp_path / writer
        for loader in ("cpeft", "peft"):
            cls = PeftModel if loader == "cpeft" else hf_peft.PeftModel
            loaded = cls.from_pretrained(gpt2(), directory)
            loaded.load_adapter(directory / "wide", adapter_name="wide")
            loaded.load_adapter(directory / "small", adapter_name="small")
            for name in ("default", "wide", "small"):
                loaded.set_adapter(name)
                theirs.set_adapter(name)
                torch.testing.assert_close(
                    logits(loaded.eval(), ids),
                    logits(theirs, ids),
                    **TOL,
                    msg=f"{writer} -> {loader}, adapter {name}",
                )


def test_selected_adapters_and_from_pretrained_adapter_name(tmp_path):
    ours = build("cpeft")
    ours.save_pretrained(tmp_path, selected_adapters=["wide"])
    assert sorted(os.listdir(tmp_path)) == ["README.md", "wide"]
    with pytest.raises(ValueError, match="nope"):
        ours.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    loaded = PeftModel.from_pretrained(gpt2(), tmp_path / "wide", adapter_name="wide")
    assert loaded.active_adapter == "wide" and list(loaded.peft_config) == ["wide"]
    ours.set_adapter("wide")
    torch.testing.assert_close(logits(loaded, tokens()), logits(ours, tokens()), **TOL)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(
        gpt2(), tmp_path / "wide", adapter_name="wide", is_trainable=True
    )
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_lora_and_ia3_adapters_in_one_model_with_mismatched_types_refused():
    model = get_peft_model(gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    model.add_adapter(
        "scale",
        IA3Config(target_modules=["c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    )
    randomize(model)
    ids = tokens()
    lora_out = logits(model, ids)
    model.set_adapter("scale")
    ia3_out = logits(model, ids)
    # The same IA3 adapter alone in peft gives the same output.
    reference = hf_peft.get_peft_model(
        gpt2(),
        hf_peft.IA3Config(
            target_modules=["c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]
        ),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".ia3_l.scale" in name:
                reference.get_parameter(name.replace(".scale", ".default")).copy_(parameter)
    torch.testing.assert_close(ia3_out, logits(reference, ids), **TOL)
    assert not torch.allclose(lora_out, ia3_out, **TOL)
    before = sorted(model.state_dict())
    with pytest.raises(ValueError, match="another adapter type"):
        model.add_adapter("clash", IA3Config(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("scale", LoraConfig(target_modules=["c_fc"]))
    with pytest.raises(ValueError, match="adapter_name"):
        model.set_adapter("missing")
    assert sorted(model.state_dict()) == before


def test_merge_unmerge_exact_and_delete_adapter():
    model = build("cpeft")
    ids = tokens()
    weights = {n: t.clone() for n, t in model.state_dict().items() if "base_layer" in n}
    # "wide" targets wte, tied to lm_head: merging it would change lm_head as well (as in peft).
    model.base_model.set_adapter(["small", "default"])
    adapted = logits(model, ids)
    model.merge_adapter(["small"])
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    projection = model.base_model.model.transformer.h[0].mlp.c_proj
    assert projection.merged and projection.merged_adapters == ["small"] and not layer.merged
    model.merge_adapter(["default"])
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(logits(model, ids), adapted, **TOL)
    model.merge_adapter(["wide"])
    assert layer.merged_adapters == ["default", "wide"]
    with model.disable_adapter():  # unmerges first, as in peft
        torch.testing.assert_close(logits(model, ids), logits(gpt2(), ids), rtol=0, atol=0)
    model.unmerge_adapter()
    assert not layer.merged
    for name, tensor in weights.items():
        assert torch.equal(model.state_dict()[name], tensor), name

    model.delete_adapter("wide")
    assert sorted(model.peft_config) == ["default", "small"]
    assert "wide" not in layer.lora_A
    # c_fc held only "wide": it is a plain Conv1D again.
    assert type(model.base_model.model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    assert model.active_adapter == "default"
    with pytest.raises(ValueError, match="adapter_name"):
        model.delete_adapter("wide")


def test_adapter_layer_protocol_matches_peft():
    ours, theirs = build("cpeft"), build("peft")
    from peft.tuners.tuners_utils import BaseTunerLayer as HFBaseTunerLayer

    ours_layers = {n: m for n, m in ours.named_modules() if isinstance(m, BaseTunerLayer)}
    theirs_layers = {n: m for n, m in theirs.named_modules() if isinstance(m, HFBaseTunerLayer)}
    assert sorted(ours_layers) == sorted(theirs_layers)
    for name, layer in ours_layers.items():
        reference = theirs_layers[name]
        assert type(layer.get_base_layer()) is type(reference.get_base_layer())
        assert layer.base_layer is layer.get_base_layer()
        assert layer.active_adapters == reference.active_adapters
        assert layer.active_adapter == reference.active_adapter
        assert layer.merged == reference.merged is False
        assert layer.merged_adapters == reference.merged_adapters == []
        assert layer.disable_adapters == reference.disable_adapters is False
        assert (layer.in_features, layer.out_features) == (
            reference.in_features,
            reference.out_features,
        )
        assert layer.weight is layer.get_base_layer().weight
        assert sorted(layer.r) == sorted(reference.r) and layer.r == reference.r
        assert layer.scaling == pytest.approx(reference.scaling)
    layer = ours_layers["base_model.model.transformer.h.0.attn.c_attn"]
    reference = theirs_layers["base_model.model.transformer.h.0.attn.c_attn"]
    x = torch.randn(2, 5, 32)
    layer.merge()
    reference.merge()
    assert layer.merged_adapters == reference.merged_adapters == ["default"]
    torch.testing.assert_close(
        layer.get_base_layer().weight, reference.get_base_layer().weight, **TOL
    )
    torch.testing.assert_close(layer(x), reference(x), **TOL)
    layer.unmerge()
    reference.unmerge()
    assert not layer.merged and not reference.merged


def test_state_dict_functions_and_config_files(tmp_path):
    ours = build("cpeft")
    theirs = build("peft")
    for name in ("default", "wide"):
        mine = get_peft_model_state_dict(ours, adapter_name=name)
        reference = hf_peft.get_peft_model_state_dict(theirs, adapter_name=name)
        assert sorted(mine) == sorted(reference)
        for key in mine:
            torch.testing.assert_close(mine[key], reference[key], rtol=0, atol=0)
    fresh = get_peft_model(
        gpt2(), LoraConfig(r=8, lora_alpha=4, target_modules=["c_attn", "c_fc", "wte"])
    )
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(ours, adapter_name="wide"))
    ours.set_adapter("wide")
    torch.testing.assert_close(logits(fresh, tokens()), logits(ours, tokens()), **TOL)
    bad = dict(get_peft_model_state_dict(ours, adapter_name="wide"))
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        set_peft_model_state_dict(fresh, bad)

    config = LoraConfig(r=6, lora_alpha=3, target_modules=["q"], task_type=TaskType.CAUSAL_LM)
    assert config.task_type == "CAUSAL_LM" and config.task_type == TaskType.CAUSAL_LM
    config.save_pretrained(tmp_path / "cfg")
    assert hf_peft.LoraConfig.from_pretrained(tmp_path / "cfg").r == 6
    again = PeftConfig.from_pretrained(tmp_path / "cfg")
    assert isinstance(again, LoraConfig) and again.r == 6 and again.task_type == "CAUSAL_LM"
    assert LoraConfig.from_pretrained(tmp_path / "cfg", r=3).r == 3
    with pytest.raises(ValueError, match="not a IA3Config"):
        IA3Config.from_pretrained(tmp_path / "cfg")
    hf_peft.IA3Config(target_modules=["k"]).save_pretrained(tmp_path / "ia3")
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "ia3"), IA3Config)


def test_task_classes_and_base_model_name_or_path(tmp_path):
    model = gpt2()
    model.name_or_path = "org/tiny-gpt2"
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")
    )
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    assert isinstance(peft_model, cpeft.PeftModelForCausalLM) and isinstance(peft_model, PeftModel)
    assert peft_model.peft_config["default"].base_model_name_or_path == "org/tiny-gpt2"
    peft_model.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "org/tiny-gpt2"
    )
    assert "base_model: org/tiny-gpt2" in (tmp_path / "README.md").read_text()
    reloaded = PeftModel.from_pretrained(gpt2(), tmp_path)
    assert type(reloaded).__name__ == "PeftModelForCausalLM"
    classifier = get_peft_model(
        bert(), LoraConfig(r=2, target_modules=["query"], task_type=TaskType.SEQ_CLS)
    )
    assert isinstance(classifier, cpeft.PeftModelForSequenceClassification)


def test_auto_peft_model_loads_base_from_base_model_name_or_path(tmp_path):
    base_dir = tmp_path / "base"
    gpt2().save_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")
    )
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(base_dir)
    loaded = cpeft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, cpeft.PeftModelForCausalLM)
    torch.testing.assert_close(logits(loaded, tokens()), logits(peft_model.eval(), tokens()), **TOL)
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        cpeft.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="PeftModelForCausalLM"):
        cpeft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    theirs = hf_peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(theirs, tokens()), logits(loaded, tokens()), **TOL)


def test_auto_peft_model_without_task_type_uses_auto_mapping(tmp_path):
    gpt2().save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        LoraConfig(r=2, target_modules=["c_attn"]),
    )
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    mapping = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping["base_model_class"] == "GPT2LMHeadModel"
    for auto in (cpeft.AutoPeftModel, hf_peft.AutoPeftModel):
        loaded = auto.from_pretrained(tmp_path / "adapter")
        assert type(loaded.get_base_model()).__name__ == "GPT2LMHeadModel"
        torch.testing.assert_close(
            logits(loaded, tokens()), logits(peft_model.eval(), tokens()), **TOL
        )


# ------------------------------------------------------------------------ per-layer configuration

PER_LAYER = {
    "rank-alpha-patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc", "mlp.c_proj"],
        rank_pattern={"h.0.attn.c_attn": 8, "c_fc": 2},
        alpha_pattern={r"h\.1\.attn\.c_attn": 32, "mlp.c_proj": 3},
    ),
    "layers-to-transform": dict(
        r=4, target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h"
    ),
    "layers-to-transform-no-pattern": dict(r=4, target_modules=["c_attn"], layers_to_transform=0),
    "exclude-list": dict(
        r=4, target_modules=["c_attn", "c_fc", "c_proj"], exclude_modules=["mlp.c_proj"]
    ),
    "exclude-regex": dict(
        r=4, target_modules=["c_attn", "c_proj"], exclude_modules=r".*\.h\.0\..*"
    ),
}


@pytest.mark.parametrize("case", sorted(PER_LAYER))
def test_per_layer_configuration_matches_peft_and_files_cross(case, tmp_path):
    kwargs = PER_LAYER[case]
    ours = get_peft_model(gpt2(layers=3), LoraConfig(**kwargs))
    theirs = hf_peft.get_peft_model(gpt2(layers=3), hf_peft.LoraConfig(**kwargs))
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if "lora_" in k}
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if "lora_" in k}
    assert our_shapes == their_shapes
    for name, layer in ours.named_modules():
        if isinstance(layer, BaseTunerLayer):
            reference = theirs.get_submodule(name)
            assert layer.r == reference.r and layer.scaling == pytest.approx(reference.scaling), (
                name
            )
    randomize(ours)
    randomize(theirs)
    ids = tokens()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in (
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "exclude_modules",
    ):
        if key in kwargs:
            assert (
                saved[key]
                == json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())[key]
            ), key
    from_theirs = PeftModel.from_pretrained(gpt2(layers=3), tmp_path / "theirs")
    torch.testing.assert_close(logits(from_theirs, ids), logits(theirs.eval(), ids), **TOL)
    from_ours = hf_peft.PeftModel.from_pretrained(gpt2(layers=3), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(from_ours, ids), logits(ours.eval(), ids), **TOL)


def test_bert_layers_pattern_selects_the_same_layers_as_peft():
    kwargs = dict(
        r=2, target_modules=["query", "value"], layers_to_transform=[0, 2], layers_pattern="layer"
    )
    ours = get_peft_model(bert(layers=3), LoraConfig(**kwargs))
    theirs = hf_peft.get_peft_model(bert(layers=3), hf_peft.LoraConfig(**kwargs))
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, BaseTunerLayer)) == sorted(
        n
        for n, m in theirs.named_modules()
        if type(m).__name__ == "Linear" and hasattr(m, "lora_A")
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(target_modules=["c_attn"], rank_pattern={"c_fc": 4}),
            "rank_pattern: the key 'c_fc' matches no",
        ),
        (
            dict(target_modules=["c_attn"], alpha_pattern={r"h\.9\.attn\.c_attn": 4}),
            "alpha_pattern",
        ),
        (
            dict(target_modules=["c_attn"], exclude_modules=["c_attn"]),
            "excluded by exclude_modules",
        ),
        (
            dict(target_modules=["c_attn"], layers_to_transform=[7], layers_pattern="h"),
            "matched no module",
        ),
    ],
)
def test_per_layer_configuration_errors_leave_the_model_untouched(kwargs, message):
    model = gpt2()
    before = sorted(model.state_dict())
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, LoraConfig(r=2, **kwargs))
    assert sorted(model.state_dict()) == before


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"rank_pattern": {"x": 0}}, "rank_pattern"),
        ({"rank_pattern": {"(": 2}}, "rank_pattern"),
        ({"rank_pattern": ["x"]}, "rank_pattern"),
        ({"alpha_pattern": {"x": float("inf")}}, "alpha_pattern"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"layers_to_transform": "1"}, "layers_to_transform"),
        ({"layers_pattern": "h"}, "layers_pattern"),
        ({"exclude_modules": [3]}, "exclude_modules"),
        ({"target_modules": r".*c_attn", "layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_per_layer_config_fields_are_validated(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        LoraConfig(**kwargs)


def test_forward_signature_is_the_wrapped_models_and_the_model_pickles(tmp_path):
    import inspect
    import io

    model = get_peft_model(
        gpt2(), LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")
    )
    parameters = list(inspect.signature(model.forward).parameters)
    assert parameters[:3] == list(inspect.signature(model.get_base_model().forward).parameters)[:3]
    assert "input_ids" in parameters and "labels" in parameters
    # transformers recognises adapter models by isinstance(model, peft.PeftModel).
    assert isinstance(model, hf_peft.PeftModel) and isinstance(model, cpeft.PeftModelForCausalLM)
    randomize(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(model) and loaded.active_adapter == "default"
    torch.testing.assert_close(
        logits(loaded.eval(), tokens()), logits(model.eval(), tokens()), rtol=0, atol=0
    )
    # peft's own methods never show through: what cpeft lacks is looked up on the wrapped model.
    with pytest.raises(AttributeError):
        model.add_weighted_adapter  # noqa: B018 - the attribute lookup is what is tested


def test_classifier_heads_per_adapter_match_peft_in_files_and_mixed_batches(tmp_path):
    def make(library):
        lora = LoraConfig if library == "cpeft" else hf_peft.LoraConfig
        get = get_peft_model if library == "cpeft" else hf_peft.get_peft_model
        model = get(bert(), lora(r=2, target_modules=["query"], task_type="SEQ_CLS"))
        model.add_adapter(
            "other", lora(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
        )
        randomize(model)
        return model.eval()

    ours, theirs = make("cpeft"), make("peft")
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ids = tokens(batch=4)
    names = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, adapter_names=names).logits, theirs(ids, adapter_names=names).logits, **TOL
        )
    ours.set_adapter("other")
    theirs.set_adapter("other")
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    ours.save_pretrained(tmp_path)
    loaded = hf_peft.PeftModel.from_pretrained(bert(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded.eval(), ids), logits(ours, ids), **TOL)
