"""A long fuzzing campaign: ``python -m tests.fuzz.campaign [--seed S] [--cases N] [--jobs J]``
(from the repository root; default 100,000 cases of seed 1 on every core).

Cases run in chunks in worker processes (one OpenBLAS thread each, address space capped so that
a case that tries to allocate too much fails with MemoryError instead of swapping the machine).
A worker logs each case before and after running it, so a crash (a signal) or a hang (a chunk
past its time limit) is charged to the case it had started, reported as failure class
``crash:<signal>`` or ``hang``, and the chunk resumes after it with the outcomes so far kept. The summary gives the outcomes by class (valid results compared
with the reference; each exception type raised; ``either:returned`` / ``hostile:returned`` for
calls that were allowed to return and did, correctly), the failures by class with replay lines,
and the time taken; ``--json FILE`` also writes it as JSON.
"""

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADDRESS_SPACE_LIMIT = 8 << 30


def worker(seed, start, stop, progress_path):
    """Run cases [start, stop), appending to the progress file a line ``start INDEX`` before
    each case and a JSON line with its outcome after it (so a crash or hang loses nothing)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    from .generator import make_case, run_case

    with open(progress_path, "a") as progress:
        for index in range(start, stop):
            progress.write(f"start {index}\n")
            progress.flush()
            record = dict(index=index)
            try:
                case = make_case(seed, index)
                outcome = run_case(case)
            except Exception as exc:  # a defect of the fuzzer itself; the chunk goes on
                record.update(
                    label="harness-error",
                    failure=f"harness-error:{type(exc).__name__}",
                    entry="?",
                    mutation="?",
                    message=str(exc)[:300],
                )
            else:
                record.update(label=outcome.label, entry=case.entry, mutation=case.mutation)
                if outcome.kind == "fail":
                    record.update(
                        failure=outcome.failure, message=outcome.message.splitlines()[0][:300]
                    )
            progress.write(json.dumps(record) + "\n")
            progress.flush()


def run_chunk(seed, start, stop, timeout):
    """Run a chunk in fresh interpreters until every case has an outcome; returns (counts,
    failures), crashes and hangs included."""
    counts = collections.Counter()
    failures = []
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    while start < stop:
        with tempfile.NamedTemporaryFile("w+", suffix=".progress") as progress:
            command = [
                sys.executable,
                "-m",
                "tests.fuzz.campaign",
                "--worker",
                str(seed),
                str(start),
                str(stop),
                progress.name,
            ]
            try:
                done = subprocess.run(
                    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
                )
                status, stderr = done.returncode, done.stderr
            except subprocess.TimeoutExpired as expired:
                status, stderr = "hang", str(expired.stderr or "")
            progress.seek(0)
            started = None
            for line in progress:
                if line.startswith("start "):
                    started = int(line.split()[1])
                    continue
                record = json.loads(line)
                started = None
                counts[record["label"]] += 1
                if "failure" in record:
                    failures.append(record)
                start = record["index"] + 1
        if started is None:
            if status == 0 or start >= stop:
                break
            started = start  # died before starting a case
        if status == "hang":
            kind = "hang"
        elif isinstance(status, int) and status < 0:
            kind = f"crash:{signal.Signals(-status).name}"
        else:
            kind = f"crash:exit{status}"
        counts[kind] += 1
        failures.append(
            dict(
                index=started,
                failure=kind,
                entry="?",
                mutation="?",
                message=(stderr.strip().splitlines() or [""])[-1][:300],
            )
        )
        start = started + 1
    return counts, failures


def summarize(seed, cases, counts, failures, seconds, jobs):
    from .generator import ENTRIES, replay_line

    lines = [
        f"cpeft fuzz campaign: seed {seed}, {cases} cases, {jobs} worker processes, {seconds:.0f} s"
    ]
    ok = sum(v for k, v in counts.items()) - len(failures)
    lines.append(f"passed {ok}, failed {len(failures)}")
    lines.append("outcomes by class (including failed cases):")
    for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {label:40s} {n:8d}")
    by_class = collections.defaultdict(list)
    for f in failures:
        by_class[f["failure"]].append(f)
    lines.append("failures by class:" if failures else "failures by class: none")
    for failure, items in sorted(by_class.items(), key=lambda kv: -len(kv[1])):
        entries = collections.Counter(
            i["entry"] if i["entry"] != "?" else ENTRIES[i["index"] % len(ENTRIES)] for i in items
        )
        mutations = collections.Counter(i["mutation"].split(":")[0] for i in items)
        lines.append(
            f"  {failure}: {len(items)}  entries {dict(entries)}  changes {dict(mutations)}"
        )
        for item in items[:3]:
            lines.append(f"    {replay_line(seed, item['index'])}   # {item['message'][:160]}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=2_000)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk-timeout", type=float, default=1800.0)
    parser.add_argument("--json", help="also write the summary data here")
    parser.add_argument(
        "--worker", nargs=4, metavar=("SEED", "START", "STOP", "PROGRESS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.worker:
        seed, start, stop, progress = args.worker
        worker(int(seed), int(start), int(stop), progress)
        return 0
    began = time.time()
    stop = args.start + args.cases
    chunks = [(s, min(s + args.chunk, stop)) for s in range(args.start, stop, args.chunk)]
    counts = collections.Counter()
    failures = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_chunk, args.seed, a, b, args.chunk_timeout) for a, b in chunks]
        for n, future in enumerate(futures, 1):
            c, f = future.result()
            counts.update(c)
            failures.extend(f)
            print(
                f"chunk {n}/{len(chunks)} done, {len(failures)} failures so far, "
                f"{time.time() - began:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    failures.sort(key=lambda f: f["index"])
    seconds = time.time() - began
    print(summarize(args.seed, args.cases, counts, failures, seconds, args.jobs))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                dict(
                    seed=args.seed,
                    cases=args.cases,
                    start=args.start,
                    seconds=seconds,
                    counts=counts,
                    failures=failures,
                ),
                out,
                indent=1,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
