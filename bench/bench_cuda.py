"""GPU benchmark for issue 3's table: cpeft against a frozen nn.Linear / nn.Embedding and HF peft.

Every case is forward + backward (to the input for the frozen base; to the adapter and the input
for the adapters), timed as the median of CUDA-event-timed repetitions (triton.testing.do_bench
when triton is importable, which also flushes L2 between repetitions). Memory is measured with
torch.cuda.memory_allocated / max_memory_allocated deltas around a forward whose outputs are kept
alive, i.e. what a layer holds for its backward.

Usage: python bench/bench_cuda.py [--dtype bfloat16] [--reps 100] [--runs 3]
                                 [--cases lora,dropout,rankr,memory,ia3,embedding,host,merged]
                                 [--markdown bench_cuda.md]
Prints a markdown table with the device, versions, commit and date (and writes it to --markdown,
ready for docs/benchmarks.md, row by row). Every timed case runs --runs times; a cell lists each run's median
and the ratio to the frozen base of the median run.
"""

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

import cpeft
from cpeft import functional as F

try:
    import peft
except ImportError:
    peft = None

try:
    from triton.testing import do_bench as _triton_do_bench
except ImportError:
    _triton_do_bench = None

MIB = 1 << 20


def median_ms(fn, reps):
    if _triton_do_bench is not None:
        return float(_triton_do_bench(fn, warmup=25, rep=reps, return_mode="median"))
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def randn(*shape, dtype, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).mul_(scale).to(dtype)


def stream_handle():
    return torch.cuda.current_stream().cuda_stream


# ---- LoRA linear -----------------------------------------------------------------------------


def frozen_linear(in_f, out_f, dtype):
    lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
    lin.weight.requires_grad_(False)
    return lin


def autograd_step(module, x, g):
    def step():
        x.grad = None
        module(x).backward(g)

    return step


def peft_lora(in_f, out_f, r, dtype, dropout):
    if peft is None:
        return None
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=dropout)
    return peft.get_peft_model(model, cfg).to(device="cuda", dtype=dtype)


def cpeft_layer(in_f, out_f, r, dtype, dropout):
    if not hasattr(cpeft, "Linear"):
        return None
    layer = cpeft.Linear(in_f, out_f, r=r, lora_alpha=2 * r, lora_dropout=dropout, bias=False)
    layer = layer.to(device="cuda", dtype=dtype)
    nn.init.normal_(layer.lora_B, std=0.02)
    return layer


def lora_functional_step(x, w, a, b, g, scale, dropout):
    stream = stream_handle()
    m, in_f = x.shape
    state = {"offset": 0}

    def step():
        kw = dict(dropout=dropout, seed=1, offset=state["offset"], stream=stream)
        _, xa = F.lora_linear_forward(x, w, None, a, b, scale, **kw)
        F.lora_linear_backward(g, x, w, a, b, xa, scale, **kw)
        state["offset"] += m * in_f

    return step


def lora_case(m, in_f, out_f, r, dtype, reps, dropout=0.0):
    x = randn(m, in_f, dtype=dtype).requires_grad_(True)
    g = randn(m, out_f, dtype=dtype)
    base = frozen_linear(in_f, out_f, dtype)
    a = randn(r, in_f, dtype=dtype, scale=in_f**-0.5)
    b = randn(out_f, r, dtype=dtype, scale=0.02)
    row = {"base": median_ms(autograd_step(base, x, g), reps)}
    row["cpeft"] = median_ms(
        lora_functional_step(x.detach(), base.weight, a, b, g, 2.0, dropout), reps
    )
    layer = cpeft_layer(in_f, out_f, r, dtype, dropout)
    if layer is not None:
        row["cpeft.Linear"] = median_ms(autograd_step(layer, x, g), reps)
    model = peft_lora(in_f, out_f, r, dtype, dropout)
    if model is not None:
        row["peft"] = median_ms(autograd_step(model, x, g), reps)
    return row


