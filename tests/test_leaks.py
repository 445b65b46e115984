"""Reference counting and memory: repeated calls of every entry point, on success and on error,
leave the reference counts of their arguments unchanged, release DLPack producers (their
deleter runs exactly once), and do not grow the Python heap."""

import gc
import sys
import tracemalloc

import numpy as np
import pytest

from conftest import DLPackOnly
from cpeft import functional as F
from test_bad_input import POSITIONAL, call, valid_args

REPEATS = 200


@pytest.fixture(autouse=True, scope="module")
def _cheap_gc():
    """Move everything already alive (torch, peft, ... when other test files ran first) out of
    the collector's reach, so that the gc.collect() calls below cost microseconds."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


ENTRIES = sorted(POSITIONAL)

BAD_CHANGE = {  # one rejected argument per entry point
    "lora_linear_forward": {"scale": float("nan")},
    "lora_linear_backward": {"xa": np.zeros((4, 3), np.float32)},
    "lora_embedding_forward": {"indices": np.array([0, 7], np.int64)},
    "lora_embedding_backward": {"padding_idx": 99},
    "ia3_linear_forward": {"ia3_l": np.ones(7, np.float32)},
    "ia3_linear_backward": {"base": None},
    "ia3_embedding_forward": {"indices": np.array([0, 9], np.int64)},
    "ia3_embedding_backward": {"ia3_l": np.ones(9, np.float32)},
    "lora_merge": {"scale": float("inf")},
    "lora_unmerge": {"lora_b": np.ones((6, 3), np.float32)},
    "lora_embedding_merge": {"scale": float("nan")},
    "lora_embedding_unmerge": {"lora_b": np.ones((3, 3), np.float32)},
    "ia3_merge": {"ia3_l": np.ones(9, np.float32)},
    "ia3_unmerge": {"ia3_l": np.ones(9, np.float32)},
    "ia3_embedding_merge": {"ia3_l": np.ones(9, np.float32)},
    "ia3_embedding_unmerge": {"ia3_l": np.ones(9, np.float32)},
    "dropout_mask": {"p": 2.0},
}


def tracked(args):
    """The arguments whose reference counts the test follows (arrays, records, floats)."""
    return {k: v for k, v in args.items() if v is not None and not isinstance(v, (bool, int))}


def refcounts(objects):
    return {k: sys.getrefcount(v) for k, v in objects.items()}


def prepare(entry, failing):
    args = valid_args(entry)
    if failing:
        args.update(BAD_CHANGE[entry])
    if entry in ("lora_merge", "lora_embedding_merge", "ia3_merge", "ia3_embedding_merge"):
        weight = args["weight"]
        unmerge = getattr(F, entry.replace("merge", "unmerge"))
        if not failing:

            def run():
                records = call(entry, args)
                rest = [args[n] for n in POSITIONAL[entry][1:]]
                unmerge(weight, *rest, records)

            return args, run
    return args, lambda: call(entry, args)


def run_many(run, failing, times):
    for _ in range(times):
        if failing:
            try:
                run()
            except (ValueError, TypeError, IndexError):
                pass
            else:
                raise AssertionError("the bad call was accepted")
        else:
            run()


@pytest.mark.parametrize("failing", [False, True], ids=["success", "error"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_refcounts_stable(entry, failing):
    args, run = prepare(entry, failing)
    run_many(run, failing, 3)
    before = refcounts(tracked(args))
    run_many(run, failing, REPEATS)
    gc.collect()
    assert refcounts(tracked(args)) == before


@pytest.mark.parametrize("failing", [False, True], ids=["success", "error"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_heap_does_not_grow(entry, failing):
    args, run = prepare(entry, failing)
    run_many(run, failing, 20)
    tracemalloc.start()
    try:
        run_many(run, failing, 10)
        gc.collect()
        start, _ = tracemalloc.get_traced_memory()
        run_many(run, failing, REPEATS)
        gc.collect()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert end - start < 2048, f"heap grew by {end - start} bytes over {REPEATS} calls"


def test_output_array_refcount_stable():
    args = valid_args("lora_linear_forward")
    out = np.empty((4, 6), np.float32)
    out_xa = np.empty((4, 2), np.float32)
    before = (sys.getrefcount(out), sys.getrefcount(out_xa))
    for _ in range(REPEATS):
        y, xa = call("lora_linear_forward", dict(args, out=out, out_xa=out_xa))
        del y, xa
    assert (sys.getrefcount(out), sys.getrefcount(out_xa)) == before


@pytest.mark.parametrize("failing", [False, True], ids=["success", "error"])
def test_numpy_dlpack_producer_released(failing):
    """NumPy's capsule keeps its array alive until the consumer calls the deleter: the array's
    reference count returning to its baseline proves the deleter ran once per call (a second
    run would drop it below)."""
    args = valid_args("lora_linear_forward")
    arrays = {k: v for k, v in args.items() if isinstance(v, np.ndarray)}
    wrapped = dict(args, **{k: DLPackOnly(v) for k, v in arrays.items()})
    wrapped["out"] = DLPackOnly(np.empty((4, 6), np.float32))
    wrapped["out_xa"] = DLPackOnly(np.empty((4, 2), np.float32))
    if failing:
        wrapped["lora_b"] = DLPackOnly(np.ones((6, 3), np.float32))
    watched = dict(
        arrays,
        out=wrapped["out"].array,
        out_xa=wrapped["out_xa"].array,
        lora_b=wrapped["lora_b"].array,
    )
    before = refcounts(watched)
    run_many(lambda: call("lora_linear_forward", wrapped), failing, REPEATS)
    gc.collect()
    assert refcounts(watched) == before


torch_cases = pytest.mark.parametrize("failing", [False, True], ids=["success", "error"])


def holders(tensor):
    """(references to the tensor's TensorImpl, references to its storage): a DLPack export
    holds one of the two (torch exports the tensor itself; a detached alias holds the storage)."""
    import torch

    return tensor._use_count(), torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


@torch_cases
def test_torch_producer_released(failing):
    """A torch tensor exported through DLPack holds one extra TensorImpl reference per capsule
    until the deleter runs; the use count must come back to its baseline."""
    torch = pytest.importorskip("torch")
    t = dict(
        x=torch.randn(4, 5),
        weight=torch.randn(6, 5),
        bias=torch.randn(6),
        lora_a=torch.randn(2, 5),
        lora_b=torch.randn(6, 2 + int(failing)),
    )
    before = {k: holders(v) for k, v in t.items()}
    refs_before = refcounts(t)

    def run():
        y, xa = F.lora_linear_forward(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5)
        del y, xa

    run_many(run, failing, REPEATS)
    gc.collect()
    assert {k: holders(v) for k, v in t.items()} == before
    assert refcounts(t) == refs_before


@pytest.mark.parametrize("kind", ["legacy", "versioned"])
@torch_cases
def test_consumed_capsule_deleter_runs_once(kind, failing):
    """Raw capsules: after the call the producer's extra reference is gone once the capsule
    object is deleted, whether the call succeeded or failed."""
    torch = pytest.importorskip("torch")
    from torch.utils import dlpack as torch_dlpack

    x = torch.randn(4, 5)
    weight, bias = torch.randn(6, 5), torch.randn(6)
    lora_a, lora_b = torch.randn(2, 5), torch.randn(6, 2)
    base = holders(x)
    out = np.empty((4, 6), np.float32)
    out_xa = np.empty((4, 2), np.float32)
    for _ in range(20):
        capsule = (
            torch_dlpack.to_dlpack(x) if kind == "legacy" else x.__dlpack__(max_version=(1, 0))
        )
        assert holders(x) != base
        try:
            F.lora_linear_forward(
                capsule,
                weight,
                bias,
                lora_a,
                lora_b,
                float("nan") if failing else 0.5,
                out=out,
                out_xa=out_xa,
            )
        except ValueError:
            assert failing
        del capsule
        assert holders(x) == base
