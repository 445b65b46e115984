"""The fuzzer's fixed budget: CPEFT_FUZZ_CASES cases (default 10,000) of stream CPEFT_FUZZ_SEED,
in chunks of 500, each judged by the oracle of generator.py. A failing chunk lists every failed
case with its replay line (``python -m tests.fuzz.replay SEED CASE``)."""

import collections
import os

import numpy as np
import pytest

from cpeft import functional as F

from .generator import ENTRIES, MUTATIONS, make_case, replay_line, run_case

SEED = int(os.environ.get("CPEFT_FUZZ_SEED", "20261130"))
CASES = int(os.environ.get("CPEFT_FUZZ_CASES", "10000"))
CHUNK = 500
SHOWN = 10


def _report(failures):
    by_class = collections.Counter(o.failure for o in failures)
    lines = [
        f"{len(failures)} failed cases: "
        + ", ".join(f"{k} x{v}" for k, v in by_class.most_common())
    ]
    for outcome in failures[:SHOWN]:
        lines.append("-" * 72)
        lines.append(outcome.message)
    return "\n".join(lines)


@pytest.mark.parametrize("start", range(0, CASES, CHUNK))
def test_fuzz_chunk(start):
    failures = []
    for index in range(start, min(start + CHUNK, CASES)):
        case = make_case(SEED, index)
        outcome = run_case(case)
        if outcome.kind == "fail":
            failures.append(outcome)
    assert not failures, _report(failures)


def test_dora_float32_norm_with_large_lora_a():
    """n_j = ‖w_j + s·b_j·A‖ is about 1e21 here, well inside float32, and so is every entry of
    W + s·B·A (what peft norms); A·Aᵀ (about 2e42) is not. Expected: the norm, and y = c ⊙ base
    finite, as the float64 reference gives."""
    w = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
    a = np.array([[1e21, -2e21]], np.float32)
    b = np.array([[0.5], [1.0]], np.float32)
    want = np.linalg.norm(w.astype(np.float64) + 0.5 * b.astype(np.float64) @ a, axis=1)
    norm = F.dora_weight_norm(w, a, b, 0.5)
    assert np.allclose(norm, want, rtol=1e-5)
    y, _, _, n = F.dora_linear_forward(
        np.ones((1, 2), np.float32), w, None, a, b, np.ones(2, np.float32), 0.5
    )
    assert np.isfinite(y).all() and np.allclose(n, want, rtol=1e-5)


