"""cpeft's torch layers side by side with the real loralib 0.1.2.

Every comparison builds the loralib layer and the cpeft layer from the same torch seed (cpeft
draws its random initialization in loralib's order, so the parameters must come out equal),
gives the adapters the same nonzero values, and compares forward outputs, gradients, merged and
unmerged outputs, state-dict keys and requires_grad flags. The defects of loralib that cpeft
fixes on purpose (docs/loralib-differences.md) each have a test that shows loralib's behaviour
next to cpeft's.
"""

import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")
loralib = pytest.importorskip("loralib")
nn = torch.nn

import cpeft as lora  # noqa: E402

# Tolerances for comparing two implementations of the same float64/float32 math.
TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def build_pair(name, *args, **kwargs):
    torch.manual_seed(1234)
    reference = getattr(loralib, name)(*args, **kwargs)
    torch.manual_seed(1234)
    ours = getattr(lora, name)(*args, **kwargs)
    return reference, ours


def randomize_adapters(reference, ours):
    """Nonzero adapters (B starts at zero) copied from loralib into cpeft."""
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)
    ours.load_state_dict(reference.state_dict())


def assert_same_parameters(reference, ours):
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert list(ref_state) == list(our_state)
    for key in ref_state:
        assert ref_state[key].shape == our_state[key].shape, key
        assert torch.equal(ref_state[key], our_state[key]), key
    assert [(n, p.requires_grad) for n, p in reference.named_parameters()] == [
        (n, p.requires_grad) for n, p in ours.named_parameters()
    ]


def input_for(layer, dtype, leading=(3, 5)):
    generator = torch.Generator().manual_seed(7)
    if isinstance(layer, nn.Embedding):
        return torch.randint(0, layer.num_embeddings, leading, generator=generator)
    if isinstance(layer, loralib.ConvLoRA) or isinstance(layer, lora.ConvLoRA):
        conv = layer.conv
        spatial = (6,) * (conv.weight.dim() - 2)
        return torch.randn((2, conv.in_channels) + spatial, generator=generator, dtype=dtype)
    return torch.randn(leading + (layer.in_features,), generator=generator, dtype=dtype)


