"""torch.compile of models built from cpeft layers (issue 8, item 7): the layer ops are
torch.library custom ops, so ``fullgraph=True`` compiles with no graph break, and results and
gradients equal eager. On a GPU, ``mode="reduce-overhead"`` captures the ops in CUDA graphs whose
replays equal eager."""

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from test_layers_torch import nonzero_adapters  # noqa: E402

import cpeft  # noqa: E402
from conftest import skip_without_cuda  # noqa: E402


class Model(nn.Module):
    """Every layer kind on the C core: both embeddings, Linear, MergedLinear, IA3Linear with
    output and input scaling."""

    def __init__(self, dropout=0.0, **kw):
        super().__init__()
        self.embedding = cpeft.Embedding(20, 8, r=2, lora_alpha=4, padding_idx=0, **kw)
        self.ia3_embedding = cpeft.IA3Embedding(20, 8, padding_idx=3, **kw)
        self.linear = cpeft.Linear(8, 8, r=2, lora_alpha=4, lora_dropout=dropout, **kw)
        self.merged = cpeft.MergedLinear(
            8,
            12,
            r=2,
            lora_dropout=dropout,
            enable_lora=[True, False, True],
            fan_in_fan_out=True,
            **kw,
        )
        self.ia3 = cpeft.IA3Linear(12, 8, **kw)
        self.ia3_feedforward = cpeft.IA3Linear(8, 5, is_feedforward=True, **kw)
        for module in self.children():
            nonzero_adapters(module)

    def forward(self, indices):
        h = self.embedding(indices) + self.ia3_embedding(indices)
        h = torch.relu(self.linear(h))
        return self.ia3_feedforward(self.ia3(self.merged(h)))


