"""Host cost of one cpeft.Linear fwd+bwd at a tiny shape (M=16, 64->64, r=8, float32, no bias),
against the frozen nn.Linear of the same shape, on the CPU (issue 8, item 2; the CUDA twin of
this row is ../shared/gpu-runs/host_path.py).

    PYTHONPATH=python python bench/bench_host_path.py                  # the importable cpeft
    python bench/bench_host_path.py --compare /other/checkout/python   # also another build

At this shape the arithmetic is negligible: the figure is the per-call path (Python, autograd,
the C boundary). CPU time per step (time.process_time, torch and OpenBLAS on one thread), best of
9 batches of 400 steps, the layer and nn.Linear measured alternately so both see the same machine.
With --compare each build runs in its own process, alternately, and one table is printed. The
last column is an autograd.Function that computes nothing on the same inputs: the floor of any
Python-level autograd node, against which the rest of the layer's cost can be read.
Then the raw C calls alone (forward, backward) at this shape and at M=1, 4->4, r=1.
--profile adds a cProfile of 300 layer steps (tottime) for the importable build.
"""

import argparse
import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

M, IN, OUT, R = 16, 64, 64, 8
BATCHES, STEPS = 9, 400


def measure():
    """(layer, nn.Linear, empty Function) us/step for the cpeft on sys.path."""
    import time

    import torch
    import torch.nn as nn

    import cpeft

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = cpeft.Linear(IN, OUT, r=R, lora_alpha=16, bias=False)
    with torch.no_grad():
        layer.lora_B.normal_()
    base = nn.Linear(IN, OUT, bias=False).requires_grad_(False)
    x = torch.randn(M, IN, requires_grad=True)
    grad = torch.randn(M, OUT)

    def layer_step():
        x.grad = None
        layer.lora_A.grad = None
        layer.lora_B.grad = None
        layer(x).backward(grad)

    def base_step():
        x.grad = None
        base(x).backward(grad)

    class Empty(torch.autograd.Function):
        """The floor of any Python autograd.Function on these inputs: saves them, allocates
        the output and the three gradients, computes nothing."""

        @staticmethod
        def forward(ctx, x, weight, lora_a, lora_b):
            ctx.save_for_backward(x, weight, lora_a, lora_b)
            return x.new_empty((M, OUT))

        @staticmethod
        def backward(ctx, grad_out):
            x, _, lora_a, lora_b = ctx.saved_tensors
            return (x.new_empty((M, IN)), None, x.new_empty((R, IN)), x.new_empty((OUT, R)))

    def empty_step():
        x.grad = None
        layer.lora_A.grad = None
        layer.lora_B.grad = None
        Empty.apply(x, layer.weight, layer.lora_A, layer.lora_B).backward(grad)

    best = {layer_step: float("inf"), base_step: float("inf"), empty_step: float("inf")}
    for fn in best:
        for _ in range(50):
            fn()
    for _ in range(BATCHES):
        for fn in best:
            start = time.process_time()
            for _ in range(STEPS):
                fn()
            best[fn] = min(best[fn], (time.process_time() - start) / STEPS)
    return (best[layer_step] * 1e6, best[base_step] * 1e6, best[empty_step] * 1e6, layer_step)


def c_calls():
    """us per raw _C.lora_linear_forward / _backward call (capsules included) at this shape and
    at M=1, 4->4, r=1 (the fixed cost of a call)."""
    import time

    import torch
    from torch.utils.dlpack import to_dlpack as dl

    from cpeft import _C

    def per_call(fn, n=3000):
        best = float("inf")
        for _ in range(7):
            start = time.process_time()
            for _ in range(n):
                fn()
            best = min(best, (time.process_time() - start) / n)
        return best * 1e6

    rows = []
    for m, n_in, n_out, r in ((M, IN, OUT, R), (1, 4, 4, 1)):
        x, w, g = torch.randn(m, n_in), torch.randn(n_out, n_in), torch.randn(m, n_out)
        a, b = torch.randn(r, n_in), torch.randn(n_out, r)
        y, xa = torch.empty(m, n_out), torch.empty(m, r)
        gx, ga, gb = torch.empty(m, n_in), torch.empty(r, n_in), torch.empty(n_out, r)

        def forward():
            _C.lora_linear_forward(dl(x), dl(w), None, dl(a), dl(b), 2.0, out=dl(y), out_xa=dl(xa))

        def backward():
            _C.lora_linear_backward(
                dl(g),
                dl(x),
                dl(w),
                dl(a),
                dl(b),
                dl(xa),
                2.0,
                grad_x=dl(gx),
                grad_lora_a=dl(ga),
                grad_lora_b=dl(gb),
            )

        rows.append(
            f"M={m} {n_in}->{n_out} r={r}: forward {per_call(forward):.1f} us, "
            f"backward {per_call(backward):.1f} us"
        )
    print("raw C calls (capsules included): " + "; ".join(rows))


def profile(layer_step):
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(300):
        layer_step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    print(out.getvalue())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--compare",
        metavar="PYTHON_DIR",
        help="also measure the cpeft package found in this directory",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        layer_us, base_us, empty_us, _ = measure()
        print(f"{layer_us} {base_us} {empty_us}")
        return
    import cpeft

    here = os.path.dirname(os.path.dirname(cpeft.__file__))
    builds = [("this build", here)] + ([("compared", args.compare)] if args.compare else [])
    results = {label: [] for label, _ in builds}
    for _ in range(3):
        for label, path in builds:
            env = dict(os.environ, PYTHONPATH=path)
            out = subprocess.run(
                [sys.executable, __file__, "--child"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            results[label].append(tuple(float(v) for v in out))
    print(
        f"cpeft.Linear fwd+bwd, M={M} {IN}->{OUT} r={R} float32, CPU time per step "
        "(best of 9 batches; 3 alternating processes per build, median shown)"
    )
    print("| build | cpeft.Linear us | nn.Linear us | ratio | empty autograd.Function us (ratio) |")
    print("|---|---|---|---|---|")
    for label, path in builds:
        runs = sorted(results[label], key=lambda r: r[0] / r[1])
        layer_us, base_us, empty_us = runs[len(runs) // 2]
        print(
            f"| {label} ({path}) | {layer_us:.1f} | {base_us:.1f} | {layer_us / base_us:.2f}x "
            f"| {empty_us:.1f} ({empty_us / base_us:.2f}x) |"
        )
    c_calls()
    if args.profile:
        profile(measure()[3])


if __name__ == "__main__":
    main()