def forward_backward(layer, x):
    """Output and the gradients of a fixed random projection of it, for every tensor that
    requires grad (x included when it is a float)."""
    if x.is_floating_point():
        x = x.clone().requires_grad_(True)
    y = layer(x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    (y * probe).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    if x.is_floating_point():
        grads["input"] = x.grad.clone()
    layer.zero_grad(set_to_none=True)
    return y.detach(), grads


def assert_matches(reference, ours, x, dtype):
    ref_y, ref_grads = forward_backward(reference, x)
    our_y, our_grads = forward_backward(ours, x)
    torch.testing.assert_close(our_y, ref_y, **TOLERANCE[dtype])
    assert sorted(our_grads) == sorted(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(
            our_grads[name],
            ref_grads[name],
            **TOLERANCE[dtype],
            msg=lambda m, name=name: f"grad of {name}: {m}",
        )


LAYER_CASES = [
    ("Linear", (12, 10), dict(r=4, lora_alpha=8)),
    ("Linear", (12, 10), dict(r=4, lora_alpha=8, fan_in_fan_out=True)),
    ("Linear", (12, 10), dict(r=2, lora_alpha=1, bias=False)),
    ("Linear", (12, 10), dict(r=0)),
    ("MergedLinear", (12, 18), dict(r=2, lora_alpha=4, enable_lora=[True, False, True])),
    (
        "MergedLinear",
        (12, 18),
        dict(r=2, lora_alpha=4, enable_lora=[True, False, True], fan_in_fan_out=True),
    ),
    ("MergedLinear", (8, 8), dict(r=3, lora_alpha=6, enable_lora=[False, True])),
    ("Embedding", (20, 6), dict(r=3, lora_alpha=6)),
    ("Embedding", (20, 6), dict(r=3, lora_alpha=6, padding_idx=2)),
    ("Embedding", (20, 6), dict(r=0)),
    ("Conv2d", (4, 6, 3), dict(r=2, lora_alpha=4)),
    ("Conv2d", (4, 6, 3), dict(r=2, lora_alpha=4, groups=2, padding=1)),
    ("Conv1d", (4, 6, 1), dict(r=2, lora_alpha=4)),
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, _, kw in LAYER_CASES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,args,kwargs", LAYER_CASES, ids=CASE_IDS)
def test_layer_matches_loralib(name, args, kwargs, dtype):
    conv = name.startswith("Conv")
    kwargs = dict(kwargs, dtype=dtype)
    reference, ours = build_pair(name, *args, **kwargs)
    assert_same_parameters(reference, ours)
    randomize_adapters(reference, ours)
    bias_owner = (reference.conv, ours.conv) if conv else (reference, ours)
    for layer in bias_owner:
        if getattr(layer, "bias", None) is not None:
            layer.bias.requires_grad_(True)
    x = input_for(reference, dtype)

    assert_matches(reference, ours, x, dtype)

    weight_key = "conv.weight" if conv else "weight"
    original = ours.state_dict()[weight_key].clone()
    assert reference.eval() is None
    assert ours.eval() is ours
    assert ours.merged == reference.merged
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), **TOLERANCE[dtype])
    live_weight = dict(ours.named_parameters())[weight_key]
    ref_weight = dict(reference.named_parameters())[weight_key]
    torch.testing.assert_close(live_weight.detach(), ref_weight.detach(), **TOLERANCE[dtype])

    reference.train()
    ours.train()
    assert not ours.merged
    assert torch.equal(dict(ours.named_parameters())[weight_key].detach(), original), (
        "merge then unmerge must restore W bit for bit"
    )
    assert_matches(reference, ours, x, dtype)


def test_merged_linear_block_layout_matches_loralib():
    reference, ours = build_pair(
        "MergedLinear",
        5,
        12,
        r=2,
        lora_alpha=2,
        enable_lora=[False, True, True],
        fan_in_fan_out=True,
    )
    randomize_adapters(reference, ours)
    torch.testing.assert_close(ours.merge_AB(), reference.merge_AB(), rtol=1e-6, atol=1e-6)
    assert torch.equal(ours.lora_ind, reference.lora_ind)
    block = torch.randn(8, 3)
    assert torch.equal(ours.zero_pad(block), reference.zero_pad(block))


def test_embedding_padding_column_gets_no_gradient_like_loralib():
    reference, ours = build_pair("Embedding", 10, 4, r=2, padding_idx=0)
    randomize_adapters(reference, ours)
    x = torch.tensor([[0, 3, 0, 5]])
    _, ref_grads = forward_backward(reference, x)
    _, our_grads = forward_backward(ours, x)
    assert torch.count_nonzero(our_grads["lora_A"][:, 0]) == 0
    torch.testing.assert_close(our_grads["lora_A"], ref_grads["lora_A"])
    torch.testing.assert_close(our_grads["lora_B"], ref_grads["lora_B"])


def test_dropout_is_on_the_lora_branch_only_and_off_in_eval():
    reference, ours = build_pair(
        "Linear", 16, 8, r=4, lora_alpha=4, lora_dropout=0.5, merge_weights=False
    )
    randomize_adapters(reference, ours)
    assert isinstance(ours.lora_dropout, nn.Dropout) and ours.lora_dropout.p == 0.5
    x = torch.randn(6, 16)
    first, second = ours(x), ours(x)
    assert not torch.equal(first, second), "two train-mode calls must draw different masks"
    ours.eval()
    reference.eval()
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours(x), ours(x))


# --- utilities: requires_grad per bias mode and lora_state_dict key sets ----------------------


class Attention(nn.Module):
    def __init__(self, library):
        super().__init__()
        self.c_attn = library.MergedLinear(
            8, 24, r=2, lora_alpha=4, enable_lora=[True, False, True], fan_in_fan_out=True
        )
        self.register_buffer("bias", torch.tril(torch.ones(4, 4)))


class NestedModel(nn.Module):
    """Every layer kind, a LayerNorm, a plain Linear inside a 'lora_' named container, a
    parameter whose name contains 'bias' and a buffer named like a bias (GPT-2's causal mask
    is called attn.bias)."""

    def __init__(self, library, with_conv=True):
        super().__init__()
        self.wte = library.Embedding(30, 8, r=2, lora_alpha=4)
        self.attn = Attention(library)
        self.fc = library.Linear(8, 8, r=2, lora_alpha=4)
        self.fc_plain = library.Linear(8, 8, r=0)
        self.no_bias = library.Linear(8, 8, r=2, bias=False)
        self.norm = nn.LayerNorm(8)
        self.lora_layers = nn.ModuleList([nn.Linear(8, 8)])
        self.attn_bias_table = nn.Parameter(torch.zeros(3))
        if with_conv:
            self.conv = library.Conv2d(3, 4, 3, r=2, lora_alpha=2)


