"""Host cost of one cpeft.Linear fwd+bwd at a tiny shape (M=16, 64->64, r=8, float32, no bias),
against the frozen nn.Linear of the same shape, on the CPU (issue 8, item 2; the CUDA twin of
this row is ../shared/gpu-runs/host_path.py).

    PYTHONPATH=python python bench/bench_host_path.py                  # the importable cpeft
    python bench/bench_host_path.py --compare /other/checkout/python   # also another build

At this shape the figure is mostly the per-call path (Python, autograd, the C boundary); the
arithmetic is small but not nothing on a CPU (OpenBLAS's compute kernel took 3.6% of a perf
profile of 100,000 layer steps, docs/benchmarks.md). CPU time per step (time.process_time, torch
and OpenBLAS on one thread), best of 9 batches of 400 steps, the layer and nn.Linear measured
alternately so both see the same machine.
This build is measured twice: as the layers run by default, on the C++ autograd node of
cpeft._torch_node, and with CPEFT_TORCH_NODE=0, on the Python autograd.Function.
With --compare each build runs in its own process, alternately, and one table is printed. Three
autograd.Functions on the same inputs follow: one that saves them and allocates the output and
the three gradients but computes nothing (what any Python-level node of this layer pays before
its C calls), one that only passes its gradient through (the bare cost of a Python node, to set
beside nn.Linear's C++ node), and one that makes the layer's two C calls with nothing else (no
module, no dtype rule; the layer minus it is what the layer's Python costs), alone and as the
forward of a bare nn.Module (the floor of any layer on such a Function: nn.Linear's step pays the
module call as well). Every step clears the gradients through references bound once, as an
optimizer does.
Then the raw C calls alone (forward, backward) at this shape and at M=1, 4->4, r=1, each called
back to back (warm caches) and each after an nn.Linear fwd+bwd step (the caches as a training
step leaves them; only the call itself is timed there).
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
    """(layer, nn.Linear, empty Function, pass-through Function, Function with the layer's C
    calls, that Function in a Module, then the ladder's three rungs) us/step for the cpeft on
    sys.path, and the layer step function."""
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

    # The adapters are bound once, as an optimizer holds its parameters: reaching them through
    # layer.lora_A in every step is Module.__getattr__ (4-6 µs a step on the development VM,
    # docs/benchmarks.md), which is the benchmark's cost, not the layer's fwd+bwd.
    lora_a, lora_b = layer.lora_A, layer.lora_B

    def layer_step():
        x.grad = None
        lora_a.grad = None
        lora_b.grad = None
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
        lora_a.grad = None
        lora_b.grad = None
        Empty.apply(x, layer.weight, lora_a, lora_b).backward(grad)

    class PassThrough(torch.autograd.Function):
        """A Python node and nothing else: the output is allocated, the gradient handed on."""

        @staticmethod
        def forward(ctx, x):
            return x.new_empty((M, OUT))

        @staticmethod
        def backward(ctx, grad_out):
            return grad_out

    def pass_through_step():
        x.grad = None
        PassThrough.apply(x).backward(grad)

    from cpeft import _C

    class SameCalls(torch.autograd.Function):
        """The layer's two C calls in a Function with nothing else: this shape's sizes written
        in, no module, no dtype rule, no settings. Beside the layer, what its Python costs."""

        @staticmethod
        def forward(ctx, x, weight, lora_a, lora_b):
            y, xa = x.new_empty(M, OUT), x.new_empty(M, R)
            _C.lora_linear_forward(x, weight, None, lora_a, lora_b, 2.0, out=y, out_xa=xa)
            ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
            return y

        @staticmethod
        def backward(ctx, grad_out):
            x, weight, lora_a, lora_b, xa = ctx.saved_tensors
            grads = x.new_empty(M, IN), lora_a.new_empty(R, IN), lora_b.new_empty(OUT, R)
            _C.lora_linear_backward(
                grad_out,
                x,
                weight,
                lora_a,
                lora_b,
                xa,
                2.0,
                grad_x=grads[0],
                grad_lora_a=grads[1],
                grad_lora_b=grads[2],
            )
            return grads[0], None, grads[1], grads[2]

    # Entered as the layer enters its own Function, with the parameters bound once: the column
    # is the C calls' share, not attribute lookups or Function.apply's Python wrapper.
    eager_apply = getattr(cpeft._autograd, "_eager_apply", lambda function: function.apply)
    same_calls = eager_apply(SameCalls)
    weight = layer.weight

    def same_calls_step():
        x.grad = None
        lora_a.grad = None
        lora_b.grad = None
        same_calls(x, weight, lora_a, lora_b).backward(grad)

    class SameCallsModule(nn.Module):
        """That Function as a module's forward, its parameters read from ``_parameters``: the
        floor of any layer built on it (nn.Linear pays the module call too)."""

        def __init__(self):
            super().__init__()
            self.weight, self.lora_A, self.lora_B = weight, lora_a, lora_b

        def forward(self, x):
            params = self._parameters
            return same_calls(x, params["weight"], params["lora_A"], params["lora_B"])

    same_calls_module = SameCallsModule()

    def same_calls_module_step():
        x.grad = None
        lora_a.grad = None
        lora_b.grad = None
        same_calls_module(x).backward(grad)

    # The layer's own path entered one level further out each time (the ladder table): its
    # Function with the settings tuple written in, then _autograd.lora_linear (dtype rule,
    # compile test, settings), then Linear.forward without the module call.
    ag = cpeft._autograd
    settings = (layer.scaling, False, None, 0.0, 0)

    def function_step():
        x.grad = None
        lora_a.grad = None
        lora_b.grad = None
        ag._lora_linear_apply(x, weight, None, lora_a, lora_b, settings).backward(grad)

    def lora_linear_step():
        x.grad = None
        lora_a.grad = None
        lora_b.grad = None
        ag.lora_linear(
            x,
            weight,
            None,
            lora_a,
            lora_b,
            scale=layer.scaling,
            fan_in_fan_out=False,
            enable_lora=None,
            dropout=0.0,
        ).backward(grad)

    def forward_step():
        x.grad = None
        lora_a.grad = None
        lora_b.grad = None
        layer.forward(x).backward(grad)

    # The C++ autograd node called directly: the floor of the layer's path where it is in use
    # (the Function column's twin). Without it, the step of the Function stands in.
    node = getattr(ag, "_lora_linear_node", None)
    scale = float(layer.scaling)

    def node_step():
        x.grad = None
        lora_a.grad = None
        lora_b.grad = None
        node(x, weight, None, lora_a, lora_b, scale, False, 0.0, 0).backward(grad)

    best = {
        layer_step: float("inf"),
        base_step: float("inf"),
        empty_step: float("inf"),
        pass_through_step: float("inf"),
        same_calls_step: float("inf"),
        same_calls_module_step: float("inf"),
        function_step: float("inf"),
        lora_linear_step: float("inf"),
        forward_step: float("inf"),
        node_step if node is not None else function_step: float("inf"),
    }
    for fn in best:
        for _ in range(50):
            fn()
    for _ in range(BATCHES):
        for fn in best:
            start = time.process_time()
            for _ in range(STEPS):
                fn()
            best[fn] = min(best[fn], (time.process_time() - start) / STEPS)
    steps = (
        layer_step,
        base_step,
        empty_step,
        pass_through_step,
        same_calls_step,
        same_calls_module_step,
        function_step,
        lora_linear_step,
        forward_step,
        node_step if node is not None else function_step,
    )
    return tuple(best[step] * 1e6 for step in steps) + (layer_step,)


def c_calls():
    """us per raw _C.lora_linear_forward / _backward call on torch tensors (their export through
    torch's DLPack C exchange API included) at this shape and at M=1, 4->4, r=1 (the fixed cost
    of a call): back to back, and each after an nn.Linear fwd+bwd step of this shape."""
    import time

    import torch
    import torch.nn as nn

    from cpeft import _C

    base = nn.Linear(IN, OUT, bias=False).requires_grad_(False)
    step_x, step_grad = torch.randn(M, IN, requires_grad=True), torch.randn(M, OUT)

    def training_step():
        step_x.grad = None
        base(step_x).backward(step_grad)

    def per_call(fn, n=3000):
        best = float("inf")
        for _ in range(7):
            start = time.process_time()
            for _ in range(n):
                fn()
            best = min(best, (time.process_time() - start) / n)
        return best * 1e6

    def per_call_after_step(fn, n=1000):
        best = float("inf")
        for _ in range(7):
            total = 0
            for _ in range(n):
                training_step()
                start = time.perf_counter_ns()
                fn()
                total += time.perf_counter_ns() - start
            best = min(best, total / n)
        return best / 1e3

    rows = []
    for m, n_in, n_out, r in ((M, IN, OUT, R), (1, 4, 4, 1)):
        x, w, g = torch.randn(m, n_in), torch.randn(n_out, n_in), torch.randn(m, n_out)
        a, b = torch.randn(r, n_in), torch.randn(n_out, r)
        y, xa = torch.empty(m, n_out), torch.empty(m, r)
        gx, ga, gb = torch.empty(m, n_in), torch.empty(r, n_in), torch.empty(n_out, r)

        def forward():
            _C.lora_linear_forward(x, w, None, a, b, 2.0, out=y, out_xa=xa)

        def backward():
            _C.lora_linear_backward(
                g,
                x,
                w,
                a,
                b,
                xa,
                2.0,
                grad_x=gx,
                grad_lora_a=ga,
                grad_lora_b=gb,
            )

        rows.append(
            f"M={m} {n_in}->{n_out} r={r}: forward {per_call(forward):.1f} us "
            f"({per_call_after_step(forward):.1f} after a step), "
            f"backward {per_call(backward):.1f} us ({per_call_after_step(backward):.1f} after a step)"
        )
    print("raw C calls (torch tensors, exported by the boundary): " + "; ".join(rows))


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
        print(" ".join(str(v) for v in measure()[:10]))
        return
    import cpeft

    here = os.path.dirname(os.path.dirname(cpeft.__file__))
    builds = [
        ("this build", here, {}),
        ("this build, Python Function path", here, {"CPEFT_TORCH_NODE": "0"}),
    ] + ([("compared", args.compare, {})] if args.compare else [])
    results = {label: [] for label, _, _ in builds}
    for _ in range(3):
        for label, path, extra_env in builds:
            env = dict(os.environ, PYTHONPATH=path, **extra_env)
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
    print(
        "| build | cpeft.Linear us | nn.Linear us | ratio | empty autograd.Function us (ratio) "
        "| pass-through Function us (ratio) | Function with the same C calls us (ratio) "
        "| that Function in a Module us (ratio) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, path, _ in builds:
        runs = sorted(results[label], key=lambda r: r[0] / r[1])
        layer_us, base_us, *others = runs[len(runs) // 2]
        print(
            f"| {label} ({path}) | {layer_us:.1f} | {base_us:.1f} | {layer_us / base_us:.2f}x | "
            + " | ".join(f"{us:.1f} ({us / base_us:.2f}x)" for us in others[:4])
            + " |"
        )
    print(
        "\nThe layer's path entered one level further out each time (ratio to nn.Linear): the "
        "same-C-calls Function, in a bare Module, the layer's Function with its settings "
        "written in, the C++ node called directly (the Function again where the node is not in "
        "use), then _autograd.lora_linear, Linear.forward and the layer called as a module, "
        "which take the node where it is in use"
    )
    print(
        "| build | same C calls | in a Module | LoraLinearFunction | C++ node | lora_linear | "
        "Linear.forward | layer(x) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, _, _ in builds:
        runs = sorted(results[label], key=lambda r: r[0] / r[1])
        layer_us, base_us, _, _, same, module, function, lora_linear, forward, node = runs[
            len(runs) // 2
        ]
        rungs = (same, module, function, node, lora_linear, forward, layer_us)
        print(f"| {label} | " + " | ".join(f"{us / base_us:.2f}x" for us in rungs) + " |")
    c_calls()
    if args.profile:
        profile(measure()[-1])


if __name__ == "__main__":
    main()
