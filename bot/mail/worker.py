"""Running mail parsing in a child process with a time limit, so no mail can stall the event loop.

A stranger's mail is parsed by libraries we do not control (the stdlib MIME parser,
html2text, mail-parser-reply); some shapes of input are slow in them.  Parsing in a
child keeps the daemon answering, and killing the child bounds what one mail can cost.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import ParamSpec, TypeVar

import structlog

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class WorkerFailed(Exception):
    """The child did not finish in time, or died: the input is treated as unreadable."""


class ParseWorker:
    """One child process, started on first use and replaced after a timeout or a crash."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._pool: ProcessPoolExecutor | None = None
        # One call at a time: the time limit then measures that call alone, and killing the child on
        # timeout never takes down another caller's work queued behind it.
        self._turn = asyncio.Lock()

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function(*args)`` in the child; raises WorkerFailed after ``timeout_s`` or if the child dies."""
        async with self._turn:
            pool = self._ensure_pool()
            pending = asyncio.get_running_loop().run_in_executor(pool, _call, function, args, kwargs)
            try:
                return await asyncio.wait_for(pending, self._timeout_s)
            except TimeoutError as exc:
                self._kill(pool)
                raise WorkerFailed(f"parsing took longer than {self._timeout_s}s") from exc
            except BrokenProcessPool as exc:
                self._kill(pool)
                raise WorkerFailed("the parsing process died") from exc

    @property
    def pids(self) -> list[int]:
        """The child's process id, once started (tests check it is gone after ``close``)."""
        return list(self._processes(self._pool)) if self._pool else []

    async def close(self) -> None:
        """Stop the child; a parse still running is killed, not waited for."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            self._terminate(pool)
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: the child inherits none of the daemon's loop, sockets and threads, and leaves no server behind.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_exit_with_parent)
        return self._pool

    def _kill(self, pool: ProcessPoolExecutor) -> None:
        """Kill a stuck child and start over with a fresh pool on the next call."""
        log.warning("parse_worker_killed", pids=list(self._processes(pool)))
        self._terminate(pool)
        pool.shutdown(wait=False, cancel_futures=True)
        if self._pool is pool:
            self._pool = None

    def _terminate(self, pool: ProcessPoolExecutor) -> None:
        for process in list(self._processes(pool).values()):
            process.kill()

    @staticmethod
    def _processes(pool: ProcessPoolExecutor | None) -> dict[int, multiprocessing.process.BaseProcess]:
        # The executor has no public way to kill its workers before Python 3.14 (terminate_workers).
        return dict(getattr(pool, "_processes", None) or {})


def _exit_with_parent() -> None:
    """In the child: end as soon as the daemon ends, even by SIGKILL.

    The pool's own queue keeps a write end open in the child, so a child whose parent died would
    otherwise wait for work forever.
    """
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_when_gone, args=(parent.sentinel,), name="parent-watch", daemon=True).start()


def _exit_when_gone(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


def _call(function: Callable[..., T], args: tuple[object, ...], kwargs: dict[str, object]) -> T:
    return function(*args, **kwargs)