def nested_model(library, with_conv=True):
    torch.manual_seed(5)
    return NestedModel(library, with_conv)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_matches_loralib(bias):
    reference, ours = nested_model(loralib), nested_model(lora)
    loralib.mark_only_lora_as_trainable(reference, bias=bias)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    expected = [(n, p.requires_grad) for n, p in reference.named_parameters()]
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == expected
    assert any(flag for _, flag in expected) and not all(flag for _, flag in expected)


def test_mark_only_lora_as_trainable_never_unfreezes_adapters():
    model = nested_model(lora)
    model.fc.lora_A.requires_grad_(False)
    lora.mark_only_lora_as_trainable(model)
    assert not model.fc.lora_A.requires_grad
    assert model.fc.lora_B.requires_grad


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_state_dict_matches_loralib(bias):
    reference, ours = nested_model(loralib), nested_model(lora)
    ref_state = loralib.lora_state_dict(reference, bias=bias)
    our_state = lora.lora_state_dict(ours, bias=bias)
    assert list(our_state) == list(ref_state)
    if bias == "all":
        assert "attn.bias" in our_state, "buffers named like bias are kept, as in loralib"
    live = dict(ours.named_parameters())
    shared = [k for k in our_state if k in live]
    assert shared and all(our_state[k].data_ptr() == live[k].data_ptr() for k in shared), (
        "entries share storage with the live parameters, as in loralib"
    )


def test_full_state_dict_keys_match_loralib():
    assert list(nested_model(lora).state_dict()) == list(nested_model(loralib).state_dict())


def test_unknown_bias_mode_is_rejected_before_freezing():
    reference, ours = nested_model(loralib), nested_model(lora)
    with pytest.raises(NotImplementedError):
        loralib.mark_only_lora_as_trainable(reference, bias="some")
    assert not reference.norm.weight.requires_grad, "loralib freezes before it rejects (Q14)"
    with pytest.raises(NotImplementedError, match="'some'"):
        lora.mark_only_lora_as_trainable(ours, bias="some")
    assert all(
        p.requires_grad
        for n, p in ours.named_parameters()
        if n in ("norm.weight", "fc.bias", "fc.lora_A")
    )
    with pytest.raises(NotImplementedError, match="bias must be one of"):
        lora.lora_state_dict(ours, bias="everything")


def test_ia3_parameters_are_treated_like_lora_ones_by_the_utilities():
    model = nn.Sequential(
        lora.IA3Linear(6, 4),
        lora.IA3Linear(4, 6, is_feedforward=True),
        lora.IA3Embedding(9, 6),
        nn.Linear(6, 6),
    )
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.bias", "0.ia3_l", "1.bias", "1.ia3_l", "2.ia3_l"]
    assert sorted(lora.lora_state_dict(model, bias="lora_only")) == trainable
    assert sorted(lora.lora_state_dict(model)) == ["0.ia3_l", "1.ia3_l", "2.ia3_l"]


# --- the README flow of loralib, run with `import cpeft as lora` ------------------------------


