"""Leak soak: many forward+backward calls through cpeft.functional and through the torch layers,
about one in five of them a call that raises (bad shapes, dtypes, kinds of object, indices out of
range, non-finite scale), while RSS and object counts are sampled.

    python bench/leak_soak.py [--calls 100000] [--samples 40] [--phases functional,layers]

Each phase runs ``--calls`` iterations; an iteration is one forward and one backward call (or
one raising call) of an op chosen in turn; merges and unmerges (layers switched to eval and
back) run every 50 iterations. Every ``calls / samples`` iterations it records the resident set
size (``/proc/self/statm``), ``len(gc.get_objects())`` and ``sys.getallocatedblocks()`` after a
``gc.collect()``, and prints the series.

"Flat": after a warm-up of the first 20% of samples, the growth from the first post-warm-up
sample to the last, and the range over the post-warm-up samples, both stay under RSS 2 MiB
(21 bytes per call at 10**5 calls), 100 gc-tracked objects and 1,000 allocated blocks (a leak
of one object per call would be 80,000). The script exits 1 when a series is not flat.
"""

import argparse
import gc
import os
import sys
import time

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
LIMITS = {"rss_bytes": 2 << 20, "gc_objects": 100, "allocated_blocks": 1000}
WARMUP = 0.2


KEYS = ("rss_bytes", "gc_objects", "allocated_blocks")


