"""Runs the real daemon (``bot.app.daemon.serve``) in-process, so tests can reach its parts and its store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel

from bot.app.daemon import Running, serve
from bot.core import Caller
from bot.store.sqlite import SqliteStore
from tests.conftest import make_settings
from tests.fakes.model import FakeModel
from tests.fakes.redis_server import free_port


class InProcessDaemon:
    def __init__(self, tmp: Path, model: FakeModel, channels: dict[str, BaseModel], **sections: dict[str, Any]) -> None:
        self.port = free_port()
        sections.setdefault("http", {})["listen"] = f"127.0.0.1:{self.port}"
        # Channels go in at construction: the config's cross-checks (a job delivering to Slack) see them.
        self.settings = make_settings(tmp, model, **sections, **channels)
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.parts: Running | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def store(self) -> SqliteStore:
        """A second connection to the daemon's embedded store (close it after use)."""
        return SqliteStore(self.settings.store.data_dir / "agentd.db", ttl_days=1)

    async def start(self) -> None:
        self._stop.clear()
        self._started.clear()
        self._task = asyncio.create_task(serve(self.settings, self._stop, self._started, self._keep))
        started = asyncio.create_task(self._started.wait())
        await asyncio.wait([started, self._task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()
        assert self._started.is_set(), "daemon did not start"

    def _keep(self, parts: Running) -> None:
        self.parts = parts

    def gateway_url(self) -> str:
        assert self.parts is not None and self.parts.gateway is not None
        return self.parts.gateway.url

    def issue_credential(self, conversation_id: str) -> str:
        assert self.parts is not None and self.parts.gateway is not None
        return self.parts.gateway.issue(Caller(conversation_id, "chat"))

    async def usage(self, by: str) -> dict[str, float]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/v1/usage?by={by}") as response:
            return dict((await response.json())["usage_usd"])

    async def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout)


@contextlib.asynccontextmanager
async def running_daemon(tmp: Path, model: FakeModel, **sections: Any) -> AsyncIterator[InProcessDaemon]:
    """A started in-process daemon with no channels, stopped on leaving the block."""
    daemon = InProcessDaemon(tmp, model, {}, **sections)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()
