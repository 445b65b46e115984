"""Threads (docs/design.md, "Hostile and concurrent callers"):

* 8 threads sharing read-only inputs, each with its own outputs, get results bit-identical to a
  serial call, for every op family of the functional API and for the torch layers (forward and
  backward), with the GIL released in the compute;
* a thread that rewrites an input (embedding indices, x, a weight, an unmerge record) while
  other threads call cpeft never causes an out-of-bounds access or a crash: every call returns
  or raises a documented exception, and nothing is written where no valid index points.

Each threaded test is bounded in time (a couple of seconds).
"""

import threading
import time

import numpy as np
import pytest

from cpeft import functional as F

THREADS = 8
ROUNDS = 6
DOCUMENTED = (TypeError, ValueError, BufferError, IndexError, MemoryError)


def _arrays(rng, *shapes, dtype=np.float32):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _family_calls(rng, dtype):
    """name -> function of no arguments returning a tuple of fresh result arrays; every input is
    shared by all callers and never written."""
    m, n_in, n_out, r, v, d = 48, 96, 80, 8, 50, 24
    x, w, b, a, lb, g = _arrays(
        rng, (m, n_in), (n_out, n_in), (n_out,), (r, n_in), (n_out, r), (m, n_out), dtype=dtype
    )
    we, ae, be, ge = _arrays(rng, (v, d), (r, v), (d, r), (m, d), dtype=dtype)
    l_out, l_in, l_emb = [1 + a_ for a_ in _arrays(rng, (n_out,), (n_in,), (d,), dtype=dtype)]
    idx = rng.integers(0, v, m).astype(np.int64)
    _, xa = F.lora_linear_forward(x, w, b, a, lb, 0.5, dropout=0.25, seed=9, offset=3)
    _, base = F.ia3_linear_forward(x, w, b, l_out, keep_base=True)
    x.flags.writeable = False

    def merge_roundtrip(merge, unmerge, weight, *adapter):
        own = weight.copy()
        record = merge(own, *adapter)
        merged = own.copy()
        unmerge(own, *adapter, record)
        return merged, own, *record

    def ia3_merge_roundtrip():
        own_w, own_b = w.copy(), b.copy()
        records = F.ia3_merge(own_w, l_out, bias=own_b)
        merged = (own_w.copy(), own_b.copy())
        F.ia3_unmerge(own_w, l_out, records, bias=own_b)
        return (*merged, own_w, own_b, *records[0], *records[1])

    return {
        "lora_linear_forward": lambda: F.lora_linear_forward(
            x, w, b, a, lb, 0.5, dropout=0.25, seed=9, offset=3
        ),
        "lora_linear_backward": lambda: tuple(
            F.lora_linear_backward(
                g,
                x,
                w,
                a,
                lb,
                xa,
                0.5,
                dropout=0.25,
                seed=9,
                offset=3,
                grad_bias=True,
                grad_weight=True,
            )
        ),
        "lora_embedding_forward": lambda: (F.lora_embedding_forward(idx, we, ae, be, 2.0),),
        "lora_embedding_backward": lambda: tuple(
            F.lora_embedding_backward(ge, idx, ae, be, 2.0, padding_idx=3, grad_weight=True)
        ),
        "ia3_linear_forward": lambda: F.ia3_linear_forward(x, w, b, l_out, keep_base=True),
        "ia3_linear_backward": lambda: tuple(
            F.ia3_linear_backward(g, x, w, l_out, base, grad_bias=True, grad_weight=True)
        ),
        "ia3_feedforward_backward": lambda: tuple(
            F.ia3_linear_backward(
                g, x, w, l_in, None, feedforward=True, grad_bias=True, grad_weight=True
            )
        ),
        "ia3_embedding_forward": lambda: (F.ia3_embedding_forward(idx, we, l_emb),),
        "ia3_embedding_backward": lambda: tuple(
            F.ia3_embedding_backward(ge, idx, we, l_emb, padding_idx=3, grad_weight=True)
        ),
        "lora_merge": lambda: merge_roundtrip(F.lora_merge, F.lora_unmerge, w, a, lb, 0.5),
        "lora_embedding_merge": lambda: merge_roundtrip(
            F.lora_embedding_merge, F.lora_embedding_unmerge, we, ae, be, 2.0
        ),
        "ia3_merge": ia3_merge_roundtrip,
        "ia3_embedding_merge": lambda: merge_roundtrip(
            F.ia3_embedding_merge, F.ia3_embedding_unmerge, we, l_emb
        ),
        "dropout_mask": lambda: (F.dropout_mask((m, n_in), 0.3, 5, 2**64 - 100),),
    }