def readme_flow(library, tmp_path, tag):
    """Replace layers, mark trainable, train, save lora_state_dict, reload into a fresh model
    (pretrained weights, then the LoRA checkpoint, both strict=False), evaluate."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = library.Embedding(16, 8, r=4, lora_alpha=8)
            self.qkv = library.MergedLinear(
                8, 24, r=4, lora_alpha=8, enable_lora=[True, False, True]
            )
            self.proj = library.Linear(24, 8, r=4, lora_alpha=8)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            return self.head(torch.tanh(self.proj(self.qkv(self.embed(tokens)))).mean(1))

    torch.manual_seed(0)
    model = Net().double()
    pretrained = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    library.mark_only_lora_as_trainable(model, bias="lora_only")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    data = torch.Generator().manual_seed(1)
    for _ in range(5):
        tokens = torch.randint(0, 16, (4, 5), generator=data)
        labels = torch.randint(0, 3, (4,), generator=data)
        loss = nn.functional.cross_entropy(model(tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path / f"{tag}_lora.pt"
    torch.save(library.lora_state_dict(model, bias="lora_only"), path)

    torch.manual_seed(42)
    fresh = Net().double()
    fresh.load_state_dict(pretrained, strict=False)
    fresh.load_state_dict(torch.load(path), strict=False)
    fresh.eval()
    tokens = torch.randint(0, 16, (4, 5), generator=data)
    with torch.no_grad():
        return model.eval()(tokens), fresh(tokens), loss.item()


def test_readme_flow_matches_loralib(tmp_path):
    ref_trained, ref_reloaded, ref_loss = readme_flow(loralib, tmp_path, "loralib")
    our_trained, our_reloaded, our_loss = readme_flow(lora, tmp_path, "cpeft")
    assert our_loss == pytest.approx(ref_loss, rel=1e-10)
    torch.testing.assert_close(our_trained, ref_trained, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(our_reloaded, ref_reloaded, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(our_reloaded, our_trained, rtol=1e-12, atol=1e-12)


def test_strict_loading_of_a_lora_only_checkpoint_fails_as_in_loralib():
    model = nested_model(lora, with_conv=False)
    with pytest.raises(RuntimeError, match="Missing key"):
        nested_model(lora, with_conv=False).load_state_dict(lora.lora_state_dict(model))


# --- defects of loralib fixed on purpose -------------------------------------------------------


def test_q1_loading_lora_weights_while_merged_gives_fresh_outputs_and_keeps_w():
    reference, ours = build_pair("Linear", 6, 5, r=2, lora_alpha=2, dtype=torch.float64)
    randomize_adapters(reference, ours)
    base_weight = ours.weight.detach().clone()
    trained = copy.deepcopy(ours)
    with torch.no_grad():
        trained.lora_B.mul_(-2.0)
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = trained.eval()(x)

    reference.eval()
    reference.load_state_dict(loralib.lora_state_dict(trained), strict=False)
    assert not torch.allclose(reference(x), expected), "loralib serves the stale merge"
    ours.eval()
    ours.load_state_dict(lora.lora_state_dict(trained), strict=False)
    assert ours.merged
    torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)
    ours.train()
    assert torch.equal(ours.weight.detach(), base_weight), "W must survive the merged load"


def test_q1_loading_base_weights_while_merged_keeps_the_adapter():
    torch.manual_seed(0)
    layer = lora.Linear(6, 5, r=2, lora_alpha=2, dtype=torch.float64)
    nn.init.normal_(layer.lora_B)
    pretrained = nn.Linear(6, 5, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer.eval()
    layer.load_state_dict(pretrained.state_dict(), strict=False)
    layer.train()
    assert torch.equal(layer.weight.detach(), pretrained.weight.detach())
    expected = pretrained(x) + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-12, atol=1e-12)


def test_q1_state_dict_saved_in_eval_mode_holds_the_unmerged_weight():
    reference, ours = build_pair("Linear", 6, 5, r=2, lora_alpha=2, dtype=torch.float64)
    randomize_adapters(reference, ours)
    base_weight = ours.weight.detach().clone()
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = ours.eval()(x)
    saved = ours.state_dict()
    assert torch.equal(saved["weight"], base_weight)
    torch.manual_seed(8)
    fresh = lora.Linear(6, 5, r=2, lora_alpha=2, dtype=torch.float64)
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh.eval()(x), expected, rtol=1e-12, atol=1e-12)
    reference.eval()
    assert not torch.equal(reference.state_dict()["weight"], base_weight), (
        "loralib saves the merged W, which a later eval() merges a second time"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q2_many_eval_train_cycles_restore_w_exactly(dtype):
    reference, ours = build_pair(
        "MergedLinear", 32, 48, r=4, lora_alpha=16, enable_lora=[True, False, True], dtype=dtype
    )
    randomize_adapters(reference, ours)
    original = ours.weight.detach().clone()
    for _ in range(50):
        reference.eval()
        reference.train()
        ours.eval()
        ours.train()
    assert torch.equal(ours.weight.detach(), original)
    if dtype == torch.bfloat16:
        assert not torch.equal(reference.weight.detach(), original), "loralib drifts (Q2)"


def test_q5_modules_pickle_with_torch_save(tmp_path):
    reference, ours = build_pair("Linear", 6, 4, r=2)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        torch.save(reference, io.BytesIO())
    model = nested_model(lora)
    model.eval()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded.fc.merged
    tokens = torch.randint(0, 30, (2, 3))
    torch.testing.assert_close(loaded.wte(tokens), model.wte(tokens))
    loaded.train()
    model.train()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_q6_merged_linear_without_enabled_blocks_acts_as_r0():
    reference, ours = build_pair("MergedLinear", 6, 6, r=4)
    x = torch.randn(2, 6)
    with pytest.raises(AttributeError):
        reference(x)
    assert not hasattr(ours, "lora_A")
    assert ours.weight.requires_grad
    torch.testing.assert_close(ours(x), nn.functional.linear(x, ours.weight, ours.bias))
    ours.eval()
    torch.testing.assert_close(ours(x), nn.functional.linear(x, ours.weight, ours.bias))


def test_q10_lora_ind_follows_to():
    _, ours = build_pair("MergedLinear", 6, 6, r=2, enable_lora=[True, False])
    assert "lora_ind" in dict(ours.named_buffers())
    assert "lora_ind" not in ours.state_dict(), "state-dict keys stay loralib's"
    moved = ours.to("meta")
    assert moved.lora_ind.device.type == "meta"


@pytest.mark.parametrize(
    "name,args,kwargs",
    [
        ("Linear", (8, 6), dict(r=2)),
        ("MergedLinear", (8, 6), dict(r=2, enable_lora=[True, True])),
        ("Conv2d", (2, 4, 3), dict(r=1)),
        ("Embedding", (10, 6), dict(r=2)),
    ],
)
def test_q12_bfloat16_weights_with_float32_adapters_follow_the_dtype_rule(name, args, kwargs):
    torch.manual_seed(0)
    layer = getattr(lora, name)(*args, **kwargs)
    for p_name, param in layer.named_parameters():
        if "lora_" in p_name:
            nn.init.normal_(param)
    reference = copy.deepcopy(layer)
    layer.to(torch.bfloat16)
    for p_name, param in layer.named_parameters():
        if "lora_" in p_name:
            param.data = param.data.float()
    base_dtype = torch.bfloat16
    x = input_for(layer, base_dtype)  # torch's rule: the input has the weight's dtype
    y = layer(x)
    assert y.dtype == base_dtype
    y.float().sum().backward()
    for p_name, param in layer.named_parameters():
        if "lora_" in p_name:
            assert param.grad is not None and param.grad.dtype == torch.float32
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(torch.bfloat16))
    expected = rounded(x.float() if x.is_floating_point() else x)
    bf16_tolerance = dict(rtol=6e-2, atol=6e-2)
    torch.testing.assert_close(y.float(), expected, **bf16_tolerance)
    merged = layer.eval()(x)
    assert merged.dtype == base_dtype
    torch.testing.assert_close(merged.float(), expected, **bf16_tolerance)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.train()
        assert layer(x.float() if x.is_floating_point() else x).dtype == base_dtype


def test_q15_embedding_max_norm_and_sparse_are_rejected_clearly():
    for option in (dict(max_norm=1.0), dict(sparse=True), dict(scale_grad_by_freq=True)):
        name = next(iter(option))
        with pytest.raises(ValueError, match=name):
            lora.Embedding(10, 4, r=2, **option)
        with pytest.raises(ValueError, match=name):
            lora.IA3Embedding(10, 4, **option)
        assert isinstance(lora.Embedding(10, 4, r=0, **option), nn.Embedding)


def test_q16_train_and_eval_return_the_module():
    for layer in (
        lora.Linear(4, 4, r=2),
        lora.Embedding(5, 4, r=2),
        lora.Conv2d(2, 2, 3, r=1),
        lora.MergedLinear(4, 4, r=1, enable_lora=[True]),
        lora.IA3Linear(4, 4),
    ):
        assert layer.eval() is layer
        assert layer.train() is layer


def test_repr_shows_adapter_settings():
    layer = lora.Linear(4, 3, r=2, lora_alpha=8, lora_dropout=0.1)
    assert "r=2" in repr(layer) and "lora_alpha=8" in repr(layer)
    assert "lora_dropout=0.1" in repr(layer) and "merged=False" in repr(layer)
    assert "merged=True" in repr(layer.eval())
    assert "r=1" in repr(lora.Conv2d(2, 2, 3, r=1))
    assert "enable_lora=[True, False]" in repr(
        lora.MergedLinear(4, 4, r=1, enable_lora=[True, False])
    )


def test_merged_flag_follows_loralib_for_r0_and_merge_weights_false():
    for kwargs in (dict(r=0), dict(r=2, merge_weights=False)):
        reference, ours = build_pair("Linear", 4, 3, **kwargs)
        reference.eval()
        ours.eval()
        assert ours.merged == reference.merged


def test_isinstance_and_signature_defaults_match_loralib():
    import inspect

    for name in ("Linear", "Embedding", "MergedLinear", "ConvLoRA"):
        ours = inspect.signature(getattr(lora, name).__init__).parameters
        theirs = inspect.signature(getattr(loralib, name).__init__).parameters
        assert list(ours) == list(theirs), name
        for param in theirs:
            expected, got = theirs[param].default, ours[param].default
            if isinstance(expected, list):
                got = list(got)
            assert got == expected, f"{name}.{param}"
    assert issubclass(lora.Linear, lora.LoRALayer) and issubclass(lora.Linear, nn.Linear)
    assert issubclass(lora.MergedLinear, lora.Linear) == issubclass(
        loralib.MergedLinear, loralib.Linear
    )
    assert issubclass(lora.Conv2d, lora.ConvLoRA) and issubclass(lora.Embedding, nn.Embedding)
