"""Mixed-adapter batches: one LoRA layer holding G adapters of rank r, every token (row) of the
batch using one of them, tokens shuffled across adapters. Forward + backward (gradients of x and
of every adapter) of

* cpeft, mixed: ``PeftModel(..., adapter_names=...)``'s layer path, all adapters in one grouped
  C call per product;
* cpeft, single: the same layer with one active adapter over the same tokens (the floor a
  mixed batch is compared with);
* peft, per-adapter loop: peft 0.21's ``lora.Linear`` with ``adapter_names`` (a gather, the
  adapter's products and a scatter per adapter, in Python). peft refuses ``adapter_names`` in
  training at the model level; its layer is called directly here so that its backward can be
  timed as well.

    PYTHONPATH=python python bench/bench_mixed_adapters.py --device cpu --m 2048 --dim 1024
    PYTHONPATH=python python bench/bench_mixed_adapters.py --device cuda --m 4096 --dim 4096 --dtype bfloat16

Outputs and gradients of the three are compared before timing (so a fast wrong result cannot
pass); timed samples alternate between the variants. Prints a markdown table of medians.
"""

import argparse
import os
import platform
import statistics
import time


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--m", type=int, default=2048, help="tokens (rows) in the batch")
    parser.add_argument("--dim", type=int, default=1024, help="in = out features of the layer")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="process: CPU time of this process (all its threads), which other "
        "processes on a shared machine disturb much less than wall time",
    )
    return parser.parse_args()


def main():
    args = parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    import peft
    import torch
    from torch import nn

    from cpeft import LoraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = [f"a{g}" for g in range(args.adapters)]

    def model_with_adapters(library):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(args.dim, args.dim)).to(device=device, dtype=dtype)
        make = get_peft_model if library == "cpeft" else peft.get_peft_model
        config = LoraConfig if library == "cpeft" else peft.LoraConfig
        model = make(
            base,
            config(r=args.rank, lora_alpha=2 * args.rank, target_modules=["0"]),
            adapter_name=names[0],
        )
        for name in names[1:]:
            model.add_adapter(
                name, config(r=args.rank, lora_alpha=2 * args.rank, target_modules=["0"])
            )
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pname, parameter in sorted(model.named_parameters()):
                if "lora_" in pname:
                    parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
                parameter.requires_grad_("lora_" in pname)
        return model.train(), model.get_base_model()[0]

    ours_model, ours = model_with_adapters("cpeft")
    _, theirs = model_with_adapters("peft")
    generator = torch.Generator().manual_seed(2)
    x = (
        torch.randn(args.m, args.dim, generator=generator)
        .to(device=device, dtype=dtype)
        .requires_grad_(True)
    )
    grad_out = torch.randn(args.m, args.dim, generator=generator).to(device=device, dtype=dtype)
    token_names = [
        names[i % args.adapters] for i in torch.randperm(args.m, generator=generator).tolist()
    ]

    def cpeft_mixed():
        ours._mixed_adapter_names = token_names
        try:
            return ours(x)
        finally:
            ours._mixed_adapter_names = None

    def cpeft_single():
        return ours(x)

    def peft_loop():
        return theirs(x, adapter_names=token_names)

    variants = {
        "cpeft mixed (grouped)": cpeft_mixed,
        "cpeft single adapter": cpeft_single,
        "peft per-adapter loop": peft_loop,
    }
    layer_of = {
        "cpeft mixed (grouped)": ours,
        "cpeft single adapter": ours,
        "peft per-adapter loop": theirs,
    }

    def fwd_bwd(name):
        def once():
            x.grad = None
            layer_of[name].zero_grad(set_to_none=True)
            variants[name]().backward(grad_out)

        return once

    def synced(fn):
        def once():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return once

    # Correctness before timing: the mixed results of cpeft and peft agree.
    results = {}
    for name in ("cpeft mixed (grouped)", "peft per-adapter loop"):
        x.grad = None
        layer_of[name].zero_grad(set_to_none=True)
        y = variants[name]()
        y.backward(grad_out)
        grads = {
            n.split(".")[-2] + n.split(".")[0]: p.grad.clone()
            for n, p in layer_of[name].named_parameters()
            if p.grad is not None
        }
        results[name] = (y.detach().float(), x.grad.float().clone(), grads)
    relative = 3e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4

    def agree(got, want, what):
        # Tolerance relative to the largest magnitude: 16-bit sums over thousands of rows differ
        # between any two summation orders by about that much.
        torch.testing.assert_close(
            got, want, rtol=relative, atol=relative * float(want.abs().max()), msg=what
        )

    ours_r, theirs_r = results["cpeft mixed (grouped)"], results["peft per-adapter loop"]
    agree(ours_r[0], theirs_r[0], "y")
    agree(ours_r[1], theirs_r[1], "grad x")
    assert ours_r[2].keys() == theirs_r[2].keys() and len(ours_r[2]) == 2 * args.adapters
    for key in ours_r[2]:
        agree(ours_r[2][key].float(), theirs_r[2][key].float(), key)
    ours_model.set_adapter(names[0])
    for pname, parameter in ours.named_parameters():
        parameter.requires_grad_("lora_" in pname)

    samples = {name: {"fwd+bwd": [], "fwd": []} for name in variants}
    plans = {
        name: {"fwd+bwd": synced(fwd_bwd(name)), "fwd": synced(variants[name])} for name in variants
    }
    for _ in range(3):
        for name in variants:
            for plan in plans[name].values():
                plan()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    if args.clock == "process" and device.type == "cuda":
        raise SystemExit("--clock process measures CPU time; use --clock wall on a GPU")
    for _ in range(args.repeat):
        for name in variants:
            for kind, plan in plans[name].items():
                start = clock()
                if kind == "fwd":
                    with torch.no_grad():
                        plan()
                else:
                    plan()
                samples[name][kind].append(clock() - start)
    medians = {
        name: {kind: statistics.median(v) for kind, v in kinds.items()}
        for name, kinds in samples.items()
    }
    single = medians["cpeft single adapter"]
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, threads={args.threads}"
    )
    print(
        f"{where}; torch {torch.__version__}, peft {peft.__version__}; {args.dtype}; M={args.m}, "
        f"{args.dim}x{args.dim}, {args.adapters} adapters of rank {args.rank}, tokens shuffled; "
        f"median of {args.repeat}, {args.clock} time\n"
    )
    print("| variant | fwd+bwd | fwd (no grad) | fwd+bwd / cpeft single |")
    print("|---|---|---|---|")
    for name in variants:
        m = medians[name]
        print(
            f"| {name} | {m['fwd+bwd'] * 1e3:.2f} ms | {m['fwd'] * 1e3:.2f} ms | "
            f"{m['fwd+bwd'] / single['fwd+bwd']:.2f} |"
        )


if __name__ == "__main__":
    main()
