"""cpeft's torch layers against torch itself: float64 gradcheck of every layer, every
requires_grad combination, no_grad / inference_mode, autocast, .to(), state-dict and whole-module
round trips, activation checkpointing, torch.compile, dropout masks regenerated in backward,
Conv1d/Conv3d against a plain torch reference, IA3 against the real peft. Tests taking the
``device`` fixture (tests/conftest.py) run on the CPU and, where present, on CUDA under the same
tolerances; test_cuda_matches_cpu_float64 adds the low-precision dtypes on the GPU.
"""

import copy
import io
import itertools

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import cpeft as lora  # noqa: E402
from conftest import skip_without_cuda  # noqa: E402
from cpeft import functional  # noqa: E402


def nonzero_adapters(layer, scale=0.5, seed=11):
    """Adapters start as an identity (B = 0, or l = 1): give them random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_" in name or "ia3_" in name:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                param.copy_((noise * scale + (1.0 if "ia3_" in name else 0.0)).to(param.dtype))
    return layer


def make_layers(dtype=torch.float64, device="cpu"):
    """(name, layer, input) for every layer kind, adapters nonzero, everything trainable."""
    torch.manual_seed(0)
    kw = dict(dtype=dtype, device=device)
    cases = [
        ("Linear", lora.Linear(7, 5, r=3, lora_alpha=6, **kw), (2, 3, 7)),
        ("Linear-fan_in_fan_out", lora.Linear(7, 5, r=2, fan_in_fan_out=True, **kw), (4, 7)),
        (
            "MergedLinear",
            lora.MergedLinear(6, 9, r=2, lora_alpha=3, enable_lora=[True, False, True], **kw),
            (4, 6),
        ),
        (
            "MergedLinear-fan_in_fan_out",
            lora.MergedLinear(6, 8, r=1, enable_lora=[False, True], fan_in_fan_out=True, **kw),
            (3, 6),
        ),
        ("Embedding", lora.Embedding(11, 5, r=2, lora_alpha=4, padding_idx=1, **kw), None),
        ("IA3Linear", lora.IA3Linear(6, 4, **kw), (3, 6)),
        ("IA3Linear-feedforward", lora.IA3Linear(6, 4, is_feedforward=True, **kw), (3, 6)),
        ("IA3Linear-fan_in_fan_out", lora.IA3Linear(6, 4, fan_in_fan_out=True, **kw), (3, 6)),
        ("IA3Embedding", lora.IA3Embedding(11, 5, padding_idx=0, **kw), None),
        ("Conv1d", lora.Conv1d(3, 4, 3, r=2, **kw), (2, 3, 8)),
        ("Conv2d", lora.Conv2d(2, 4, 3, r=2, groups=2, **kw), (2, 2, 5, 5)),
        ("Conv3d", lora.Conv3d(2, 3, 2, r=1, **kw), (1, 2, 4, 4, 4)),
    ]
    result = []
    for name, layer, shape in cases:
        nonzero_adapters(layer)
        for param in layer.parameters():
            param.requires_grad_(True)
        if shape is None:
            x = torch.tensor([[0, 1, 4, 10], [3, 1, 1, 7]], device=device)
        else:
            x = torch.randn(shape, dtype=dtype, device=device)
        result.append((name, layer, x))
    return result


CASE_NAMES = [name for name, _, _ in make_layers()]


def case(name, **kwargs):
    return next((layer, x) for n, layer, x in make_layers(**kwargs) if n == name)


def reference_output(layer, x):
    """The layer's function written with plain torch ops on its current parameters."""
    if isinstance(layer, lora.ConvLoRA):
        weight = (
            layer.conv.weight
            + (layer.lora_B @ layer.lora_A).view(layer.conv.weight.shape) * layer.scaling
        )
        return layer.conv._conv_forward(x, weight, layer.conv.bias)
    if isinstance(layer, lora.IA3Embedding):
        return F.embedding(x, layer.weight, layer.padding_idx) * layer.ia3_l.flatten()
    if isinstance(layer, lora.Embedding):
        return (
            F.embedding(x, layer.weight, layer.padding_idx)
            + F.embedding(x, layer.lora_A.T, layer.padding_idx) @ layer.lora_B.T * layer.scaling
        )
    weight = layer.weight.T if layer.fan_in_fan_out else layer.weight
    if isinstance(layer, lora.IA3Linear):
        if layer.is_feedforward:
            return F.linear(x * layer.ia3_l.flatten(), weight, layer.bias)
        return F.linear(x, weight, layer.bias) * layer.ia3_l.flatten()
    if isinstance(layer, lora.MergedLinear):
        delta = layer.merge_AB().T if layer.fan_in_fan_out else layer.merge_AB()
    else:
        delta = layer.lora_B @ layer.lora_A
    return F.linear(x, weight + delta * layer.scaling, layer.bias)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_forward_and_backward_match_plain_torch(name, device):
    layer, x = case(name, device=device)
    reference = copy.deepcopy(layer)
    if x.is_floating_point():
        x.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    y, y_ref = layer(x), reference_output(reference, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(y)
    (y * probe).sum().backward()
    (y_ref * probe).sum().backward()
    for (p_name, p), p_ref in zip(layer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(
            p.grad,
            p_ref.grad,
            rtol=1e-12,
            atol=1e-12,
            msg=lambda m, p_name=p_name: f"{p_name}: {m}",
        )
    if x.is_floating_point():
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_gradcheck_float64(name, device):
    layer, x = case(name, device=device)
    if isinstance(layer, nn.Embedding):
        # padding_idx cuts W[padding_idx]'s gradient on purpose (torch semantics), which finite
        # differences cannot see; the padding path is compared with torch in the tests above.
        layer.padding_idx = None
    params = [p for _, p in layer.named_parameters()]
    names = [n for n, _ in layer.named_parameters()]

    def run(*tensors):
        inputs = tensors[0] if x.is_floating_point() else x
        values = tensors[1:] if x.is_floating_point() else tensors
        return torch.func.functional_call(layer, dict(zip(names, values)), (inputs,))

    inputs = ((x.requires_grad_(True),) if x.is_floating_point() else ()) + tuple(params)
    # Convolutions are torch's own autograd on W + ΔW: a random-projection check is enough there
    # and keeps the test fast; the layers on the C core get the full Jacobian comparison.
    fast = isinstance(layer, lora.ConvLoRA)
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-8, fast_mode=fast)


@pytest.mark.parametrize(
    "name",
    ["Linear", "MergedLinear", "Embedding", "IA3Linear", "IA3Linear-feedforward", "IA3Embedding"],
)
def test_every_requires_grad_combination(name, device):
    layer, x = case(name, device=device)
    reference = copy.deepcopy(layer)
    trainable = [n for n, _ in layer.named_parameters()] + (
        ["input"] if x.is_floating_point() else []
    )
    for flags in itertools.product([False, True], repeat=len(trainable)):
        wanted = dict(zip(trainable, flags))
        for (p_name, p), p_ref in zip(layer.named_parameters(), reference.parameters()):
            p.requires_grad_(wanted[p_name])
            p_ref.requires_grad_(wanted[p_name])
            p.grad = p_ref.grad = None
        x_in = x.detach().clone().requires_grad_(wanted.get("input", False))
        x_ref = x.detach().clone().requires_grad_(wanted.get("input", False))
        y, y_ref = layer(x_in), reference_output(reference, x_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        assert y.requires_grad == y_ref.requires_grad
        if not y.requires_grad:
            continue
        y.sum().backward()
        y_ref.sum().backward()
        for (p_name, p), p_ref in zip(layer.named_parameters(), reference.parameters()):
            if wanted[p_name]:
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-12, atol=1e-12)
            else:
                assert p.grad is None
        if wanted.get("input"):
            torch.testing.assert_close(x_in.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(name, context, device):
    layer, x = case(name, device=device)
    expected = reference_output(layer, x).detach()
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        y = layer(x)
        assert not y.requires_grad
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-12, atol=1e-12)
        layer.train()


def test_dropout_mask_is_the_documented_one_and_backward_reuses_it(device):
    torch.manual_seed(0)
    layer = nonzero_adapters(
        lora.Linear(16, 8, r=4, lora_alpha=8, lora_dropout=0.3, dtype=torch.float64, device=device)
    )
    x = torch.randn(5, 16, dtype=torch.float64, device=device, requires_grad=True)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    mask = torch.as_tensor(
        functional.dropout_mask((5, 16), 0.3, seed, 0, dtype="float64"), device=device
    )
    assert set(mask.unique().tolist()) <= {0.0, 1 / 0.7}
    torch.manual_seed(123)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    reference = copy.deepcopy(layer)
    y_ref = (
        F.linear(x_ref, reference.weight, reference.bias)
        + (x_ref * mask) @ reference.lora_A.T @ reference.lora_B.T * reference.scaling
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_A.grad, reference.lora_A.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.grad, reference.lora_B.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_dropout_under_a_fixed_seed():
    torch.manual_seed(0)
    layer = nonzero_adapters(
        lora.MergedLinear(
            6, 6, r=2, lora_dropout=0.5, enable_lora=[True, True], dtype=torch.float64
        )
    )
    names = [n for n, _ in layer.named_parameters()]

    def run(x, *params):
        torch.manual_seed(77)
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    assert torch.autograd.gradcheck(run, (x,) + params, eps=1e-6, atol=1e-8)


FLOAT_INPUT_CASES = [name for name, _, x in make_layers() if x.is_floating_point()]


@pytest.mark.parametrize("name", FLOAT_INPUT_CASES)
def test_a_tensor_left_from_a_finished_transform_is_taken_as_its_value(name):
    """autograd.Function.apply unwraps a functorch wrapper whose transform has ended (one kept
    from inside torch.func.grad); the layers' leaner apply (_autograd._eager_apply) keeps that."""
    layer, x = case(name)
    leaked = []

    def keep(t):
        leaked.append(t)
        return t.sum()

    torch.func.grad(keep)(x.detach())
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    torch.testing.assert_close(layer(leaked[0]), layer(x.detach()), rtol=0, atol=0)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_functorch_transforms_reach_torchs_own_apply(name):
    """Under an active transform the layers take autograd.Function.apply itself, so torch's
    own error comes (their Functions define no setup_context), not a wrong result."""
    layer, x = case(name)
    if isinstance(layer, lora.ConvLoRA):
        pytest.skip("convolutions are plain torch autograd, which functorch transforms")
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vmap(layer)(x.detach().unsqueeze(0))


def test_activation_checkpointing_recomputes_the_same_dropout_mask():
    torch.manual_seed(0)
    model = nn.Sequential(
        nonzero_adapters(lora.Linear(8, 8, r=2, lora_dropout=0.5, dtype=torch.float64)),
        nn.Tanh(),
        nonzero_adapters(lora.Linear(8, 4, r=2, lora_dropout=0.5, dtype=torch.float64)),
    )
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None] + [x.grad]
    model.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(5)
    out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    out.square().sum().backward()
    got = [p.grad for p in model.parameters() if p.grad is not None] + [x.grad]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["Linear", "MergedLinear", "IA3Linear"])