def _bits(results):
    return [
        None if r is None else (r.shape, r.dtype.str, np.ascontiguousarray(r).tobytes())
        for r in results
    ]


def _run_threads(worker, count=THREADS):
    """Start count threads at once (a barrier), join them, re-raise the first error."""
    barrier = threading.Barrier(count)
    errors = []

    def run(k):
        try:
            barrier.wait()
            worker(k)
        except BaseException as exc:  # noqa: B902 - reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shared_inputs_give_serial_results_bit_for_bit(dtype):
    calls = _family_calls(np.random.default_rng(12), dtype)
    serial = {name: _bits(call()) for name, call in calls.items()}
    names = sorted(calls)
    mismatches = []

    def worker(k):
        for round_ in range(ROUNDS):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                if _bits(calls[name]()) != serial[name]:
                    mismatches.append((k, round_, name))

    _run_threads(worker)
    assert not mismatches, mismatches[:5]


def test_torch_layers_shared_by_threads_give_serial_results():
    """One module per kind shared by 8 threads, each with its own input; forward values and the
    gradients (taken with autograd.grad, so nothing accumulates in shared .grad) match a serial
    run bit for bit."""
    torch = pytest.importorskip("torch")
    import cpeft

    torch.manual_seed(3)
    layers = {
        "Linear": (cpeft.Linear(40, 32, r=4, lora_alpha=8), lambda: torch.randn(16, 40)),
        "MergedLinear": (
            cpeft.MergedLinear(40, 48, r=2, enable_lora=[True, False, True]),
            lambda: torch.randn(16, 40),
        ),
        "Embedding": (cpeft.Embedding(30, 12, r=4), lambda: torch.randint(0, 30, (16,))),
        "IA3Linear": (cpeft.IA3Linear(40, 32), lambda: torch.randn(16, 40)),
        "IA3Embedding": (cpeft.IA3Embedding(30, 12), lambda: torch.randint(0, 30, (16,))),
    }
    for layer, _ in layers.values():
        for p in layer.parameters():
            if p.requires_grad:
                with torch.no_grad():
                    p.add_(torch.randn_like(p) * 0.1)
    inputs = {name: [make() for _ in range(THREADS)] for name, (_, make) in layers.items()}

    def run(name, k):
        layer, _ = layers[name]
        x = inputs[name][k]
        if x.is_floating_point():
            x = x.clone().requires_grad_(True)
        y = layer(x)
        wanted = [x] if x.requires_grad else []
        wanted += [p for p in layer.parameters() if p.requires_grad]
        grads = torch.autograd.grad((y * y).sum(), wanted)
        return [t.detach().numpy().tobytes() for t in (y, *grads)]

    serial = {(name, k): run(name, k) for name in layers for k in range(THREADS)}
    mismatches = []

    def worker(k):
        for _ in range(ROUNDS):
            for name in layers:
                if run(name, k) != serial[(name, k)]:
                    mismatches.append((name, k))

    _run_threads(worker)
    assert not mismatches, mismatches[:5]


# ---- a thread rewriting an input while others call cpeft -----------------------------------


class Rewriter:
    """Rewrites part of an array in a loop until stopped."""

    def __init__(self, write):
        self.write = write
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            self.write()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)


def _hammer(call, seconds, check=None, threads=2):
    """Call from a few threads for about `seconds`; every outcome must be a result (checked by
    `check`) or a documented exception. Returns the outcome counts."""
    counts = {"returned": 0}
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(_k):
        while time.monotonic() < deadline:
            try:
                result = call()
            except DOCUMENTED as exc:
                assert str(exc), f"{type(exc).__name__} without a message"
                with lock:
                    counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
                continue
            if check is not None:
                check(result)
            with lock:
                counts["returned"] += 1

    _run_threads(worker, threads)
    return counts


BIG = 1 << 40


