"""The LRU benchmark's code path, on a tiny trace, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

from tests.bench.bench_lru import ideal_lru_hits, measure, zipf_trace


def test_ideal_lru_counts_hits() -> None:
    assert ideal_lru_hits([1, 2, 1, 3, 2, 1], capacity=2) == 1
    assert len(zipf_trace(10, 50)) == 50


async def test_lru_benchmark_on_a_tiny_trace(tmp_path: Path) -> None:
    ratios = await measure(conversations=12, capacity=3, messages=60, root=tmp_path)
    assert 0 < ratios.ideal < 1
    assert ratios.of_ideal >= 0.95
    assert ratios.resumed_fresh == 0, "every successor must find its session's transcript"