def kept_bytes(forward):
    """(bytes still allocated after forward() with its result alive, peak bytes above start)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    result = forward()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - start
    peak = torch.cuda.max_memory_allocated() - start
    del result
    return kept, peak


def memory_case(dtype, dropout=0.05, m=4096, n=4096, r=16):
    """Extra memory kept for backward relative to the frozen base layer (whose forward keeps
    only its output)."""
    x = randn(m, n, dtype=dtype).requires_grad_(True)
    base = frozen_linear(n, n, dtype)
    a = randn(r, n, dtype=dtype, scale=n**-0.5)
    b = randn(n, r, dtype=dtype, scale=0.02)
    base_kept, _ = kept_bytes(lambda: base(x))
    row = {}
    kept, _ = kept_bytes(
        lambda: F.lora_linear_forward(
            x.detach(),
            base.weight,
            None,
            a,
            b,
            2.0,
            dropout=dropout,
            seed=1,
            stream=stream_handle(),
        )
    )
    row["cpeft"] = (kept - base_kept) / MIB
    layer = cpeft_layer(n, n, r, dtype, dropout)
    if layer is not None:
        kept, _ = kept_bytes(lambda: layer(x))
        row["cpeft.Linear"] = (kept - base_kept) / MIB
    model = peft_lora(n, n, r, dtype, dropout)
    if model is not None:
        kept, _ = kept_bytes(lambda: model(x))
        row["peft"] = (kept - base_kept) / MIB
    return row


# ---- IA3 ---------------------------------------------------------------------------------------


def ia3_case(feedforward, dtype, reps, m=4096, n=4096):
    x = randn(m, n, dtype=dtype).requires_grad_(True)
    g = randn(m, n, dtype=dtype)
    base = frozen_linear(n, n, dtype)
    l = (1 + 0.1 * randn(n, dtype=torch.float32)).to(dtype)  # noqa: E741
    stream = stream_handle()
    row = {"base": median_ms(autograd_step(base, x, g), reps)}

    def step():
        _, kept = F.ia3_linear_forward(
            x.detach(),
            base.weight,
            None,
            l,
            feedforward=feedforward,
            keep_base=not feedforward,
            stream=stream,
        )
        F.ia3_linear_backward(
            g, x.detach(), base.weight, l, kept, feedforward=feedforward, stream=stream
        )

    row["cpeft"] = median_ms(step, reps)
    if hasattr(cpeft, "IA3Linear"):
        layer = cpeft.IA3Linear(n, n, is_feedforward=feedforward, bias=False)
        layer = layer.to(device="cuda", dtype=dtype)
        row["cpeft.Linear"] = median_ms(autograd_step(layer, x, g), reps)
    if peft is not None:
        model = nn.Sequential(nn.Linear(n, n, bias=False))
        cfg = peft.IA3Config(target_modules=["0"], feedforward_modules=["0"] if feedforward else [])
        model = peft.get_peft_model(model, cfg).to(device="cuda", dtype=dtype)
        row["peft"] = median_ms(autograd_step(model, x, g), reps)
    return row


# ---- LoRA embedding ----------------------------------------------------------------------------


def embedding_case(dtype, reps, vocab=32000, dim=4096, r=16, tokens=8192):
    idx = torch.randint(0, vocab, (tokens,), device="cuda")
    weight = randn(vocab, dim, dtype=dtype)
    a = randn(r, vocab, dtype=dtype)
    b = randn(dim, r, dtype=dtype, scale=0.02)
    g = randn(tokens, dim, dtype=dtype)
    stream = stream_handle()

    def step():
        F.lora_embedding_forward(idx, weight, a, b, 2.0, stream=stream)
        F.lora_embedding_backward(g, idx, a, b, 2.0, stream=stream)

    row = {"cpeft": median_ms(step, reps)}
    if hasattr(cpeft, "Embedding"):
        layer = cpeft.Embedding(vocab, dim, r=r, lora_alpha=2 * r).to(device="cuda", dtype=dtype)
        row["cpeft.Linear"] = median_ms(lambda: layer(idx).backward(g), reps)
    if peft is not None:
        model = nn.Sequential(nn.Embedding(vocab, dim))
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])
        model = peft.get_peft_model(model, cfg).to(device="cuda", dtype=dtype)
        row["peft"] = median_ms(lambda: model(idx).backward(g), reps)
    return row


# ---- merged (eval) forward ---------------------------------------------------------------------


def merged_case(dtype, reps, m=4096, n=4096, r=16):
    x = randn(m, n, dtype=dtype)
    base = frozen_linear(n, n, dtype)
    row = {}
    with torch.no_grad():
        row["base"] = median_ms(lambda: base(x), reps)
        if hasattr(cpeft, "Linear"):
            layer = cpeft_layer(n, n, r, dtype, 0.0)
            layer.eval()  # merges (exactly) into the weight
            row["cpeft.Linear"] = median_ms(lambda: layer(x), reps)
        if peft is not None:
            model = peft_lora(n, n, r, dtype, 0.0)
            model.eval()
            merged = model.merge_and_unload()
            row["peft"] = median_ms(lambda: merged(x), reps)
    return row


# ---- host path ---------------------------------------------------------------------------------


def host_us(step, iters=300):
    """Host microseconds per call of step() while only enqueueing (no synchronization inside)."""
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / iters * 1e6


def host_case(dtype, m=16, n=64, r=8):
    """Host time of one fwd+bwd at a tiny shape, where the GPU work is negligible."""
    x = randn(m, n, dtype=dtype).requires_grad_(True)
    g = randn(m, n, dtype=dtype)
    row = {"base": host_us(autograd_step(frozen_linear(n, n, dtype), x, g))}
    layer = cpeft_layer(n, n, r, dtype, 0.0)
    if layer is not None:
        row["cpeft.Linear"] = host_us(autograd_step(layer, x, g))
    model = peft_lora(n, n, r, dtype, 0.0)
    if model is not None:
        row["peft"] = host_us(autograd_step(model, x, g))
    return row


def with_rank_r_path(path, fn):
    """fn() with CPEFT_CUDA_RANK_R=path (the C core reads it on every call)."""
    saved = os.environ.get("CPEFT_CUDA_RANK_R")
    os.environ["CPEFT_CUDA_RANK_R"] = path
    try:
        return fn()
    finally:
        if saved is None:
            del os.environ["CPEFT_CUDA_RANK_R"]
        else:
            os.environ["CPEFT_CUDA_RANK_R"] = saved


# ---- report ------------------------------------------------------------------------------------

COLUMNS = ("cpeft", "cpeft.Linear", "peft")


def commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return (
            subprocess.run(
                ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            or "?"
        )
    except OSError:
        return "?"


def fmt_cell(runs, key, unit="ms", digits=3):
    """Each run's value, then the ratio to the base of the median run where there is a base."""
    values = [run[key] for run in runs if key in run]
    if not values:
        return "n/a"
    text = " / ".join(f"{v:.{digits}f}" for v in values) + f" {unit}"
    bases = [run["base"] for run in runs if key in run and "base" in run]
    if bases:
        ratios = sorted(v / b for v, b in zip(values, bases))
        text += f" ({ratios[len(ratios) // 2]:.2f}x)"
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default="lora,dropout,rankr,memory,ia3,embedding,host,merged")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and cpeft.has_cuda()):
        print("bench_cuda: needs an NVIDIA GPU and a CUDA build of cpeft", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    cases = set(args.cases.split(","))
    torch.manual_seed(0)
    # Written line by line, so that a run stopped by a time limit keeps the rows it finished.
    markdown = open(args.markdown, "w") if args.markdown else None

    def out(text=""):
        print(text, flush=True)
        if markdown is not None:
            markdown.write(text + "\n")
            markdown.flush()

    out(f"# cpeft CUDA benchmark ({args.dtype})\n")
    out(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    out(f"- device: {torch.cuda.get_device_name()}")
    out(
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"peft {peft.__version__ if peft else 'not installed'}, "
        f"cpeft {cpeft.__version__} commit {commit()}, {cpeft.build_info()}"
    )
    out(
        f"- timer: {'triton do_bench' if _triton_do_bench else 'CUDA events'}, median of "
        f"--reps {args.reps}; {args.runs} runs per cell (each run's median, then the ratio to "
        f"the frozen base of the median run)\n"
    )
    out("| case | frozen base | cpeft functional | cpeft layer | HF peft | target |")
    out("|---|---|---|---|---|---|")

    def emit(name, measure, target, unit="ms", digits=3):
        runs = [measure() for _ in range(args.runs)]
        base = fmt_cell(runs, "base", unit, digits).split(" (")[0] if "base" in runs[0] else "n/a"
        cells = " | ".join(fmt_cell(runs, k, unit, digits) for k in COLUMNS)
        out(f"| {name} | {base} | {cells} | {target} |")

    lora_shapes = [
        ((4096, 4096, 4096, 16), "<= 1.10x", "<= 1.13x"),
        ((16384, 4096, 4096, 16), "<= 1.05x", "<= 1.07x"),
        ((8192, 4096, 11008, 16), "<= 1.05x", "<= 1.07x"),
        ((2048, 1024, 1024, 8), "<= 1.5x", None),
    ]
    for (m, i, o, r), target, dropout_target in lora_shapes:
        name = f"LoRA linear fwd+bwd M={m} {i}->{o} r={r}"
        if "lora" in cases:
            emit(name, lambda: lora_case(m, i, o, r, dtype, args.reps), target)
        if "dropout" in cases and dropout_target:
            emit(
                f"{name}, dropout 0.05",
                lambda: lora_case(m, i, o, r, dtype, args.reps, dropout=0.05),
                dropout_target,
            )
        if "rankr" in cases and m == 4096:
            # The path cuda/rank_r.cu replaced, for comparison (cpeft columns only matter).
            for p in (0.0, 0.05):
                emit(
                    f"{name}, dropout {p}, CPEFT_CUDA_RANK_R=cublas (previous path)",
                    lambda: with_rank_r_path(
                        "cublas", lambda: lora_case(m, i, o, r, dtype, args.reps, dropout=p)
                    ),
                    "reference",
                )
    if "memory" in cases:
        row = memory_case(dtype)
        cells = " | ".join(f"{row[k]:+.2f} MiB" if k in row else "n/a" for k in COLUMNS)
        out(
            f"| extra memory kept for backward, dropout 0.05, M=4096 4096^2 | 0 | {cells} "
            f"| <= 1 MiB |"
        )
    if "ia3" in cases:
        for feedforward, name in [(False, "output"), (True, "input")]:
            emit(
                f"IA3 fwd+bwd M=4096 4096^2, {name} scaling",
                lambda: ia3_case(feedforward, dtype, args.reps),
                "<= 1.05x",
            )
    if "embedding" in cases:
        emit(
            "LoRA embedding fwd+bwd 32000x4096 r=16, 8192 tokens",
            lambda: embedding_case(dtype, args.reps),
            "<= 0.10 ms",
        )
        if "rankr" in cases:
            emit(
                "same, CPEFT_CUDA_RANK_R=cublas (previous path)",
                lambda: with_rank_r_path("cublas", lambda: embedding_case(dtype, args.reps)),
                "reference",
            )
    if "host" in cases:
        emit(
            "host time of one fwd+bwd, M=16 64->64 r=8 (enqueue only)",
            lambda: host_case(dtype),
            "<= 1.3x",
            unit="us",
            digits=1,
        )
    if "merged" in cases:
        emit("merged (eval) forward M=4096 4096^2", lambda: merged_case(dtype, args.reps), "= base")
    if markdown is not None:
        markdown.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
