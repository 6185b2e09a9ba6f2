"""How fast the CLI starts: `agentd --help` and `agentd sessions` against `python -c pass`.

Run: .venv/bin/python -m tests.bench.bench_cli_start [--runs 9]

Each command is run as a whole process, alternately with the baseline, and the medians of the wall
times are compared. `sessions` asks a port where nothing listens, so it measures start-up plus one
refused connection, as a client of the daemon. Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "agentd --help": [sys.executable, "-m", "bot.app.cli", "--help"],
    "agentd sessions": [sys.executable, "-m", "bot.app.cli", "sessions", "--url", "http://127.0.0.1:9"],
}
BASELINE = [sys.executable, "-c", "pass"]


def wall_s(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False, env={"PATH": "/usr/bin:/bin", "ANTHROPIC_API_KEY": "x"})
    return time.perf_counter() - started


def main(runs: int) -> None:
    for name, command in COMMANDS.items():
        wall_s(command)  # warm the file cache
        pairs = [(wall_s(command), wall_s(BASELINE)) for _ in range(runs)]
        ours, base = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(
            f"{name}: {ours * 1000:.0f} ms vs python -c pass {base * 1000:.0f} ms -> {ours / base:.1f}x"
            " (goal: under 300 ms)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9)
    main(parser.parse_args().runs)