def run(model, indices):
    """Output and gradients of every parameter that gets one, for a mean loss."""
    model.zero_grad(set_to_none=True)
    y = model(indices)
    y.mean().backward()
    return y.detach(), {
        n.removeprefix("_orig_mod."): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def assert_equal_runs(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    assert sorted(got[1]) == sorted(expected[1])
    for name, grad in expected[1].items():
        torch.testing.assert_close(
            got[1][name], grad, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fullgraph_compile_equals_eager(backend, device):
    torch.manual_seed(0)
    model = Model(dtype=torch.float64, device=device)
    indices = torch.randint(0, 20, (3, 4), device=device)
    expected = run(model, indices)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert_equal_runs(run(compiled, indices), expected)
    with torch.no_grad():
        torch.testing.assert_close(compiled(indices), expected[0], rtol=1e-12, atol=1e-12)


def test_graph_holds_one_custom_op_per_layer():
    """What Dynamo hands the backend: one cpeft op per layer, no break, no fallback."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = Model(dtype=torch.float64)
    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(torch.randint(0, 20, (3, 4)))
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("cpeft.lora_embedding" in t for t in targets) == 1
    assert sum("cpeft.ia3_embedding" in t for t in targets) == 1
    assert sum("cpeft.lora_linear" in t for t in targets) == 2
    assert sum("cpeft.ia3_linear" in t for t in targets) == 2


def test_compiled_dropout_draws_the_eager_seeds():
    """A compiled graph draws a fresh seed per step from torch's CPU generator, as eager does:
    under the same torch.manual_seed both apply the same masks."""
    torch.manual_seed(0)
    model = Model(dropout=0.5, dtype=torch.float64)
    indices = torch.randint(0, 20, (3, 4))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for step in range(2):
        torch.manual_seed(100 + step)
        expected = run(model, indices)
        torch.manual_seed(100 + step)
        assert_equal_runs(run(compiled, indices), expected)
    torch.manual_seed(7)
    first = compiled(indices)
    assert not torch.equal(first, compiled(indices)), "the mask must change between steps"


def test_inductor_compiles_a_lora_linear():
    torch.manual_seed(0)
    model = nn.Sequential(
        nonzero_adapters(cpeft.Linear(6, 6, r=2)),
        nn.GELU(),
        nonzero_adapters(cpeft.IA3Linear(6, 3)),
    )
    x = torch.randn(4, 6)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.sum().backward()
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    y_compiled = compiled(x)
    y_compiled.sum().backward()
    torch.testing.assert_close(y_compiled, y)
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_equal_eager(dtype):
    """mode="reduce-overhead": forward and backward captured in CUDA graphs; every replay (new
    input values each step) equals eager. Nothing in the per-call path may allocate outside
    torch or synchronize, or capture fails."""
    skip_without_cuda()
    torch.manual_seed(0)
    model = Model(dtype=dtype, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for _ in range(5):
        indices = torch.randint(0, 20, (8, 16), device="cuda")
        expected = run(model, indices)
        torch.compiler.cudagraph_mark_step_begin()
        got = run(compiled, indices)
        torch.testing.assert_close(got[0], expected[0], **tolerance)
        assert sorted(got[1]) == sorted(expected[1])
        for name, grad in expected[1].items():
            torch.testing.assert_close(got[1][name], grad, **tolerance)


class DoraModel(nn.Module):
    """DoRA on both layer kinds that take it: an Embedding and two Linears (one with
    fan_in_fan_out, Conv1D's layout), beside a plain LoRA Linear."""

    def __init__(self, dropout=0.0, **kw):
        super().__init__()
        self.embedding = cpeft.Embedding(
            20, 8, r=2, lora_alpha=4, padding_idx=0, use_dora=True, **kw
        )
        self.linear = cpeft.Linear(
            8, 8, r=2, lora_alpha=4, lora_dropout=dropout, use_dora=True, **kw
        )
        self.transposed = cpeft.Linear(
            8, 6, r=3, lora_dropout=dropout, fan_in_fan_out=True, use_dora=True, **kw
        )
        self.lora = cpeft.Linear(6, 5, r=2, **kw)
        for module in self.children():
            nonzero_adapters(module)

    def forward(self, indices):
        h = torch.relu(self.linear(self.embedding(indices)))
        return self.lora(self.transposed(h))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_dora_fullgraph_compile_equals_eager(backend, device):
    """The compiled ops compute ‖W‖² inside each call where eager takes it from the layer's
    cache: the results and gradients are the same."""
    torch.manual_seed(0)
    model = DoraModel(dtype=torch.float64, device=device)
    indices = torch.randint(0, 20, (3, 4), device=device)
    expected = run(model, indices)
    assert {
        "embedding.lora_magnitude_vector",
        "linear.lora_magnitude_vector",
        "transposed.lora_magnitude_vector",
    } <= set(expected[1])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert_equal_runs(run(compiled, indices), expected)
    with torch.no_grad():
        torch.testing.assert_close(compiled(indices), expected[0], rtol=1e-12, atol=1e-12)


def test_dora_compile_with_a_frozen_magnitude_equals_eager():
    """A frozen magnitude: the op keeps no base for its gradient, and the others still flow."""
    torch.manual_seed(0)
    model = DoraModel(dtype=torch.float64)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_magnitude_vector" not in name and "lora_" in name)
    indices = torch.randint(0, 20, (3, 4))
    expected = run(model, indices)
    assert not any("magnitude" in name for name in expected[1])
    torch._dynamo.reset()
    assert_equal_runs(
        run(torch.compile(model, backend="aot_eager", fullgraph=True), indices), expected
    )


def test_dora_graph_holds_one_custom_op_per_layer():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(DoraModel(dtype=torch.float64), backend=backend, fullgraph=True)(
        torch.randint(0, 20, (3, 4))
    )
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("cpeft.dora_embedding" in t for t in targets) == 1
    assert sum("cpeft.dora_linear" in t for t in targets) == 2
    assert sum("cpeft.lora_linear" in t for t in targets) == 1


def test_dora_compiled_dropout_draws_the_eager_seeds():
    torch.manual_seed(0)
    model = DoraModel(dropout=0.5, dtype=torch.float64)
    indices = torch.randint(0, 20, (3, 4))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for step in range(2):
        torch.manual_seed(100 + step)
        expected = run(model, indices)
        torch.manual_seed(100 + step)
        assert_equal_runs(run(compiled, indices), expected)
    torch.manual_seed(7)
    first = compiled(indices)
    assert not torch.equal(first, compiled(indices)), "the mask must change between steps"


def test_dora_compile_sees_a_changed_weight():
    """Eager's ‖W‖² cache follows W's version; the compiled graph recomputes ‖W‖² per call, so
    an in-place change of the frozen weights between calls shows in both alike."""
    torch.manual_seed(0)
    model = DoraModel(dtype=torch.float64)
    indices = torch.randint(0, 20, (3, 4))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_equal_runs(run(compiled, indices), run(model, indices))
    with torch.no_grad():
        model.linear.weight.mul_(1.5)
        model.embedding.weight.add_(0.25)
    expected = run(model, indices)
    assert_equal_runs(run(compiled, indices), expected)


class GroupedModel(nn.Module):
    """Two packed adapters of ranks 2 and 3 over one base linear (peft's mixed-adapter batch
    layout), each row of the input choosing adapter 0, 1 or none (-1)."""

    def __init__(self, dropout=0.0, fan_in_fan_out=False, dtype=torch.float64, device="cpu"):
        super().__init__()
        generator = torch.Generator().manual_seed(5)

        def parameter(*shape, requires_grad=True):
            values = torch.randn(shape, generator=generator, dtype=torch.float64)
            return nn.Parameter(values.to(dtype=dtype, device=device), requires_grad=requires_grad)

        self.fan_in_fan_out, self.dropout = fan_in_fan_out, dropout
        self.weight = parameter(*((8, 6) if fan_in_fan_out else (6, 8)), requires_grad=False)
        self.bias = parameter(6, requires_grad=False)
        self.lora_a, self.lora_b = parameter(5, 8), parameter(6, 5)

    def forward(self, x, index):
        y = cpeft._autograd.lora_grouped(
            x,
            self.weight,
            self.bias,
            self.lora_a,
            self.lora_b,
            index,
            ranks=[2, 3],
            scales=[0.5, 2.0],
            fan_in_fan_out=self.fan_in_fan_out,
            dropout=self.dropout,
        )
        return torch.tanh(y)


def run_grouped(model, x, index):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = model(x, index)
    y.mean().backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    grads["x"] = x.grad.clone()
    return y.detach(), grads


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_grouped_fullgraph_compile_equals_eager(backend, fan_in_fan_out, device):
    torch.manual_seed(0)
    model = GroupedModel(fan_in_fan_out=fan_in_fan_out, device=device)
    x = torch.randn(3, 4, 8, dtype=torch.float64, device=device)
    index = torch.tensor([0, 1, -1, 1] * 3, device=device)
    expected = run_grouped(model, x, index)
    assert sorted(expected[1]) == ["lora_a", "lora_b", "x"]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert_equal_runs(run_grouped(compiled, x, index), expected)


def test_grouped_graph_holds_one_custom_op_and_dropout_draws_the_eager_seeds():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = GroupedModel(dropout=0.5)
    x = torch.randn(6, 8, dtype=torch.float64)
    index = torch.tensor([1, 0, 0, -1, 1, 1])
    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x, index)
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("cpeft.lora_grouped" in t for t in targets) == 1

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for step in range(2):
        torch.manual_seed(100 + step)
        expected = run_grouped(model, x, index)
        torch.manual_seed(100 + step)
        assert_equal_runs(run_grouped(compiled, x, index), expected)
    torch.manual_seed(7)
    first = compiled(x, index)
    assert not torch.equal(first, compiled(x, index)), "the mask must change between steps"


def test_dora_compile_in_float32_differs_from_eager_by_rounding_only():
    """In float32, eager's cached ‖W‖² is rounded to float32 where the compiled op keeps the
    core's double sum: the two agree to float32 rounding."""
    torch.manual_seed(0)
    model = DoraModel(dtype=torch.float32)
    indices = torch.randint(0, 20, (3, 4))
    expected = run(model, indices)
    torch._dynamo.reset()
    got = run(torch.compile(model, backend="aot_eager", fullgraph=True), indices)
    torch.testing.assert_close(got[0], expected[0])
    assert sorted(got[1]) == sorted(expected[1])
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, msg=lambda m, name=name: f"{name}: {m}")


def test_inductor_compiles_dora_layers():
    torch.manual_seed(0)
    model = DoraModel(dtype=torch.float32)
    indices = torch.randint(0, 20, (3, 4))
    expected = run(model, indices)
    torch._dynamo.reset()
    got = run(torch.compile(model, backend="inductor", fullgraph=True), indices)
    torch.testing.assert_close(got[0], expected[0])
    assert sorted(got[1]) == sorted(expected[1])
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, msg=lambda m, name=name: f"{name}: {m}")
