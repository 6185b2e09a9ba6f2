"""The eviction benchmark's code path on a tiny trace, so it cannot rot, and the frequency table's rules."""

from __future__ import annotations

from pathlib import Path

from bot.eviction import Frequency
from tests.bench.bench_lru import ideal_lru_hits, measure, with_scan, zipf_trace


def test_ideal_lru_counts_hits() -> None:
    assert ideal_lru_hits([1, 2, 1, 3, 2, 1], capacity=2) == 1
    assert len(zipf_trace(10, 50)) == 50


def test_frequency_ages_and_stays_bounded() -> None:
    seen = Frequency(window=4)
    for cid in ("busy", "busy", "busy", "once"):
        seen.touch(cid)
    # The fourth message halved every count: a one-off is forgotten, a busy conversation kept.
    assert seen.count("busy") == 1 and seen.count("once") == 0 and len(seen) == 1
    for i in range(1000):
        seen.touch(f"scan{i}")
    assert len(seen) <= seen.window


async def test_lru_policy_matches_an_ideal_lru_on_a_tiny_trace(tmp_path: Path) -> None:
    ratios = await measure(zipf_trace(12, 60), capacity=3, root=tmp_path, eviction="lru")
    assert 0 < ratios.ideal < 1
    assert ratios.of_ideal >= 0.95
    assert ratios.resumed_fresh == 0, "every successor must find its session's transcript"


async def test_lfu_policy_keeps_busy_conversations_through_a_scan(tmp_path: Path) -> None:
    trace = with_scan(zipf_trace(40, 400), 40)
    ratios = await measure(trace, capacity=5, root=tmp_path, eviction="lfu")
    assert ratios.of_ideal >= 1.10
    assert ratios.resumed_fresh == 0
