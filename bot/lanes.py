"""Per-conversation ordering for channels: one task per key serves that key's items in arrival order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Lanes(Generic[T]):
    """``put(key, item)`` never blocks; ``serve(key, item)`` runs for each item, one at a time per key.

    A lane's task ends when its queue is empty, so idle conversations hold no task.
    ``spawn`` runs other work whose end ``join`` also waits for (reply deliveries).
    """

    def __init__(self, name: str, serve: Callable[[str, T], Awaitable[None]]) -> None:
        self._name, self._serve = name, serve
        self._queues: dict[str, asyncio.Queue[T]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def put(self, key: str, item: T) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue()
            self.spawn(self._run(key, queue), name=f"{self._name}-lane:{key}")
        queue.put_nowait(item)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def join(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _run(self, key: str, queue: asyncio.Queue[T]) -> None:
        try:
            while not queue.empty():
                item = queue.get_nowait()
                try:
                    await self._serve(key, item)
                except Exception:  # task boundary: one bad item must not stop its conversation's lane
                    log.exception("lane_item_failed", channel=self._name, conversation=key)
        finally:
            # No await between the empty check and here, so no item can be put in between.
            del self._queues[key]
