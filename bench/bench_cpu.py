"""CPU benchmark of the foundation issue: LoRA linear forward+backward versus the bare base matmuls.

    python bench/bench_cpu.py [--threads 2] [--repeat 30]

Case: float32, M=2048, IN=OUT=1024, r=16, bias, no dropout. Three timings, each the median of
`--repeat` runs after warm-up (the three run
round-robin), with outputs preallocated so allocation is not timed:

* base      - the two matmuls a frozen linear layer needs: y = x·Wᵀ (forward), gx = g·W (backward),
              called through ctypes on the same OpenBLAS library cpeft uses (scipy-openblas32), so
              the ratio compares like with like; NumPy's matmuls (its own OpenBLAS build) are shown
              too
* numpy     - the same LoRA formula written in NumPy (the forward and the backward to x, A, B, b)
* cpeft     - cpeft.functional.lora_linear_forward + lora_linear_backward (grads x, A, B, bias)

The thread count is fixed through OPENBLAS_NUM_THREADS before NumPy and cpeft load OpenBLAS, and
OPENBLAS_THREAD_TIMEOUT=4 (cpeft's default) is set for both libraries: with two OpenBLAS thread
pools in one process, one pool's threads spinning after its call would slow the other's next call.
"""

import argparse
import os
import platform
import subprocess
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    return p.parse_args()


def interleaved_ms(fns, repeat):
    """Median, min and max wall time of each function, in ms. The functions run round-robin, so
    a slow spell of the (shared, virtual) machine hits every variant alike instead of whichever
    block of runs it happens to fall in."""
    for _ in range(3):
        for fn in fns:
            fn()
    samples = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, samples):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    stats = []
    for out in samples:
        out.sort()
        stats.append((out[len(out) // 2], out[0], out[-1]))
    return stats


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    args = parse_args()
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    import ctypes

    import numpy as np
    import scipy_openblas32

    import cpeft
    from cpeft import functional as F

    m, n, r = args.m, args.features, args.rank
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal((m, n), dtype=f32)
    w = rng.standard_normal((n, n), dtype=f32) / f32(np.sqrt(n))
    b = rng.standard_normal(n, dtype=f32)
    a = rng.standard_normal((r, n), dtype=f32) / f32(np.sqrt(n))
    bb = rng.standard_normal((n, r), dtype=f32)
    g = rng.standard_normal((m, n), dtype=f32)
    s = 2.0

    y = np.empty((m, n), f32)
    gx = np.empty((m, n), f32)

    blas = ctypes.CDLL(
        os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True))
    )
    sgemm = blas.scipy_cblas_sgemm
    sgemm.restype = None
    row_major, no_trans, trans = 101, 111, 112
    ptr = ctypes.c_void_p

    def blas_matmul(trans_b, a_mat, b_mat, c_mat, k):
        rows, cols = c_mat.shape
        sgemm(
            row_major,
            no_trans,
            trans_b,
            rows,
            cols,
            k,
            ctypes.c_float(1.0),
            ptr(a_mat.ctypes.data),
            a_mat.shape[1],
            ptr(b_mat.ctypes.data),
            b_mat.shape[1],
            ctypes.c_float(0.0),
            ptr(c_mat.ctypes.data),
            c_mat.shape[1],
        )

    def base():
        blas_matmul(trans, x, w, y, n)
        blas_matmul(no_trans, g, w, gx, n)

    def numpy_base():
        np.matmul(x, w.T, out=y)
        np.matmul(g, w, out=gx)

    xa = np.empty((m, r), f32)
    gb = np.empty((m, r), f32)
    ga = np.empty((r, n), f32)
    gbb = np.empty((n, r), f32)

    def numpy_lora():
        np.matmul(x, w.T, out=y)
        np.add(y, b, out=y)
        np.matmul(x, a.T, out=xa)
        np.add(y, s * (xa @ bb.T), out=y)
        np.matmul(g, bb, out=gb)
        np.multiply(gb, s, out=gb)
        np.matmul(gb.T, x, out=ga)
        np.matmul(g.T, xa, out=gbb)
        np.multiply(gbb, s, out=gbb)
        np.matmul(g, w, out=gx)
        np.add(gx, gb @ a, out=gx)
        g.sum(axis=0)

    c_y = np.empty((m, n), f32)
    c_xa = np.empty((m, r), f32)

    def cpeft_lora():
        F.lora_linear_forward(x, w, b, a, bb, s, out=c_y, out_xa=c_xa)
        F.lora_linear_backward(
            g, x, w, a, bb, c_xa, s, grad_x=True, grad_lora_a=True, grad_lora_b=True, grad_bias=True
        )

    t_base, t_numpy_base, t_numpy, t_cpeft = interleaved_ms(
        (base, numpy_base, numpy_lora, cpeft_lora), args.repeat
    )

    print(f"# cpeft CPU benchmark ({time.strftime('%Y-%m-%d')}, commit {git_commit()})")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"OPENBLAS_NUM_THREADS={args.threads}; Python {platform.python_version()}, "
        f"NumPy {np.__version__}, cpeft {cpeft.__version__} ({cpeft.build_info()})"
    )
    print(
        f"case: float32, M={m}, {n}->{n}, r={r}, bias, no dropout; median of {args.repeat} "
        "interleaved runs\n"
    )
    print("| what | median ms | min ms | max ms | / base |")
    print("|---|---|---|---|---|")
    for name, t in (
        ("base matmuls x·Wᵀ + g·W (cpeft's OpenBLAS)", t_base),
        ("base matmuls x·Wᵀ + g·W (NumPy)", t_numpy_base),
        ("LoRA fwd+bwd, NumPy formula", t_numpy),
        ("LoRA fwd+bwd, cpeft", t_cpeft),
    ):
        print(f"| {name} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t[0] / t_base[0]:.3f} |")
    ok_base = t_cpeft[0] <= 1.15 * t_base[0]
    ok_numpy = t_cpeft[0] <= t_numpy[0]
    print(
        f"\ntarget: cpeft <= 1.15x base: {'met' if ok_base else 'MISSED'}; "
        f"cpeft <= NumPy formula: {'met' if ok_numpy else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
