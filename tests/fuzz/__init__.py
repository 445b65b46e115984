"""Seeded fuzzer of every cpeft.functional entry point (see generator.py).

The references live in tests/reference.py and tests/conftest.py, imported as top-level modules
the way the test files import them; putting tests/ on sys.path here lets the fuzzer also run as
``python -m tests.fuzz.replay`` / ``python -m tests.fuzz.campaign`` from the repository root.
"""

import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
