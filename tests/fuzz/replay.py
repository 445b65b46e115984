"""Replay fuzz cases: ``python -m tests.fuzz.replay SEED CASE [CASE ...]`` (from the repository
root) rebuilds each case from (SEED, CASE), prints it and its outcome, and exits 1 if any
failed."""

import sys

from .generator import make_case, run_case


def replay(seed, index, verbose=True):
    case = make_case(seed, index)
    if verbose:
        print(case.describe())
    outcome = run_case(case)
    if verbose:
        print(f"outcome: {outcome.kind} {outcome.label}")
        if outcome.message:
            print(outcome.message)
    return outcome


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    seed = int(argv[0])
    failed = False
    for index in argv[1:]:
        failed |= replay(seed, int(index)).kind == "fail"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
