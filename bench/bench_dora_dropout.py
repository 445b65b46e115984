"""DoRA linear forward with dropout on the CPU, against the same call without dropout (the C core
alone, through cpeft.functional, NumPy float32, outputs preallocated).

    PYTHONPATH=python python bench/bench_dora_dropout.py [--m 2048] [--features 1024] [--rank 16]

With dropout the forward follows peft's training formula (the base product runs on x and again on
the dropped x), so it does one more base-sized GEMM than without; the ratio shows what the
dropout path costs beyond that. Medians of --repeat interleaved runs, one OpenBLAS thread.
"""

import argparse
import os
import statistics
import subprocess
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()

    import numpy as np

    import cpeft
    from cpeft import functional as F

    rng = np.random.default_rng(0)
    m, n, r = args.m, args.features, args.rank
    x = rng.standard_normal((m, n), dtype=np.float32)
    w = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    a = (rng.standard_normal((r, n)) / np.sqrt(n)).astype(np.float32)
    b = (rng.standard_normal((n, r)) / np.sqrt(r)).astype(np.float32)
    mag = np.linalg.norm(w, axis=1).astype(np.float32)
    out, out_xa, out_norm = (
        np.empty((m, n), np.float32),
        np.empty((m, r), np.float32),
        np.empty(n, np.float32),
    )
    out_base = np.empty((m, n), np.float32)

    def run(p):
        F.dora_linear_forward(
            x, w, None, a, b, mag, 2.0, dropout=p, seed=1, out=out, out_xa=out_xa,
            out_norm=out_norm, out_base=out_base,
        )  # fmt: skip

    times = {0.0: [], args.dropout: []}
    for p_ in times:
        run(p_)
    for _ in range(args.repeat):
        for p_ in times:
            t0 = time.perf_counter()
            run(p_)
            times[p_].append(time.perf_counter() - t0)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(cpeft.__file__),
    ).stdout.strip()  # fmt: skip
    base = statistics.median(times[0.0])
    print(f"cpeft {cpeft.__file__} (commit {commit}), M={m}, {n}², r={r}, float32, base kept")
    for p_, ts in times.items():
        med = statistics.median(ts)
        print(f"| dropout {p_} | {med * 1e3:.2f} ms | {med / base:.3f} |")


if __name__ == "__main__":
    main()