@pytest.mark.parametrize("keep_base", [False, True])
def test_dora_float32_dropout_forward_with_tiny_c(keep_base):
    """A scale of 1e15 makes n about 1e15 and c = m / n about 1e-15, below float32's epsilon,
    while c·s·xd·Aᵀ·Bᵀ is of order 1. Forming c ⊙ t as t + (c - 1) ⊙ (t + xd·Wᵀ) lost that term
    entirely (the fuzzer's `python -m tests.fuzz.replay 1 15019` and five more). Expected: the
    float64 value of x·Wᵀ + (c - 1) ⊙ xd·Wᵀ + c ⊙ s·xd·Aᵀ·Bᵀ, and u = xd·Wᵀ + s·xd·Aᵀ·Bᵀ."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    a = rng.standard_normal((2, 6)).astype(np.float32)
    b = rng.standard_normal((5, 2)).astype(np.float32)
    m = (rng.random(5) + 0.5).astype(np.float32)
    s, p, seed = 1e15, 0.25, 3
    y, _, u, n = F.dora_linear_forward(
        x, w, None, a, b, m, s, dropout=p, seed=seed, keep_base=keep_base
    )
    x64, w64, a64, b64 = (v.astype(np.float64) for v in (x, w, a, b))
    n64 = np.linalg.norm(w64 + s * b64 @ a64, axis=1)
    c = m / n64
    xd = x64 * F.dropout_mask(x.shape, p, seed, dtype="float64")
    t = s * (xd @ a64.T) @ b64.T
    want = x64 @ w64.T + (c - 1) * (xd @ w64.T) + c * t
    assert np.abs(c * t).max() > 0.1
    assert np.allclose(n, n64, rtol=1e-5)
    assert np.allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if keep_base:
        want_u = xd @ w64.T + t
        assert np.allclose(u, want_u, rtol=1e-5, atol=1e-5 * np.abs(want_u).max())


def test_dora_embedding_empty_batch_with_infinite_lora_b():
    """grad_magnitude of an empty batch is an empty sum over 0 rows divided by n: 0, whatever
    lora_b holds (found by the fuzzer: 0·inf gave NaN)."""
    w = np.ones((4, 2))
    a = np.ones((3, 4))
    b = np.array([[1.0, 2.0, np.inf], [0.5, -1.0, 3.0]])
    grads = F.dora_embedding_backward(
        np.ones((0, 2)), np.zeros(0, np.int64), w, a, b, np.ones(2), np.array([2.0, 4.0]), 1.5
    )
    assert np.array_equal(grads.magnitude, [0.0, 0.0])
    assert not grads.lora_a.any() and not grads.lora_b.any()


def test_dora_empty_batch_with_infinite_c():
    """grad_lora_b of an empty batch is an empty sum, 0 even where c = m / n is infinite (a
    zero norm) or NaN (found by the fuzzer: the sums were scaled by c afterwards, 0·inf = NaN)."""
    w, a, b = np.ones((2, 3)), np.ones((1, 3)), np.ones((2, 1))
    m, n = np.array([1.0, np.inf]), np.array([0.0, 2.0])
    x, g = np.ones((0, 3)), np.ones((0, 2))
    lin = F.dora_linear_backward(g, x, w, a, b, m, n, np.ones((0, 1)), np.ones((0, 2)), 1.5)
    assert not lin.lora_b.any() and not lin.lora_a.any()
    emb = F.dora_embedding_backward(
        np.ones((0, 2)), np.zeros(0, np.int64), np.ones((3, 2)), np.ones((1, 3)), b, m, n, 1.5
    )
    assert not emb.lora_b.any() and not emb.lora_a.any()


def test_ia3_empty_batch_with_infinite_l():
    """The gradients of an empty batch are empty sums, 0 whatever l holds (torch gives 0)."""
    x, g, base = np.ones((0, 3)), np.ones((0, 2)), np.ones((0, 2))
    w = np.ones((2, 3))
    out = F.ia3_linear_backward(g, x, w, np.array([1.0, np.inf]), base, grad_bias=True)
    ff = F.ia3_linear_backward(
        g, x, w, np.array([1.0, np.inf, 2.0]), None, feedforward=True, grad_weight=True
    )
    assert np.array_equal(out.bias, [0.0, 0.0]) and not ff.weight.any()


def test_out_base_true_with_torch_tensors():
    torch = pytest.importorskip("torch")
    x, w, l = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    y, base = F.ia3_linear_forward(x, w, None, l, out_base=True)
    assert torch.allclose(base, x @ w.T)


def test_dora_out_base_true_with_torch_tensors():
    """Found by the fuzzer: as ia3_linear_forward's did, an explicit out_base=True reached C,
    which allocates NumPy arrays only, and raised for torch inputs."""
    torch = pytest.importorskip("torch")
    x, w, m = torch.randn(3, 4), torch.randn(5, 4), torch.rand(5) + 0.5
    a, b = torch.randn(2, 4), torch.randn(5, 2)
    y, xa, base, norm = F.dora_linear_forward(x, w, None, a, b, m, 0.5, out_base=True)
    assert torch.allclose(base, x @ w.T + 0.5 * (x @ a.T) @ b.T, atol=1e-5)


def test_enable_lora_string_is_refused():
    x, w = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    a, b = np.ones((2, 3), np.float32), np.ones((4, 1), np.float32)
    with pytest.raises((TypeError, ValueError), match="enable_lora"):
        F.lora_linear_forward(x, w, None, a, b, 1.0, enable_lora="TF")


def test_cases_replay_identically():
    """A case is a function of (seed, index) alone, whatever ran before it."""
    later = [make_case(SEED, i).describe() for i in (5, 17, 333)]
    for i in range(40):
        run_case(make_case(SEED + 1, i))
    assert [make_case(SEED, i).describe() for i in (5, 17, 333)] == later
    assert replay_line(SEED, 17) == f"python -m tests.fuzz.replay {SEED} 17"


def test_every_entry_point_and_mutation_is_generated():
    """Over 1,700 cases every entry point is called validly and with rejected arguments, and
    every kind of change is made."""
    seen = collections.defaultdict(set)
    mutations = set()
    for index in range(1700):
        case = make_case(SEED, index)
        seen[case.entry].add(case.expect)
        mutations.add(case.mutation.split(":")[0].split("+")[0])
    assert set(seen) == set(ENTRIES)
    for entry, expectations in seen.items():
        assert {"valid", "invalid"} <= expectations, (entry, expectations)
    assert set(MUTATIONS) <= mutations, set(MUTATIONS) - mutations


def _first_case(entry, expect, mutation=None):
    for index in range(ENTRIES.index(entry), 5000, len(ENTRIES)):
        case = make_case(SEED, index, mutation, torch=False)
        if case.expect == expect:
            return case
    raise AssertionError(f"no {expect} case of {entry}")


@pytest.mark.parametrize(
    "entry", ["lora_linear_forward", "ia3_embedding_forward", "lora_merge", "dropout_mask"]
)
def test_oracle_catches_a_wrong_result(monkeypatch, entry):
    """The oracle is not vacuous: an entry point whose results are off by a little fails."""
    original = getattr(F, entry)

    def skewed(*args, **kwargs):
        result = original(*args, **kwargs)
        arrays = [
            a
            for a in (result if isinstance(result, tuple) else (result,))
            if isinstance(a, np.ndarray) and a.size
        ]
        target = args[0] if entry == "lora_merge" else arrays[0]
        target.reshape(-1)[0] += 1e-3 * (1 + abs(target.reshape(-1)[0]))
        return result

    case = _first_case(entry, "valid", "none")
    while min(case.dims.values()) == 0:
        case = make_case(SEED, case.index + len(ENTRIES), "none", torch=False)
    assert run_case(case).kind == "ok", run_case(case).message
    case = make_case(case.seed, case.index, "none", torch=False)
    monkeypatch.setattr(F, entry, skewed)
    outcome = run_case(case)
    assert outcome.kind == "fail" and outcome.failure in ("wrong-result", "unmerge-not-exact"), (
        outcome
    )


def _raising(exc):
    def entry(*args, **kwargs):
        raise exc

    return entry


def test_oracle_catches_bad_exceptions_and_modified_inputs(monkeypatch):
    """SystemError, an empty message, or a write into any buffer before raising all fail."""
    entry = "ia3_linear_forward"
    index = ENTRIES.index(entry)
    monkeypatch.setattr(
        F, entry, _raising(SystemError("returned NULL without setting an exception"))
    )
    assert (
        run_case(make_case(SEED, index, "type", torch=False)).failure
        == "undocumented-exception:SystemError"
    )
    monkeypatch.setattr(F, entry, _raising(RuntimeError("cpeft internal error (status 6)")))
    assert (
        run_case(make_case(SEED, index, "type", torch=False)).failure
        == "undocumented-exception:RuntimeError"
    )
    monkeypatch.setattr(F, entry, _raising(ValueError("")))
    assert (
        run_case(make_case(SEED, index, "type", torch=False)).failure == "empty-message:ValueError"
    )

    case = make_case(SEED, index, "scalar", torch=False)
    storage = next(iter(case.arrays.placed.values())).storage

    def scribbles_then_raises(*args, **kwargs):
        storage.reshape(-1)[0] = 42.0
        raise ValueError("x must be ...")

    monkeypatch.setattr(F, entry, scribbles_then_raises)
    assert run_case(case).failure == "modified-on-raise"
