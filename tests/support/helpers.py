"""Waiting helpers: every wait has a deadline; none is a bare sleep standing in for an event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import psutil


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    """Like ``wait_until`` for a check that must await (a store read, IMAP off the loop)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def gone(proc: psutil.Process) -> bool:
    """Exited: no longer there, or a zombie waiting for its parent."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