def test_autocast_bfloat16_on_cpu_matches_torch_autocast(name):
    layer, x = case(name, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = reference_output(layer, x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_to_dtype_and_state_dict_round_trip(name):
    layer, x = case(name)
    state = copy.deepcopy(layer.state_dict())
    layer32 = copy.deepcopy(layer).to(torch.float32)
    x32 = x.float() if x.is_floating_point() else x
    torch.testing.assert_close(
        layer32(x32).double(), reference_output(layer, x), rtol=1e-4, atol=1e-4
    )
    fresh = copy.deepcopy(layer)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_whole_module_torch_save_load_in_both_modes(name):
    layer, x = case(name)
    for mode in (True, False):
        layer.train(mode)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert loaded.merged == layer.merged
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
        loaded.train()
        layer.train()
        for (key, a), b in zip(layer.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("name", CASE_NAMES)
def test_exact_unmerge_with_a_zero_ia3_entry_and_large_adapters(name):
    layer, x = case(name, dtype=torch.float32)
    nonzero_adapters(layer, scale=30.0)
    if hasattr(layer, "ia3_l"):
        with torch.no_grad():
            layer.ia3_l.view(-1)[0] = 0.0
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        expected = reference_output(layer, x)
        for _ in range(3):
            merged = layer.eval()(x)
            torch.testing.assert_close(
                merged, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max())
            )
            layer.train()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", ["Linear", "MergedLinear", "Embedding", "IA3Linear", "Conv2d"])
def test_merged_output_equals_unmerged_output(name, device):
    layer, x = case(name, device=device)
    with torch.no_grad():
        unmerged = layer(x)
        merged = layer.eval()(x)
    assert layer.merged
    torch.testing.assert_close(merged, unmerged, rtol=1e-12, atol=1e-12)


def test_torch_compile_gives_eager_results():
    """The layers' ops are torch.library custom ops under torch.compile: one graph, no break
    (fullgraph), eager results and gradients. tests/test_compile.py covers every layer."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nonzero_adapters(lora.Linear(8, 8, r=2)), nn.ReLU(), nonzero_adapters(lora.IA3Linear(8, 4))
    )
    x = torch.randn(3, 8, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    for got, want in zip(
        [p.grad for p in model.parameters() if p.grad is not None], expected_grads
    ):
        torch.testing.assert_close(got, want)


def test_ia3_linear_matches_peft():
    peft = pytest.importorskip("peft")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Linear(6, 5)
            self.ff = nn.Linear(5, 4)

        def forward(self, x):
            return self.ff(torch.relu(self.k(x)))

    torch.manual_seed(0)
    base = Block().double()
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.IA3Config(target_modules=["k", "ff"], feedforward_modules=["ff"])
    )
    k = lora.IA3Linear(6, 5, dtype=torch.float64)
    ff = lora.IA3Linear(5, 4, is_feedforward=True, dtype=torch.float64)
    with torch.no_grad():
        for ours, theirs, name in (
            (k, model.base_model.model.k, "k"),
            (ff, model.base_model.model.ff, "ff"),
        ):
            assert ours.ia3_l.shape == theirs.ia3_l["default"].shape
            assert torch.equal(ours.ia3_l, theirs.ia3_l["default"])
            theirs.ia3_l["default"].normal_()
            ours.ia3_l.copy_(theirs.ia3_l["default"])
            ours.weight.copy_(getattr(base, name).weight)
            ours.bias.copy_(getattr(base, name).bias)
    x = torch.randn(3, 6, dtype=torch.float64)
    ours_out = ff(torch.relu(k(x)))
    torch.testing.assert_close(ours_out, model(x), rtol=1e-12, atol=1e-12)
    ours_out.sum().backward()
    model(x).sum().backward()
    torch.testing.assert_close(
        k.ia3_l.grad, model.base_model.model.k.ia3_l["default"].grad, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        ff.ia3_l.grad, model.base_model.model.ff.ia3_l["default"].grad, rtol=1e-12, atol=1e-12
    )
    model.merge_adapter()
    k.eval()
    ff.eval()
    torch.testing.assert_close(k.weight, model.base_model.model.k.base_layer.weight)
    torch.testing.assert_close(ff.weight, model.base_model.model.ff.base_layer.weight)
    torch.testing.assert_close(k.bias, model.base_model.model.k.base_layer.bias)


def test_conv1d_and_conv3d_shapes_are_consistent_where_loralib_crashes():
    loralib = pytest.importorskip("loralib")
    for library_cls, ours_cls in ((loralib.Conv1d, lora.Conv1d), (loralib.Conv3d, lora.Conv3d)):
        with pytest.raises(RuntimeError, match="invalid for input"):
            layer = library_cls(2, 4, 3, r=2)
            layer(torch.randn(1, 2, *(5,) * (layer.conv.weight.dim() - 2)))
        ours = ours_cls(2, 4, 3, r=2)
        assert ours.lora_A.shape == (6, 6)
        assert (ours.lora_B @ ours.lora_A).numel() == ours.conv.weight.numel()


def test_conv_kernel_size_must_be_an_int_and_dropout_warns():
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        lora.Conv2d(2, 2, (3, 3), r=1)
    with pytest.warns(UserWarning, match="no effect"):
        lora.Conv2d(2, 2, 3, r=1, lora_dropout=0.2)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_float64(name, dtype):
    skip_without_cuda()
    layer, x = case(name)
    reference = copy.deepcopy(layer)
    expected = reference_output(reference, x)
    cuda_layer = copy.deepcopy(layer).to(device="cuda", dtype=dtype)
    x_cuda = x.to("cuda", dtype) if x.is_floating_point() else x.to("cuda")
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = cuda_layer(x_cuda)
        y.float().sum().backward()
        merged = cuda_layer.eval()(x_cuda)
    torch.cuda.synchronize()
    torch.testing.assert_close(y.double().cpu(), expected, **tolerance)
    torch.testing.assert_close(merged.double().cpu(), expected, **tolerance)
    cuda_layer.train()
    for (key, value), original in zip(
        cuda_layer.state_dict().items(), layer.to(dtype).state_dict().values()
    ):
        assert torch.equal(value.cpu(), original), key