def sample(into):
    """Write one sample into a preallocated int64 row, so that keeping the series allocates
    nothing that the next sample would count."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * PAGE
    into[0] = resident
    into[1] = len(gc.get_objects())
    into[2] = sys.getallocatedblocks()


def functional_ops():
    """Callables for the functional API: each does a forward and a backward, or raises."""
    from cpeft import functional as F

    rng = np.random.default_rng(0)

    def arr(*shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(dtype)

    x, w, b, a, lb, g = arr(16, 32), arr(24, 32), arr(24), arr(4, 32), arr(24, 4), arr(16, 24)
    idx = rng.integers(0, 40, 16)
    we, ae, be, ge = arr(40, 12), arr(4, 40), arr(12, 4), arr(16, 12)
    lo, li, le = arr(24) + 1, arr(32) + 1, arr(12) + 1
    bad_idx = idx.copy()
    bad_idx[3] = 40

    def lora_linear():
        y, xa = F.lora_linear_forward(x, w, b, a, lb, 0.5, dropout=0.1, seed=1)
        F.lora_linear_backward(g, x, w, a, lb, xa, 0.5, dropout=0.1, seed=1, grad_bias=True)

    def merged_linear():
        enable = [True, False, True]
        a2, b2 = arr(8, 32), arr(16, 4)
        y, xa = F.lora_linear_forward(x, w, None, a2, b2, 2.0, enable_lora=enable)
        F.lora_linear_backward(g, x, w, a2, b2, xa, 2.0, enable_lora=enable)

    def lora_embedding():
        F.lora_embedding_forward(idx, we, ae, be, 2.0)
        F.lora_embedding_backward(ge, idx, ae, be, 2.0, padding_idx=0, grad_weight=True)

    def ia3_linear():
        y, base = F.ia3_linear_forward(x, w, b, lo, keep_base=True)
        F.ia3_linear_backward(g, x, w, lo, base, grad_bias=True)
        F.ia3_linear_forward(x, w, b, li, feedforward=True)
        F.ia3_linear_backward(g, x, w, li, None, feedforward=True)

    def ia3_embedding():
        F.ia3_embedding_forward(idx, we, le)
        F.ia3_embedding_backward(ge, idx, we, le, grad_weight=True)

    def merges():
        weight = w.copy()
        F.lora_unmerge(weight, a, lb, 0.5, F.lora_merge(weight, a, lb, 0.5))
        F.ia3_unmerge(weight, lo, F.ia3_merge(weight, lo))
        emb = we.copy()
        F.lora_embedding_unmerge(emb, ae, be, 2.0, F.lora_embedding_merge(emb, ae, be, 2.0))
        F.ia3_embedding_unmerge(emb, le, F.ia3_embedding_merge(emb, le))
        F.dropout_mask((8, 32), 0.5, 3, 2**64 - 7)

    raising = [
        lambda: F.lora_linear_forward(x[:, :31], w, b, a, lb, 0.5),  # shape
        lambda: F.lora_linear_forward(x.astype(np.float64), w, b, a, lb, 0.5),  # dtype
        lambda: F.lora_linear_backward(g, x, w, a, lb, object(), 0.5),  # kind of object
        lambda: F.lora_linear_forward(x, w, b, a, lb, float("nan")),  # scale
        lambda: F.lora_embedding_forward(bad_idx, we, ae, be, 1.0),  # index
        lambda: F.lora_embedding_backward(ge, bad_idx, ae, be, 1.0),  # index
        lambda: F.ia3_linear_forward(x, w, b, li),  # ia3_l length
        lambda: F.ia3_embedding_backward(ge, bad_idx, we, le),  # index
        lambda: F.lora_unmerge(w.copy(), a, lb, 0.5, (np.array([10**9]), np.zeros(1, w.dtype))),
        lambda: F.dropout_mask((3, 4), 0.5, seed=-1),
        lambda: F.lora_linear_forward(x, w, b, a, lb, 0.5, out=np.empty((16, 24), np.float64)),
    ]
    ops = [lora_linear, merged_linear, lora_embedding, ia3_linear, ia3_embedding]
    return ops, raising, merges


def layer_ops():
    """Callables for the torch layers: forward + backward, raising calls, merge toggles."""
    import torch

    import cpeft

    torch.manual_seed(0)
    layers = {
        "linear": cpeft.Linear(32, 24, r=4, lora_alpha=8, lora_dropout=0.1),
        "merged": cpeft.MergedLinear(32, 24, r=2, enable_lora=[True, False, True]),
        "embedding": cpeft.Embedding(40, 12, r=4),
        "ia3": cpeft.IA3Linear(32, 24),
        "ia3_ff": cpeft.IA3Linear(32, 24, is_feedforward=True),
        "ia3_embedding": cpeft.IA3Embedding(40, 12),
    }
    x = torch.randn(16, 32)
    idx = torch.randint(0, 40, (16,))

    def fwd_bwd(name, inp):
        def run():
            layer = layers[name]
            xin = inp.clone().requires_grad_(True) if inp.is_floating_point() else inp
            layer(xin).square().sum().backward()
            layer.zero_grad(set_to_none=True)

        return run

    ops = [
        fwd_bwd("linear", x),
        fwd_bwd("merged", x),
        fwd_bwd("embedding", idx),
        fwd_bwd("ia3", x),
        fwd_bwd("ia3_ff", x),
        fwd_bwd("ia3_embedding", idx),
    ]
    bad_idx = idx.clone()
    bad_idx[0] = 40
    raising = [
        lambda: layers["linear"](torch.randn(16, 31)),
        lambda: layers["embedding"](bad_idx),
        lambda: layers["ia3"](torch.randn(4, 33)),
        lambda: layers["ia3_embedding"](bad_idx),
        lambda: layers["merged"](torch.randn(16, 30).requires_grad_(True)).sum().backward(),
        lambda: layers["ia3_ff"](torch.randn(4, 31)),
    ]

    def merges():
        for layer in layers.values():
            layer.eval()
            layer.train()

    return ops, raising, merges


def soak(name, ops, raising, merges, calls, samples):
    every = max(1, calls // samples)
    series = np.zeros((calls // every + 2, len(KEYS)), np.int64)
    taken = 0
    errors = 0
    began = time.time()
    n_ops, n_raising = len(ops), len(raising)
    for i in range(calls):
        if i % every == 0:
            sample(series[taken])
            taken += 1
        if i % 50 == 49:
            merges()
        if i % 5 == 4:
            try:
                raising[(i // 5) % n_raising]()
            except (ValueError, TypeError, IndexError, RuntimeError, MemoryError):
                errors += 1
            else:
                raise AssertionError(f"raising call {(i // 5) % n_raising} returned")
        else:
            ops[i % n_ops]()
    sample(series[taken])
    seconds = time.time() - began
    series = [dict(zip(KEYS, (int(v) for v in row))) for row in series[: taken + 1]]
    return dict(name=name, calls=calls, raised=errors, seconds=seconds, series=series)


def judge(result):
    series = result["series"]
    start = int(len(series) * WARMUP)
    verdicts = {}
    for key, limit in LIMITS.items():
        values = [s[key] for s in series[start:]]
        growth = values[-1] - values[0]
        spread = max(values) - min(values)
        verdicts[key] = dict(
            first=series[0][key],
            after_warmup=values[0],
            last=values[-1],
            growth=growth,
            range=spread,
            limit=limit,
            flat=growth <= limit and spread <= limit,
        )
    return verdicts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--phases", default="functional,layers")
    args = parser.parse_args(argv)
    import cpeft

    print(f"cpeft {cpeft.__version__} from {os.path.dirname(cpeft.__file__)}; {cpeft.build_info()}")
    all_flat = True
    for phase in args.phases.split(","):
        ops, raising, merges = {"functional": functional_ops, "layers": layer_ops}[phase]()
        result = soak(phase, ops, raising, merges, args.calls, args.samples)
        print(
            f"\n== {phase}: {result['calls']} iterations ({result['raised']} raising calls, "
            f"the rest forward+backward), {result['seconds']:.1f} s"
        )
        print(f"{'iteration':>10} {'RSS MiB':>10} {'gc objects':>11} {'alloc blocks':>13}")
        every = max(1, args.calls // args.samples)
        for k, s in enumerate(result["series"]):
            print(
                f"{min(k * every, args.calls):>10} {s['rss_bytes'] / 2**20:>10.2f} "
                f"{s['gc_objects']:>11} {s['allocated_blocks']:>13}"
            )
        for key, v in judge(result).items():
            all_flat &= v["flat"]
            print(
                f"{key}: first {v['first']}, after warm-up {v['after_warmup']}, last "
                f"{v['last']}, growth {v['growth']:+d}, range {v['range']} "
                f"(limit {v['limit']}): {'flat' if v['flat'] else 'NOT FLAT'}"
            )
    print("\nall series flat" if all_flat else "\nSOME SERIES ARE NOT FLAT")
    return 0 if all_flat else 1


if __name__ == "__main__":
    sys.exit(main())
