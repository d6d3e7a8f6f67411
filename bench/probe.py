"""A fixed CPU probe: the time one core takes for the same pure-Python work, printed beside every benchmark's
figures, so that figures measured on a slower or busier day can be compared (these machines vary up to 2x).

    uv run python -m bench.probe
"""

from __future__ import annotations

import hashlib
import time

PROBE_ROUNDS = 3


def _work() -> int:
    total = 0
    for n in range(6_000_000):
        total = (total + n * n) % 1_000_003
    return total + len(hashlib.sha256(b"companion" * 4_000_000).digest())


def cpu_probe_s() -> float:
    """The fastest of PROBE_ROUNDS runs of the fixed work, in seconds (0.3-0.4 s on a quiet machine here)."""
    best = float("inf")
    for _ in range(PROBE_ROUNDS):
        started = time.process_time()
        _work()
        best = min(best, time.process_time() - started)
    return best


def probe_line() -> str:
    """The line a benchmark prints beside its figures."""
    return f"cpu probe {cpu_probe_s():.3f} s (fixed pure-Python work, fastest of {PROBE_ROUNDS})"


if __name__ == "__main__":
    print(probe_line())
