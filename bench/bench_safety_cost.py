"""Per-call cost of the boundary's safety work (issue 12), for whatever cpeft is importable.

    PYTHONPATH=python python bench/bench_safety_cost.py

Run it against two builds (e.g. a worktree of the commit before and one after), alternating, and
compare: the figures are CPU time per call (time.process_time, OpenBLAS on one thread, best of 7
batches), which a shared machine disturbs less than wall time.

* tiny / small: _C.lora_linear_forward and _backward at M=1, 4->4, r=1 (host path only) and
  M=16, 256->256, r=8 with and without a bias (the per-call path of a small layer).
* embedding: lora_embedding and ia3_embedding forward and backward (grad_weight) over
  N=400,000 int64 indices, V=1000, D=64, r=8: the gathers and scatters that check every index
  where they use it.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import time  # noqa: E402

import numpy as np  # noqa: E402

import cpeft  # noqa: E402
from cpeft import _C  # noqa: E402
from cpeft import functional as F  # noqa: E402


def per_call(fn, n):
    fn()
    best = float("inf")
    for _ in range(7):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - start) / n)
    return best


def main():
    rng = np.random.default_rng(0)
    f32 = np.float32
    x1, w1 = np.ones((1, 4), f32), np.ones((4, 4), f32)
    a1, b1 = np.ones((1, 4), f32), np.ones((4, 1), f32)
    x = rng.standard_normal((16, 256), dtype=f32)
    w = rng.standard_normal((256, 256), dtype=f32)
    bias = rng.standard_normal(256, dtype=f32)
    a, b = rng.standard_normal((8, 256), dtype=f32), rng.standard_normal((256, 8), dtype=f32)
    y, xa = _C.lora_linear_forward(x, w, bias, a, b, 2.0)
    g = np.ones_like(y)
    rows = [
        (
            "tiny forward",
            "us",
            1e6,
            per_call(lambda: _C.lora_linear_forward(x1, w1, None, a1, b1, 2.0), 3000),
        ),
        (
            "small forward, bias",
            "us",
            1e6,
            per_call(lambda: _C.lora_linear_forward(x, w, bias, a, b, 2.0), 2000),
        ),
        (
            "small forward, no bias",
            "us",
            1e6,
            per_call(lambda: _C.lora_linear_forward(x, w, None, a, b, 2.0), 2000),
        ),
        (
            "small backward",
            "us",
            1e6,
            per_call(lambda: _C.lora_linear_backward(g, x, w, a, b, xa, 2.0), 2000),
        ),
    ]
    n, v, d, r = 400_000, 1000, 64, 8
    idx = rng.integers(0, v, n)
    we = rng.standard_normal((v, d), dtype=f32)
    ea, eb = rng.standard_normal((r, v), dtype=f32), rng.standard_normal((d, r), dtype=f32)
    l = rng.standard_normal(d, dtype=f32)
    ge = np.ones((n, d), f32)
    out = np.empty((n, d), f32)
    rows += [
        (
            "lora_embedding forward",
            "ms",
            1e3,
            per_call(lambda: F.lora_embedding_forward(idx, we, ea, eb, 1.0, out=out), 5),
        ),
        (
            "lora_embedding backward",
            "ms",
            1e3,
            per_call(lambda: F.lora_embedding_backward(ge, idx, ea, eb, 1.0, grad_weight=True), 5),
        ),
        (
            "ia3_embedding forward",
            "ms",
            1e3,
            per_call(lambda: F.ia3_embedding_forward(idx, we, l, out=out), 5),
        ),
        (
            "ia3_embedding backward",
            "ms",
            1e3,
            per_call(lambda: F.ia3_embedding_backward(ge, idx, we, l, grad_weight=True), 5),
        ),
    ]
    print(f"cpeft from {cpeft.__file__}")
    for name, unit, factor, seconds in rows:
        print(f"{name:26s} {seconds * factor:10.3f} {unit}")


if __name__ == "__main__":
    main()
