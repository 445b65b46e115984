"""Scale-out on an existing engine: torch.distributed DDP (gloo, CPU, 2 processes) trains a small
cpeft LoRA model; its gradients and weights must equal one process on the same global batch,
and only the LoRA parameters (plus the biases chosen by bias='lora_only') may get gradients."""

import socket

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
nn = torch.nn

import cpeft as lora  # noqa: E402

WORLD_SIZE = 2
STEPS = 3
GLOBAL_BATCH = 8


class TinyLoraModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = lora.Embedding(20, 8, r=2, lora_alpha=4)
        self.qkv = lora.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True])
        self.proj = lora.Linear(12, 8, r=2, lora_alpha=4)
        self.scale = lora.IA3Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        hidden = torch.tanh(self.proj(self.qkv(self.embed(tokens))))
        return self.head(self.norm(self.scale(hidden)).mean(1))


def build_model():
    torch.manual_seed(0)
    model = TinyLoraModel().double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    return model


def global_batches():
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randint(0, 20, (GLOBAL_BATCH, 5), generator=generator),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def train(model, batches, rank=0, world_size=1):
    """SGD steps on this rank's contiguous share of each global batch; returns the first step's
    gradients and the final parameters."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    first_grads = None
    share = GLOBAL_BATCH // world_size
    for tokens, labels in batches:
        rows = slice(rank * share, (rank + 1) * share)
        loss = nn.functional.cross_entropy(model(tokens[rows]), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if first_grads is None:
            first_grads = {
                n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
            }
        optimizer.step()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return first_grads, weights


def _worker(rank, port, result_path):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        model = nn.parallel.DistributedDataParallel(build_model())
        grads, weights = train(model, global_batches(), rank, WORLD_SIZE)
        strip = len("module.")
        torch.save(
            {
                "grads": {k[strip:]: v for k, v in grads.items()},
                "weights": {k[strip:]: v for k, v in weights.items()},
            },
            f"{result_path}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    result_path = str(tmp_path / "ddp_result")
    torch.multiprocessing.spawn(
        _worker, args=(free_port(), result_path), nprocs=WORLD_SIZE, join=True
    )
    expected_grads, expected_weights = train(build_model(), global_batches())
    trainable = sorted(n for n, g in expected_grads.items() if g is not None)
    assert trainable == sorted(
        [
            "embed.lora_A",
            "embed.lora_B",
            "qkv.lora_A",
            "qkv.lora_B",
            "qkv.bias",
            "proj.lora_A",
            "proj.lora_B",
            "proj.bias",
            "scale.ia3_l",
            "scale.bias",
        ]
    )
    initial = {n: p.detach() for n, p in build_model().named_parameters()}
    for rank in range(WORLD_SIZE):
        result = torch.load(f"{result_path}.{rank}")
        for name, grad in expected_grads.items():
            got = result["grads"][name]
            if grad is None:
                assert got is None, f"rank {rank}: frozen {name} got a gradient"
            else:
                torch.testing.assert_close(
                    got,
                    grad,
                    rtol=1e-10,
                    atol=1e-12,
                    msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}",
                )
        for name, weight in expected_weights.items():
            torch.testing.assert_close(result["weights"][name], weight, rtol=1e-10, atol=1e-12)
            if name not in trainable:
                assert torch.equal(result["weights"][name], initial[name]), name
