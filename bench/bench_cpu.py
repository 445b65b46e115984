"""CPU benchmark of the foundation issue: LoRA linear forward+backward versus the bare base matmuls.

    python bench/bench_cpu.py [--threads 2] [--repeat 30]

Case: float32, M=2048, IN=OUT=1024, r=16, bias, no dropout. Three timings, each the median of
`--repeat` runs after warm-up, with outputs preallocated so allocation is not timed:

* base      - the two matmuls a frozen linear layer needs: y = x·Wᵀ (forward), gx = g·W (backward)
* numpy     - the same LoRA formula written in NumPy (the forward and the backward to x, A, B, b)
* cpeft     - cpeft.functional.lora_linear_forward + lora_linear_backward (grads x, A, B, bias)

The thread count is fixed through OPENBLAS_NUM_THREADS before NumPy and cpeft load OpenBLAS.
"""
import argparse
import os
import platform
import subprocess
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    return p.parse_args()


def median_ms(fn, repeat):
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[len(samples) // 2], samples[0], samples[-1]


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "-C", here, "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    args = parse_args()
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import cpeft
    from cpeft import functional as F

    m, n, r = args.m, args.features, args.rank
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal((m, n), dtype=f32)
    w = rng.standard_normal((n, n), dtype=f32) / np.sqrt(n)
    b = rng.standard_normal(n, dtype=f32)
    a = rng.standard_normal((r, n), dtype=f32) / np.sqrt(n)
    bb = rng.standard_normal((n, r), dtype=f32)
    g = rng.standard_normal((m, n), dtype=f32)
    s = 2.0

    y = np.empty((m, n), f32)
    gx = np.empty((m, n), f32)

    def base():
        np.matmul(x, w.T, out=y)
        np.matmul(g, w, out=gx)

    xa = np.empty((m, r), f32)
    gb = np.empty((m, r), f32)
    ga = np.empty((r, n), f32)
    gbb = np.empty((n, r), f32)

    def numpy_lora():
        np.matmul(x, w.T, out=y)
        y += b
        np.matmul(x, a.T, out=xa)
        y += s * (xa @ bb.T)
        np.matmul(g, bb, out=gb)
        gb *= s
        np.matmul(gb.T, x, out=ga)
        np.matmul(g.T, xa, out=gbb)
        gbb *= s
        np.matmul(g, w, out=gx)
        gx += gb @ a
        g.sum(axis=0)

    c_y = np.empty((m, n), f32)
    c_xa = np.empty((m, r), f32)

    def cpeft_lora():
        F.lora_linear_forward(x, w, b, a, bb, s, out=c_y, out_xa=c_xa)
        F.lora_linear_backward(g, x, w, a, bb, c_xa, s, grad_x=True, grad_lora_a=True,
                               grad_lora_b=True, grad_bias=True)

    t_base = median_ms(base, args.repeat)
    t_numpy = median_ms(numpy_lora, args.repeat)
    t_cpeft = median_ms(cpeft_lora, args.repeat)

    print(f"# cpeft CPU benchmark ({time.strftime('%Y-%m-%d')}, commit {git_commit()})")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"OPENBLAS_NUM_THREADS={args.threads}; Python {platform.python_version()}, "
          f"NumPy {np.__version__}, cpeft {cpeft.__version__} ({cpeft.build_info()})")
    print(f"case: float32, M={m}, {n}->{n}, r={r}, bias, no dropout; median of {args.repeat} runs\n")
    print("| what | median ms | min ms | max ms | / base |")
    print("|---|---|---|---|---|")
    for name, t in (("base matmuls x·Wᵀ + g·W (NumPy)", t_base),
                    ("LoRA fwd+bwd, NumPy formula", t_numpy),
                    ("LoRA fwd+bwd, cpeft", t_cpeft)):
        print(f"| {name} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t[0] / t_base[0]:.3f} |")
    ok_base = t_cpeft[0] <= 1.15 * t_base[0]
    ok_numpy = t_cpeft[0] <= t_numpy[0]
    print(f"\ntarget: cpeft <= 1.15x base: {'met' if ok_base else 'MISSED'}; "
          f"cpeft <= NumPy formula: {'met' if ok_numpy else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
