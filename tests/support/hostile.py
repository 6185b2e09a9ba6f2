"""Worst-case inputs: a parser or regex applied to untrusted text must be linear in its size.

No timed assertion: the same function runs on an input of size n and of size 8n, and the ratio of the
two (best of several runs) must stay far below the 64x a quadratic algorithm would show.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

GROWTH = 8
# Linear work grows 8x; quadratic 64x. The margin absorbs a noisy, shared 2-core machine.
MAX_RATIO = 24.0


def best_time(work: Callable[[], object], runs: int = 5) -> float:
    """The least CPU time of several runs: other processes on the machine do not count against it."""
    best = float("inf")
    for _ in range(runs):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best


def growth_ratio(function: Callable[[Any], object], make: Callable[[int], Any], n: int) -> float:
    """How much longer ``function`` takes on ``make(8n)`` than on ``make(n)``."""
    small, large = make(n), make(n * GROWTH)
    function(large)  # warm caches (regex compilation, imports) before timing
    return best_time(lambda: function(large)) / max(best_time(lambda: function(small)), 1e-6)


def assert_linear(function: Callable[[Any], object], make: Callable[[int], Any], n: int = 20_000) -> None:
    ratio = growth_ratio(function, make, n)
    if ratio >= MAX_RATIO:  # once more: a noisy moment passes, a quadratic cost (~64x) does not
        ratio = growth_ratio(function, make, n)
    assert ratio < MAX_RATIO, f"{GROWTH}x the input took {ratio:.1f}x the time: not linear"