@pytest.mark.parametrize(
    "entry",
    [
        "lora_embedding_forward",
        "lora_embedding_backward",
        "ia3_embedding_forward",
        "ia3_embedding_backward",
    ],
)
def test_indices_rewritten_during_calls(entry):
    """Indices flip between 0 and 2**40 (and -1) while the calls run: a call raises IndexError
    or returns a result in which only row 0 can have been read or written."""
    n, v, d, r = 200_000, 8, 4, 2
    idx = np.zeros(n, np.int64)
    rng = np.random.default_rng(1)
    weight, lora_a, lora_b = _arrays(rng, (v, d), (r, v), (d, r))
    ia3_l = np.ones(d, np.float32)
    grad = np.ones((n, d), np.float32)
    row0 = {
        "lora_embedding_forward": F.lora_embedding_forward(idx[:1], weight, lora_a, lora_b, 1.0),
        "ia3_embedding_forward": F.ia3_embedding_forward(idx[:1], weight, ia3_l),
    }

    def call():
        if entry == "lora_embedding_forward":
            return F.lora_embedding_forward(idx, weight, lora_a, lora_b, 1.0)
        if entry == "ia3_embedding_forward":
            return F.ia3_embedding_forward(idx, weight, ia3_l)
        if entry == "lora_embedding_backward":
            return F.lora_embedding_backward(
                grad, idx, lora_a, lora_b, 1.0, grad_lora_b=False, grad_weight=True
            ).weight
        return F.ia3_embedding_backward(
            grad, idx, weight, ia3_l, grad_ia3_l=False, grad_weight=True
        ).weight

    def check(result):
        if entry.endswith("forward"):
            assert np.array_equal(result, np.broadcast_to(row0[entry], result.shape))
        else:
            assert not result[1:].any(), "a gradient row no index pointed at was written"

    def flip():
        idx[-1] = BIG
        idx[n // 2] = -1
        idx[-1] = 0
        idx[n // 2] = 0

    with Rewriter(flip):
        counts = _hammer(call, 1.5, check)
    assert sum(counts.values()) > 0


def test_x_and_weight_rewritten_during_lora_linear_calls():
    """Values of x and of the weight change under the calls: any values may come out, but each
    call returns arrays of the right shape or raises a documented exception."""
    rng = np.random.default_rng(2)
    x, w, a, b, g = _arrays(rng, (256, 128), (96, 128), (8, 128), (96, 8), (256, 96))
    _, xa = F.lora_linear_forward(x, w, None, a, b, 0.5)

    def scribble():
        x[::7] = np.nan
        w[3] = np.inf
        x[::7] = 1.0
        w[3] = 0.0

    def call():
        y, _ = F.lora_linear_forward(x, w, None, a, b, 0.5, dropout=0.1, seed=3)
        grads = F.lora_linear_backward(g, x, w, a, b, xa, 0.5, grad_weight=True)
        return y, grads

    def check(result):
        y, grads = result
        assert y.shape == (256, 96) and grads.x.shape == x.shape
        assert grads.weight.shape == w.shape

    with Rewriter(scribble):
        counts = _hammer(call, 1.5, check)
    assert counts["returned"] > 0


def test_unmerge_record_rewritten_during_calls():
    """Record indices flip to out-of-range values while unmerges run on separate weights: each
    call restores its weight or raises a documented exception; no write lands outside it."""
    rng = np.random.default_rng(3)
    weight, a, b = _arrays(rng, (64, 48), (4, 48), (64, 4))
    a *= 1e3  # large enough that many elements need the record
    record = F.lora_merge(weight.copy(), a, b, 0.75)
    assert record.index.size > 4
    index = record.index

    def flip():
        index[-1] = 1 << 40
        index[0] = -5
        index[-1] = 7
        index[0] = 3

    def call():
        guard = np.full(weight.size + 64, 9.5, np.float32)
        target = guard[32 : 32 + weight.size].reshape(weight.shape)
        target[...] = weight  # a fresh merged copy for every call
        F.lora_merge(target, a, b, 0.75)
        try:
            F.lora_unmerge(target, a, b, 0.75, record)
        finally:
            assert np.all(guard[:32] == 9.5) and np.all(guard[-32:] == 9.5), (
                "an unmerge wrote outside its weight"
            )
        return target

    with Rewriter(flip):
        counts = _hammer(call, 1.5)
    assert sum(counts.values()) > 0
