"""Soak: many conversations (a Zipf spread over hundreds) through a small pool, for a long time.

Run: .venv/bin/python -m tests.bench.bench_soak [--minutes 60] [--conversations 300] [--pool 6]

A real ``agentd run`` subprocess serves the HTTP API; the fake model runs in a process of its own.
Every ``--interval`` seconds it prints one row: the daemon's own RSS and open file descriptors, the
CLI process count against ``max_sessions``, the sum of CLI RSS against ``memory_budget_mb``, and the
messages sent and failed. It ends with a graceful stop and what is left after it. The goal: no
growth, no failures, nothing left behind. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

from tests.fakes.model_process import ModelProcess
from tests.support.daemon_proc import DaemonProcess

SPAWN_ESTIMATE_MB = 280


@dataclass
class Counts:
    sent: int = 0
    failed: int = 0


def zipf_weights(n: int, exponent: float) -> list[float]:
    return [1 / (rank**exponent) for rank in range(1, n + 1)]


async def sender(daemon: DaemonProcess, names: list[str], weights: list[float], counts: Counts, until: float) -> None:
    rng = random.Random()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(headers=daemon.headers, timeout=timeout) as http:
        while time.monotonic() < until:
            name = rng.choices(names, weights)[0]
            counts.sent += 1
            try:
                url = f"{daemon.url}/v1/conversations/{name}/messages"
                async with http.post(url, json={"text": f"soak {counts.sent}"}) as response:
                    body = await response.json()
                    ok = response.status == 200 and str(body.get("reply", "")).startswith("echo: soak")
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if not ok:
                counts.failed += 1


def cli_processes(daemon: DaemonProcess) -> list[psutil.Process]:
    assert daemon.process is not None
    try:
        children = psutil.Process(daemon.process.pid).children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in children if _name(p) == "claude"]


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def tree_rss_mb(proc: psutil.Process) -> float:
    total = 0.0
    try:
        for member in [proc, *proc.children(recursive=True)]:
            total += member.memory_info().rss / 2**20
    except psutil.Error:
        pass
    return total


def row(minute: float, daemon: DaemonProcess, args: argparse.Namespace, counts: Counts) -> str:
    assert daemon.process is not None
    own = psutil.Process(daemon.process.pid)
    clis = cli_processes(daemon)
    cli_rss = sum(tree_rss_mb(p) for p in clis)
    return (
        f"| {minute:6.1f} | {own.memory_info().rss / 2**20:7.1f} | {own.num_fds():4d} "
        f"| {len(clis):2d} / {args.pool:<2d} | {cli_rss:6.0f} / {args.pool * 300:<5d} "
        f"| {counts.sent:6d} | {counts.failed:4d} |"
    )


async def soak(args: argparse.Namespace) -> None:
    model = ModelProcess.start()
    root = Path(tempfile.mkdtemp(prefix="agentd-soak-"))
    daemon = DaemonProcess(root, model.url)
    budget = args.pool * 300
    daemon.config.write_text(
        daemon.config.read_text().replace(
            "[pool]\nprewarm = 0\n",
            f"[pool]\nprewarm = 1\nmax_sessions = {args.pool}\nmemory_budget_mb = {budget}\n"
            f"spawn_estimate_mb = {SPAWN_ESTIMATE_MB}\n",
        )
    )
    await daemon.start()
    names = [f"soak-{i}" for i in range(args.conversations)]
    weights = zipf_weights(args.conversations, args.exponent)
    counts = Counts()
    started = time.monotonic()
    until = started + args.minutes * 60
    print(f"# soak: {args.conversations} conversations (Zipf {args.exponent}), {args.senders} senders,")
    print(f"# pool max_sessions {args.pool}, memory_budget_mb {budget}, {args.minutes} min")
    print("| minute | daemon RSS MiB | fds | CLIs / max | CLI RSS MiB / budget | sent | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    senders = [asyncio.create_task(sender(daemon, names, weights, counts, until)) for _ in range(args.senders)]
    try:
        while time.monotonic() < until:
            await asyncio.sleep(min(args.interval, max(0.0, until - time.monotonic())))
            print(row((time.monotonic() - started) / 60, daemon, args, counts), flush=True)
        await asyncio.gather(*senders)
    finally:
        for task in senders:
            task.cancel()
        await finish(daemon, counts)
        model.stop()


async def finish(daemon: DaemonProcess, counts: Counts) -> None:
    assert daemon.process is not None
    tree = [psutil.Process(daemon.process.pid), *psutil.Process(daemon.process.pid).children(recursive=True)]
    stopped = time.monotonic()
    code = await daemon.stop(signal.SIGTERM, timeout=120)
    left = [p for p in [*tree, *daemon.orphans()] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(
        f"# graceful stop: exit {code} in {time.monotonic() - stopped:.1f} s; "
        f"{counts.sent} sent, {counts.failed} failed; processes left: {len(left)} {[_name(p) for p in left]}"
    )
    daemon.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--pool", type=int, default=6, help="max_sessions")
    parser.add_argument("--senders", type=int, default=3, help="messages in flight at once")
    parser.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent")
    parser.add_argument("--interval", type=float, default=60, help="seconds between rows")
    asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    main()
