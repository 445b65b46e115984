"""Adapter-dtype benchmark (issue 13, item 1): float32 adapters on a bfloat16 base layer.

One linear layer, forward + backward in train mode (gradients to the input and, for the adapted
layers, to lora_A and lora_B), against the frozen bf16 layer alone (gradient to the input only):

  * frozen      nn.Linear in bf16, weight frozen
  * cpeft fp32  cpeft.get_peft_model defaults: float32 adapters (autocast_adapter_dtype=True)
  * cpeft bf16  the same with autocast_adapter_dtype=False
  * peft fp32   Hugging Face peft with its defaults (float32 adapters; x is cast to float32)

LoraConfig(r=R, lora_alpha=2R, lora_dropout=0.05, init_lora_weights=False) for both libraries,
as in the issue's row (peft measured 3.29x the frozen layer on an H100). Each figure is the
median of --reps timed repetitions after warm-up; the cases alternate while timed. On CUDA the
time is CUDA-event time; on the CPU wall time (there the core computes in float32: the bf16
operands are widened per call, see cpeft._autograd).

Usage: python bench/bench_adapter_dtype.py [--device cuda|cpu] [--m 4096] [--features 4096]
       [--r 16] [--reps 50]
Prints a markdown table with the device, versions, commit and date.
"""

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

import cpeft

try:
    import peft
except ImportError:
    peft = None


def commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def base_layer(features, device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, features, bias=False)).to(
        device=device, dtype=torch.bfloat16
    )


def adapted(library, features, r, device, autocast):
    config = library.LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.05, init_lora_weights=False, target_modules=["0"]
    )
    model = library.get_peft_model(
        base_layer(features, device), config, autocast_adapter_dtype=autocast
    )
    return model.train()


def frozen(features, device, dtype=torch.bfloat16):
    model = base_layer(features, device).to(dtype)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.train()


def step_fn(model, x, g):
    def step():
        x.grad = None
        for parameter in model.parameters():
            parameter.grad = None
        model(x).backward(g)

    return step


def timer(device):
    if device == "cuda":

        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:

        def timed(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

    return timed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--m", type=int, default=None, help="rows of x (default 4096 on CUDA, 1024 on CPU)"
    )
    parser.add_argument("--features", type=int, default=None, help="in = out (default 4096 / 1024)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    device = args.device
    cuda = device == "cuda"
    m = args.m or (4096 if cuda else 1024)
    features = args.features or (4096 if cuda else 1024)
    warnings.simplefilter("ignore")

    cases = {
        "frozen bf16 layer": frozen(features, device),
        "cpeft, fp32 adapters": adapted(cpeft, features, args.r, device, True),
        "cpeft, bf16 adapters": adapted(cpeft, features, args.r, device, False),
    }
    if peft is not None:
        cases["peft 0.21 defaults, fp32 adapters"] = adapted(peft, features, args.r, device, True)
    torch.manual_seed(1)
    x = torch.randn(m, features, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, features, device=device, dtype=torch.bfloat16)
    steps = {name: step_fn(model, x, g) for name, model in cases.items()}
    if not cuda:
        # torch's bf16 CPU GEMMs are slow where the CPU has no bf16 instructions, while cpeft's
        # CPU core computes in float32: the frozen float32 layer is the fairer yardstick there.
        x32 = x.detach().float().requires_grad_(True)
        steps["frozen layer in float32 (CPU yardstick)"] = step_fn(
            frozen(features, device, torch.float32), x32, g.float()
        )
    timed = timer(device)
    for step in steps.values():
        for _ in range(3):
            step()
    if cuda:
        torch.cuda.synchronize()
    times = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            times[name].append(timed(step))
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["frozen bf16 layer"]

    where = (
        torch.cuda.get_device_name() if cuda else f"CPU, torch threads {torch.get_num_threads()}"
    )
    print(
        f"adapter-dtype benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"commit {commit()}, {where}"
    )
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, cpeft {cpeft.__version__}, "
        f"peft {getattr(peft, '__version__', 'not installed')}"
    )
    print(
        f"bf16 base, M={m}, {features}x{features}, r={args.r}, lora_dropout=0.05, train mode, "
        f"fwd+bwd, median of {args.reps}"
    )
    print()
    yardstick = medians.get("frozen layer in float32 (CPU yardstick)")
    print("| case | fwd+bwd ms | / frozen bf16 |" + (" / frozen fp32 |" if yardstick else ""))
    print("|---|---|---|" + ("---|" if yardstick else ""))
    for name, value in medians.items():
        print(
            f"| {name} | {value:.3f} | {value / base:.2f}x |"
            + (f" {value / yardstick:.2f}x |" if yardstick else "")
        )


if __name__ == "__main__":
    main()
