"""A session's memory with tool use: the RSS of one conversation's CLI process tree after 1, 10 and 50 turns.

Run: .venv/bin/python -m tests.bench.bench_session_rss [--runs 3]

Each turn makes the agent call a tool, in turn: sandboxed Bash (writing and counting a 2,000-line
file), Glob and Grep over the workdir, then the answer. The peak is the largest RSS the pool's sampler
and a watcher every 0.1 s saw, so the sizing guide's per-session ceiling can be set from it
(deploy/README.md, "Sizing"). Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bot import logs, procs
from bot.config import LogConfig
from bot.core import Inbound
from tests.bench.bench_pool import close_gateways, make_pool
from tests.fakes.model_process import ModelProcess

TOOLS = {
    "use bash": {"name": "Bash", "input": {"command": "seq 1 2000 > notes.txt && wc -l notes.txt"}},
    "use glob": {"name": "Glob", "input": {"pattern": "*.txt"}},
    "use grep": {"name": "Grep", "input": {"pattern": "1999", "path": "."}},
}
MARKS = (1, 10, 50)


async def one_run(model: ModelProcess, root: Path) -> dict[int, tuple[float, float]]:
    """Turn number -> (RSS after that turn, peak RSS so far), in MiB."""
    pool = await make_pool(model, root)
    peak, marks = 0.0, {}
    triggers = list(TOOLS)
    for turn in range(1, max(MARKS) + 1):
        outcome = await pool.ask(Inbound("api:rss", f"turn {turn}: {triggers[turn % len(triggers)]}"))
        assert outcome.ok, outcome
        pid = pool._workers["api:rss"].pid
        assert pid is not None
        now = procs.tree_rss_mb(pid) or 0.0
        peak = max(peak, now, *(pool._workers["api:rss"].rss_history or [0.0]))
        if turn in MARKS:
            marks[turn] = (now, peak)
    await pool.close(grace_s=5)
    return marks


async def main(runs: int) -> None:
    logs.configure(LogConfig(level="warning"))
    model = ModelProcess.start(TOOLS)
    root = Path(tempfile.mkdtemp(prefix="agentd-bench-rss-"))
    for run in range(1, runs + 1):
        marks = await one_run(model, root)
        print(
            f"run {run}: session RSS with tool use: "
            + ", ".join(f"after {turn} turns {now:.0f} MiB (peak {peak:.0f})" for turn, (now, peak) in marks.items())
        )
    await close_gateways()
    model.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args().runs))
