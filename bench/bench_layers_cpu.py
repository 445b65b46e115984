"""CPU benchmark of the torch layers: cpeft.Linear against loralib.Linear, float32.

    PYTHONPATH=python python bench/bench_layers_cpu.py [--threads 2] [--repeat 20]

Two cases, each the median over `--repeat` timed runs after warm-up, on identical parameters
(same seed, same nonzero adapters), in train mode with no dropout:

* large: forward + backward (grads of x, lora_A, lora_B) at M=2048, 1024 -> 1024, r=16
* small: per-call time of forward + backward at M=16, 256 -> 256, r=8 (Python and dispatch
  overhead dominate here)

The two layers' outputs and gradients are compared before timing, so a fast wrong result cannot
pass. Timed samples alternate between the two layers (the machine may be shared). Prints a
markdown table.
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    return parser.parse_args()


def build(library, torch, in_features, out_features, rank):
    torch.manual_seed(0)
    layer = library.Linear(in_features, out_features, r=rank, lora_alpha=2 * rank)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02)
    return layer


def step(layer, x, grad_out):
    y = layer(x)
    y.backward(grad_out)
    return y


def interleaved_medians(fns, repeat, inner):
    """Median seconds per call of each function; samples alternate between the functions so
    that load from other processes on a shared machine hits both sides alike."""
    for fn in fns.values():
        for _ in range(max(2, repeat // 5)):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_case(torch, libraries, m, in_features, out_features, rank, repeat, inner):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(m, in_features, generator=generator).requires_grad_(True)
    grad_out = torch.randn(m, out_features, generator=generator)
    layers = {
        name: build(lib, torch, in_features, out_features, rank) for name, lib in libraries.items()
    }
    results = {}
    for name, layer in layers.items():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y = step(layer, x, grad_out)
        results[name] = (
            y.detach(),
            x.grad.clone(),
            layer.lora_A.grad.clone(),
            layer.lora_B.grad.clone(),
        )
    reference = results["loralib"]
    for got, want in zip(results["cpeft"], reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    def step_of(layer):
        def once():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            step(layer, x, grad_out)

        return once

    return interleaved_medians(
        {name: step_of(layer) for name, layer in layers.items()}, repeat, inner
    )


def main():
    args = parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    import loralib
    import torch

    import cpeft as lora

    torch.set_num_threads(args.threads)
    libraries = {"loralib": loralib, "cpeft": lora}
    cases = [
        (
            "fwd+bwd M=2048 1024->1024 r=16",
            dict(m=2048, in_features=1024, out_features=1024, rank=16, inner=1),
        ),
        (
            "per call M=16 256->256 r=8",
            dict(m=16, in_features=256, out_features=256, rank=8, inner=50),
        ),
    ]
    print(
        f"CPU: {platform.processor() or platform.machine()}, threads={args.threads}, "
        f"torch {torch.__version__}, float32, median of {args.repeat}\n"
    )
    print("| case | loralib | cpeft | cpeft / loralib |")
    print("|---|---|---|---|")
    for label, params in cases:
        timings = run_case(torch, libraries, repeat=args.repeat, **params)
        ours, theirs = timings["cpeft"], timings["loralib"]
        unit, factor = ("ms", 1e3) if theirs > 1e-3 else ("us", 1e6)
        print(
            f"| {label} | {theirs * factor:.1f} {unit} | {ours * factor:.1f} {unit} | "
            f"{ours / theirs:.2f} |"
        )


if __name__ == "__main__":
    main()
