"""FSDP2 (torch.distributed.fsdp.fully_shard) over a model with cpeft LoRA layers from the peft
API, on two CPU processes with gloo: the adapter gradients and weights equal one process on the
same global batch, and the adapter saved from the sharded model loads in peft with the same
outputs."""

import socket

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
fsdp = pytest.importorskip("torch.distributed.fsdp")
hf_peft = pytest.importorskip("peft")
nn = torch.nn

import cpeft  # noqa: E402

WORLD_SIZE = 2
STEPS = 3
GLOBAL_BATCH = 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        hidden = self.embed(tokens)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden.mean(1))


CONFIG = dict(r=2, lora_alpha=4, target_modules=["up", "down"], rank_pattern={"blocks.1.down": 4})


def build_model():
    torch.manual_seed(0)
    model = cpeft.get_peft_model(TinyModel().double(), cpeft.LoraConfig(**CONFIG))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
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


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def train(model, batches, rank=0, world_size=1):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    first_grads = None
    share = GLOBAL_BATCH // world_size
    for tokens, labels in batches:
        rows = slice(rank * share, (rank + 1) * share)
        # FSDP reduce-scatters the mean over ranks: each rank's loss is over its own share.
        loss = nn.functional.cross_entropy(model(tokens[rows]), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if first_grads is None:
            first_grads = {
                n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None
            }
        optimizer.step()
    weights = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    return first_grads, weights


def _worker(rank, port, result_path, adapter_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        model = build_model()
        for block in model.base_model.model.blocks:
            fsdp.fully_shard(block)
        fsdp.fully_shard(model)
        grads, weights = train(model, global_batches(), rank, WORLD_SIZE)
        model.save_pretrained(adapter_dir, is_main_process=rank == 0)
        torch.save({"grads": grads, "weights": weights}, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp2_two_processes_match_one_process_and_save_loads_in_peft(tmp_path):
    result_path, adapter_dir = str(tmp_path / "fsdp_result"), str(tmp_path / "adapter")
    torch.multiprocessing.spawn(
        _worker, args=(free_port(), result_path, adapter_dir), nprocs=WORLD_SIZE, join=True
    )
    single = build_model()
    expected_grads, expected_weights = train(single, global_batches())
    assert sorted(expected_grads) == sorted(n for n, p in single.named_parameters() if "lora_" in n)
    for rank in range(WORLD_SIZE):
        result = torch.load(f"{result_path}.{rank}")
        assert sorted(result["grads"]) == sorted(expected_grads)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(
                result["grads"][name],
                grad,
                rtol=1e-10,
                atol=1e-12,
                msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}",
            )
        for name, weight in expected_weights.items():
            torch.testing.assert_close(result["weights"][name], weight, rtol=1e-10, atol=1e-12)

    torch.manual_seed(0)
    theirs = hf_peft.PeftModel.from_pretrained(TinyModel().double(), adapter_dir).eval()
    tokens = global_batches()[0][0]
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens), single.eval()(tokens), rtol=1e-10, atol=1e-12)
