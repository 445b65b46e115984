"""DoRA benchmark (issue 10): forward + backward of cpeft's DoRA against cpeft's LoRA and peft's
DoRA, plus the memory each keeps for backward.

    PYTHONPATH=python python bench/bench_dora.py                      # CPU, float32
    PYTHONPATH=python python bench/bench_dora.py --m 4096 --features 4096
    PYTHONPATH=python python bench/bench_dora.py --device cuda --dtype bfloat16 --m 4096,16384 \\
        --features 4096                                               # the GPU rows

Rows, each forward + backward of one linear layer (OUT = IN = --features, rank --rank, with a
frozen bias, no dropout, train mode), gradients of x, lora_A, lora_B (and the magnitude for DoRA):

* cpeft LoRA   - cpeft.Linear(r=...)                         (the baseline of the ratio)
* cpeft DoRA   - cpeft.Linear(r=..., use_dora=True)
* peft DoRA    - peft 0.21's LoraConfig(use_dora=True) around torch.nn.Linear
* C core only  - cpeft.functional.lora_linear_* against dora_linear_* on preallocated tensors,
                 without autograd (the ratio of the compute alone)

Timings are medians of --repeat runs with the variants interleaved (a shared machine slows all
alike), with the fastest run beside the median (on a shared machine the fastest is the least
disturbed); on CUDA each run is synchronized. Before timing, cpeft's DoRA output and gradients are
checked against peft's. "kept" is the bytes of the tensors autograd saves for backward that are
neither parameters nor the input x (counted once per storage, via saved_tensors_hooks): what a
layer adds to the activation memory of training. Prints a markdown table with the machine,
versions, commit and date.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--m", default="2048", help="comma-separated row counts")
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch and OpenBLAS)")
    return p.parse_args()


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def interleaved_ms(fns, repeat, warmup, sync):
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return (
        {name: statistics.median(v) for name, v in samples.items()},
        {name: min(v) for name, v in samples.items()},
        {name: statistics.median(v) for name, v in cpu.items()},
    )


def main():
    args = parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    import peft
    import torch

    import cpeft
    from cpeft import functional as F

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, r = args.features, args.rank

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def make_layers():
        torch.manual_seed(0)
        lora = cpeft.Linear(n, n, r=r, lora_alpha=2 * r, device=device, dtype=dtype)
        dora = cpeft.Linear(n, n, r=r, lora_alpha=2 * r, use_dora=True, device=device, dtype=dtype)
        base = torch.nn.Sequential()
        base.add_module("lin", torch.nn.Linear(n, n, device=device, dtype=dtype))
        peft_model = peft.get_peft_model(
            base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], use_dora=True)
        )
        peft_layer = peft_model.base_model.model.lin
        with torch.no_grad():
            b = torch.randn(n, r, device=device, dtype=dtype) * 0.02
            for layer in (lora, dora):
                layer.weight.copy_(peft_layer.base_layer.weight)
                layer.bias.copy_(peft_layer.base_layer.bias)
                layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
                layer.lora_B.copy_(b)
            peft_layer.lora_B["default"].weight.copy_(b)
            magnitude = torch.linalg.norm(
                dora.weight.float() + dora.scaling * (b.float() @ dora.lora_A.float()), dim=1
            )
            magnitude = (magnitude * 1.05).to(dtype)
            dora.lora_magnitude_vector.copy_(magnitude)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
        for layer in (lora, dora):
            layer.bias.requires_grad_(False)
            layer.train()
        peft_model.train()
        return lora, dora, peft_model, peft_layer

    lora, dora, peft_model, peft_layer = make_layers()
    params = {id(p) for m in (lora, dora, peft_model) for p in m.parameters()}
    rows = []
    for m in [int(v) for v in args.m.split(",")]:
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(m, n, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
        grad_out = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)

        def step(module):
            def once():
                x.grad = None
                for p in module.parameters():
                    p.grad = None
                module(x).backward(grad_out)

            return once

        # correctness first: cpeft's DoRA against peft's
        step(dora)()
        ours = (x.grad.clone(), dora.lora_magnitude_vector.grad.clone(), dora.lora_B.grad.clone())
        step(peft_model)()
        theirs = (
            x.grad.clone(),
            peft_layer.lora_magnitude_vector["default"].weight.grad.clone(),
            peft_layer.lora_B["default"].weight.grad.clone(),
        )
        # Relative to the whole tensor. In fp16/bf16 both sides round differently (peft many
        # times over), so only a gross difference (a wrong result) stops the benchmark there.
        tol = 1e-1 if dtype in (torch.float16, torch.bfloat16) else 1e-4
        for name, a, b in zip(("grad x", "grad magnitude", "grad lora_B"), ours, theirs):
            err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
            print(f"# M={m}: {name} of cpeft's DoRA vs peft's: relative difference {err:.2e}")
            assert err <= tol, f"{name}: cpeft's DoRA differs from peft's by {err:.2e} relative"

        def kept_bytes(module):
            seen = {}

            def pack(t):
                if id(t) not in params and t.data_ptr() != x.data_ptr():
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = module(x)
            del y
            return sum(seen.values())

        kept = {
            "cpeft LoRA": kept_bytes(lora),
            "cpeft DoRA": kept_bytes(dora),
            "peft DoRA": kept_bytes(peft_model),
        }

        # the C core alone, on preallocated tensors
        w, bias = dora.weight.detach(), dora.bias.detach()
        a_, b_ = dora.lora_A.detach(), dora.lora_B.detach()
        mag, xs = dora.lora_magnitude_vector.detach(), x.detach()
        stream = torch.cuda.current_stream().cuda_stream if device.type == "cuda" else None
        y_buf, base_buf = torch.empty_like(grad_out), torch.empty_like(grad_out)
        xa_buf, norm_buf = (
            torch.empty(m, r, device=device, dtype=dtype),
            torch.empty(n, device=device, dtype=dtype),
        )
        gx, ga, gb, gm = (
            torch.empty_like(xs),
            torch.empty_like(a_),
            torch.empty_like(b_),
            torch.empty_like(mag),
        )
        sq = F.dora_weight_sq_norm(w, stream=stream)

        def core_lora():
            F.lora_linear_forward(
                xs, w, bias, a_, b_, dora.scaling, out=y_buf, out_xa=xa_buf, stream=stream
            )
            F.lora_linear_backward(
                grad_out,
                xs,
                w,
                a_,
                b_,
                xa_buf,
                dora.scaling,
                grad_x=gx,
                grad_lora_a=ga,
                grad_lora_b=gb,
                stream=stream,
            )

        def core_dora():
            F.dora_linear_forward(
                xs,
                w,
                bias,
                a_,
                b_,
                mag,
                dora.scaling,
                weight_sq_norm=sq,
                out=y_buf,
                out_xa=xa_buf,
                out_base=base_buf,
                out_norm=norm_buf,
                stream=stream,
            )
            F.dora_linear_backward(
                grad_out,
                xs,
                w,
                a_,
                b_,
                mag,
                norm_buf,
                xa_buf,
                base_buf,
                dora.scaling,
                grad_x=gx,
                grad_lora_a=ga,
                grad_lora_b=gb,
                grad_magnitude=gm,
                stream=stream,
            )

        variants = {
            "cpeft LoRA": step(lora),
            "cpeft DoRA": step(dora),
            "peft DoRA": step(peft_model),
            "core LoRA": core_lora,
            "core DoRA": core_dora,
        }
        times, fastest, cpu_times = interleaved_ms(variants, args.repeat, args.warmup, sync)
        rows.append((m, times, fastest, kept, cpu_times))

    print(
        f"# bench_dora {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"commit {git_commit()}"
    )
    machine = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads"
    )
    print(
        f"# {machine}; torch {torch.__version__}, peft {peft.__version__}, "
        f"{cpeft.build_info()['blas']}; {args.dtype}, {n}->{n}, r={r}, bias frozen, "
        f"no dropout, median of {args.repeat}"
    )
    print()
    print("Times: median (fastest) over the runs; ratios of medians (of fastest).")
    print()
    print(
        "| M | cpeft LoRA | cpeft DoRA | peft DoRA | DoRA / LoRA (cpeft) | peft DoRA / cpeft DoRA "
        "| C core: DoRA / LoRA | kept: cpeft LoRA | kept: cpeft DoRA | kept: peft DoRA |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    mib = float(1 << 20)

    def ms(name, t, f):
        return f"{t[name]:.2f} ({f[name]:.2f}) ms"

    def ratio(a, b, t, f):
        return f"{t[a] / t[b]:.3f} ({f[a] / f[b]:.3f})"

    for m, t, f, k, _ in rows:
        print(
            f"| {m} | {ms('cpeft LoRA', t, f)} | {ms('cpeft DoRA', t, f)} | "
            f"{ms('peft DoRA', t, f)} | {ratio('cpeft DoRA', 'cpeft LoRA', t, f)} | "
            f"{ratio('peft DoRA', 'cpeft DoRA', t, f)} | "
            f"{ratio('core DoRA', 'core LoRA', t, f)} | {k['cpeft LoRA'] / mib:.2f} MiB | "
            f"{k['cpeft DoRA'] / mib:.2f} MiB | {k['peft DoRA'] / mib:.2f} MiB |"
        )
    if device.type == "cpu":
        # Process CPU time (all threads) is what a time-sliced, shared machine disturbs least.
        print()
        print(
            "| M | CPU time: cpeft LoRA | cpeft DoRA | peft DoRA | DoRA / LoRA | C core DoRA / LoRA |"
        )
        print("|---|---|---|---|---|---|")
        for m, _, _, _, c in rows:
            print(
                f"| {m} | {c['cpeft LoRA']:.2f} ms | {c['cpeft DoRA']:.2f} ms | "
                f"{c['peft DoRA']:.2f} ms | {c['cpeft DoRA'] / c['cpeft LoRA']:.3f} | "
                f"{c['core DoRA'] / c['core LoRA']:.3f} |"
            )


if __name__ == "__main__":
    main()
