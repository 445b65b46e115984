"""DoRA in the torch layers (loralib API) and the peft-style API, against the real peft 0.21:
outputs, every gradient, dropout semantics, merged weights, exact unmerge, files both ways.
The framework-free op tests (float64 references, bad input) are in tests/test_dora.py."""

import pytest

from cpeft import functional as F

# ---- torch layers (loralib API) --------------------------------------------------------------

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import cpeft  # noqa: E402


def _peft_dora(base: "torch.nn.Module", target: str, r=4, alpha=8, dropout=0.0, **config):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        base,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=[target],
            use_dora=True,
            **config,
        ),
    )
    return model, model.base_model.model._modules[target]


class _FixedMask(torch.nn.Module):
    """Stands in for peft's nn.Dropout so peft sees cpeft's Philox mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def _randomize(*tensors, scale=0.3):
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn_like(t) * scale)


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("bias", [True, False])
def test_functional_matches_peft_linear(p, bias):
    """cpeft's op against peft's own DoRA forward and autograd, dropout included (peft's
    dropout module replaced by the same mask cpeft regenerates from its seed)."""
    torch.manual_seed(0)
    m_rows, in_f, out_f, seed = 7, 12, 9, 5
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64))
    model, layer = _peft_dora(base, "lin", dropout=p)
    _randomize(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(
            1 + 0.2 * torch.rand(out_f, dtype=torch.float64)
        )
    if bias:
        layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(m_rows, in_f, dtype=torch.float64, requires_grad=True)
    if p > 0:
        mask = torch.from_numpy(F.dropout_mask((m_rows, in_f), p, seed, dtype="float64"))
        layer.lora_dropout["default"] = _FixedMask(mask)
    model.train()
    y_peft = model(x)
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    w, bb = layer.base_layer.weight, layer.base_layer.bias
    scale = layer.scaling["default"]
    y, xa, kept, n = F.dora_linear_forward(
        x, w, bb, a, b, mag, scale, dropout=p, seed=seed, keep_base=True
    )
    grads = F.dora_linear_backward(
        g, x, w, a, b, mag, n, xa, kept, scale, dropout=p, seed=seed, grad_bias=bias
    )
    torch.testing.assert_close(y, y_peft.detach(), rtol=1e-12, atol=1e-12)
    for name, want in (
        ("x", x.grad),
        ("lora_a", a.grad),
        ("lora_b", b.grad),
        ("magnitude", mag.grad),
    ) + ((("bias", bb.grad),) if bias else ()):
        torch.testing.assert_close(
            getattr(grads, name), want, rtol=1e-11, atol=1e-12, msg=f"grad {name}"
        )


def _copy_into(ours, layer, embedding=False):
    with torch.no_grad():
        if embedding:
            ours.weight.copy_(layer.base_layer.weight)
            ours.lora_A.copy_(layer.lora_embedding_A["default"])
            ours.lora_B.copy_(layer.lora_embedding_B["default"])
        else:
            ours.weight.copy_(layer.base_layer.weight)
            if ours.bias is not None:
                ours.bias.copy_(layer.base_layer.bias)
            ours.lora_A.copy_(layer.lora_A["default"].weight)
            ours.lora_B.copy_(layer.lora_B["default"].weight)
        ours.lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)


def test_linear_layer_matches_peft_and_merges_exactly():
    torch.manual_seed(1)
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(16, 10, dtype=torch.float64))
    model, layer = _peft_dora(base, "lin", r=4, alpha=8)
    ours = cpeft.Linear(16, 10, r=4, lora_alpha=8, use_dora=True, dtype=torch.float64)
    # peft initializes m = ‖W + s·B·A‖ = ‖W‖ (B = 0); cpeft does the same from its own W.
    with torch.no_grad():
        ours.weight.copy_(layer.base_layer.weight)
    with torch.no_grad():
        ours.lora_magnitude_vector.copy_(torch.linalg.norm(ours.weight, dim=1))
    torch.testing.assert_close(
        ours.lora_magnitude_vector,
        layer.lora_magnitude_vector["default"].weight,
        rtol=1e-14,
        atol=0,
    )
    _randomize(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    _copy_into(ours, layer)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    model.train()
    ours.train()
    y_peft, y = model(x), ours(x)
    torch.testing.assert_close(y, y_peft, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y_peft.backward(g)
    y.backward(g)
    torch.testing.assert_close(
        ours.lora_magnitude_vector.grad, layer.lora_magnitude_vector["default"].weight.grad
    )
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_B["default"].weight.grad)
    # merge: cpeft's merged W equals peft's merged W; unmerge restores the bits
    original = ours.weight.detach().clone()
    ours.eval()
    merged = model.merge_and_unload()
    torch.testing.assert_close(ours.weight, merged.lin.weight, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(ours(x), y.detach(), rtol=1e-12, atol=1e-12)
    ours.train()
    assert torch.equal(ours.weight, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_layer_merge_cycles_bit_exact(dtype, fan_in_fan_out):
    torch.manual_seed(2)
    layer = cpeft.Linear(
        24, 18, r=4, lora_alpha=16, use_dora=True, fan_in_fan_out=fan_in_fan_out, dtype=dtype
    )
    _randomize(layer.lora_B)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(18, dtype=dtype) + 0.5)
    original = layer.weight.detach().clone()
    x = torch.randn(6, 24, dtype=dtype)
    y = layer(x).detach()
    for _ in range(5):
        layer.eval()
        torch.testing.assert_close(layer(x), y)
        layer.train()
    assert torch.equal(layer.weight, original)


def test_magnitude_is_an_adapter_parameter():
    model = torch.nn.Sequential(cpeft.Linear(8, 4, r=2, use_dora=True), torch.nn.Linear(4, 3))
    cpeft.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "0.lora_magnitude_vector"}
    assert set(cpeft.lora_state_dict(model)) == trainable
    assert set(cpeft.lora_state_dict(model, bias="lora_only")) == trainable | {"0.bias"}


def test_magnitude_initialized_to_norm():
    """m = ‖W + s·B·A‖ per output row at creation (B = 0, so ‖W‖) and again after
    reset_parameters, on the stored layout."""
    torch.manual_seed(3)
    layer = cpeft.Linear(10, 7, r=3, use_dora=True, fan_in_fan_out=True, dtype=torch.float64)
    torch.testing.assert_close(
        layer.lora_magnitude_vector, torch.linalg.norm(layer.weight.T, dim=1), rtol=1e-14, atol=0
    )
    before = layer.lora_magnitude_vector.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.lora_magnitude_vector)
    torch.testing.assert_close(
        layer.lora_magnitude_vector, torch.linalg.norm(layer.weight.T, dim=1), rtol=1e-14, atol=0
    )
    x = torch.randn(4, 10, dtype=torch.float64)
    plain = cpeft.Linear(10, 7, r=3, fan_in_fan_out=True, dtype=torch.float64)
    plain.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if k != "lora_magnitude_vector"}
    )
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-13, atol=1e-13)


def test_weight_change_invalidates_cached_sq_norm():
    torch.manual_seed(4)
    layer = cpeft.Linear(9, 5, r=2, use_dora=True, dtype=torch.float64)
    _randomize(layer.lora_B)
    x = torch.randn(3, 9, dtype=torch.float64)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    y = layer(x)
    w = layer.weight
    n = torch.linalg.norm(w + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    want = (
        layer.lora_magnitude_vector
        / n
        * (x @ w.T + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T)
        + layer.bias
    )
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_dora_refuses_trainable_weight_and_zero_rank():
    layer = cpeft.Linear(4, 3, r=2, use_dora=True)
    layer.weight.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="weight"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="use_dora"):
        cpeft.Linear(4, 3, r=0, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        cpeft.Embedding(4, 3, r=0, use_dora=True)


def test_embedding_layer_matches_peft_and_merges_exactly():
    torch.manual_seed(5)
    base = torch.nn.Sequential()
    base.add_module("emb", torch.nn.Embedding(13, 6, padding_idx=2, dtype=torch.float64))
    model, layer = _peft_dora(base, "emb", r=3, alpha=6)
    ours = cpeft.Embedding(
        13, 6, r=3, lora_alpha=6, use_dora=True, padding_idx=2, dtype=torch.float64
    )
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    _copy_into(ours, layer, embedding=True)
    idx = torch.tensor([[0, 2, 12, 5], [5, 5, 1, 2]])
    model.train()
    y_peft, y = model(idx), ours(idx)
    torch.testing.assert_close(y, y_peft, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y_peft.backward(g)
    y.backward(g)
    torch.testing.assert_close(
        ours.lora_magnitude_vector.grad, layer.lora_magnitude_vector["default"].weight.grad
    )
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_embedding_A["default"].grad)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_embedding_B["default"].grad)
    original = ours.weight.detach().clone()
    ours.eval()
    merged = model.merge_and_unload()
    torch.testing.assert_close(ours.weight, merged.emb.weight, rtol=1e-13, atol=1e-14)
    ours.train()
    assert torch.equal(ours.weight, original)


# ---- peft-style API: LoraConfig(use_dora=True), files both ways ------------------------------

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_peft import bert, gpt2, output, tokens  # noqa: E402

from cpeft.peft import ADAPTER_WEIGHTS_NAME, LoraConfig, PeftModel, get_peft_model  # noqa: E402

DORA_CASES = {
    # c_attn / mlp.c_proj are transformers' Conv1D, wte an Embedding
    "gpt2-conv1d-embedding": (
        gpt2,
        dict(r=4, lora_alpha=16, target_modules=["c_attn", "mlp.c_proj", "wte"]),
    ),
    "bert-linear": (bert, dict(r=2, lora_alpha=4, target_modules=["query", "value"])),
}


def _randomize_dora(model, seed=7):
    """Non-trivial adapters: A and B random, the magnitude moved off its initial norm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.0 + 0.2 * noise)
            elif "lora_" in name:
                parameter.copy_(0.2 * noise)


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_peft_api_dora_layout_and_initial_magnitude_match_peft(case, tmp_path):
    make, kwargs = DORA_CASES[case]
    ours = get_peft_model(make(), LoraConfig(use_dora=True, **kwargs))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, **kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    our_tensors = safetensors_torch.load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME)
    their_tensors = safetensors_torch.load_file(tmp_path / "theirs" / ADAPTER_WEIGHTS_NAME)
    assert {k: tuple(v.shape) for k, v in our_tensors.items()} == {
        k: tuple(v.shape) for k, v in their_tensors.items()
    }
    magnitudes = [k for k in their_tensors if k.endswith(".lora_magnitude_vector")]
    assert magnitudes
    for key in magnitudes:  # m = ‖W + s·B·A‖ at creation, B = 0 (embedding: A = 0)
        torch.testing.assert_close(our_tensors[key], their_tensors[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_dora_adapter_written_by_peft_loads_in_cpeft_with_equal_outputs(case, tmp_path):
    make, kwargs = DORA_CASES[case]
    ids = tokens()
    theirs = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, **kwargs))
    _randomize_dora(theirs)
    theirs.eval()
    expected = output(theirs, ids)
    assert not torch.allclose(expected, output(make(), ids), rtol=1e-4, atol=1e-4)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(output(ours, ids), expected, rtol=1e-5, atol=1e-5)
    # merged as peft merges (with GPT-2's tied wte the merge also reaches lm_head, in both
    # libraries), and unmerge restores the base weights bit for bit
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items()}
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(output(ours, ids), output(theirs, ids), rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    after = ours.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_dora_adapter_written_by_cpeft_loads_in_peft_with_equal_outputs(case, tmp_path):
    make, kwargs = DORA_CASES[case]
    ids = tokens()
    ours = get_peft_model(make(), LoraConfig(use_dora=True, **kwargs))
    _randomize_dora(ours)
    ours.eval()
    expected = output(ours, ids)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    theirs.eval()
    torch.testing.assert_close(output(theirs, ids), expected, rtol=1e-5, atol=1e-5)
    merged = theirs.merge_and_unload()
    ours_merged = ours.merge_and_unload()
    torch.testing.assert_close(output(ours_merged, ids), output(merged, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_dora_training_gradients_match_peft(case, tmp_path):
    make, kwargs = DORA_CASES[case]
    ids = tokens()
    theirs = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, **kwargs))
    _randomize_dora(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path, is_trainable=True)
    grads = []
    for model in (theirs, ours):
        model.train()
        result = model(ids)
        logits = result.logits if hasattr(result, "logits") else result.last_hidden_state
        (logits.double() ** 2).sum().backward()
        grads.append(
            {
                n.replace(".default", ""): p.grad
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )
    assert set(grads[0]) == set(grads[1])
    assert any("lora_magnitude_vector" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=2e-4, atol=1e-5, msg=name)


def test_peft_api_refuses_several_active_adapters_with_dora():
    model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="DoRA"):
        model(tokens())


def test_layer_releases_every_dlpack_export():
    """The DoRA Functions hand tensors to C as torch capsules: after many steps no parameter,
    input or cached norm holds an extra reference."""
    import gc

    from test_leaks import holders

    layer = cpeft.Linear(6, 5, r=2, use_dora=True, lora_dropout=0.2)
    x = torch.randn(4, 6, requires_grad=True)
    layer(x).sum().backward()
    watched = dict(layer.named_parameters(), x=x)
    before = {k: holders(v) for k, v in watched.items()}
    for _ in range(50):
        layer(x).sum().backward()
    gc.collect()
    assert {k: holders(v) for k, v in watched.items()} == before


def test_peft_api_dora_merged_after_another_adapter_unmerges_exactly():
    """n is taken on the pretrained weight even when another adapter is merged first, and
    unmerging both restores the weights bit for bit."""
    ids = tokens()
    model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    _randomize_dora(model)
    before = {
        k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k
    }
    model.set_adapter("dora")
    model.eval()
    expected = output(model, ids)
    model.merge_adapter(["default"])
    model.merge_adapter(["dora"])
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.merge_adapter(["dora"])
    torch.testing.assert_close(output(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_get_peft_model_state_dict_keys_match_peft():
    from peft import get_peft_model_state_dict as peft_state_dict

    from cpeft.peft import get_peft_model_state_dict

    kwargs = dict(r=2, lora_alpha=4, target_modules=["c_attn", "wte"], use_dora=True)
    ours = get_peft_model(gpt2(), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(gpt2(), peft.LoraConfig(**kwargs))
    mine, want = get_peft_model_state_dict(ours), peft_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {
        k: tuple(v.shape) for k, v in want.items()
    }
    for key in want:
        if key.endswith("lora_magnitude_vector"):
            torch.testing.assert_close(mine[key], want[key], rtol=1e-5, atol=1e-6)


def test_dora_layer_pickles_and_state_dict_round_trips():
    import copy
    import pickle

    torch.manual_seed(6)
    layer = cpeft.Linear(8, 5, r=2, use_dora=True, dtype=torch.float64)
    _randomize(layer.lora_B)
    x = torch.randn(3, 8, dtype=torch.float64)
    y = layer(x).detach()
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
    fresh = cpeft.Linear(8, 5, r=2, use_dora=True, dtype=torch.float64)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    layer.eval()  # merged: the state dict still holds the unmerged weight
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh.train()(x), y, rtol=0, atol=0)


def test_mixed_adapter_batch_refuses_dora_adapters():
    """peft refuses adapter_names with DoRA; so does cpeft, instead of running it as LoRA."""
    model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"]))
    ids = tokens()
    with pytest.raises(ValueError, match="DoRA"):
        model(ids, adapter_names=["default", "other", "__base__"])
