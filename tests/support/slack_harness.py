"""The real daemon, in-process, against the fake Slack and the fake model."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bot.config import SlackConfig
from tests.fakes.model import FakeModel
from tests.fakes.slack import FakeSlack
from tests.support.helpers import wait_until
from tests.support.inproc import InProcessDaemon

SIGNING_SECRET = "slack-signing-secret-for-tests"


class SlackDaemon(InProcessDaemon):
    def __init__(self, tmp: Path, model: FakeModel, fake: FakeSlack, mode: str, **sections: dict[str, Any]) -> None:
        credentials: dict[str, Any] = {"bot_token": "xoxb-test-bot", "api_url": fake.url}
        if mode == "socket":
            credentials["app_token"] = "xapp-test-app"
        else:
            credentials["signing_secret"] = SIGNING_SECRET
        super().__init__(tmp, model, {"slack": SlackConfig(**credentials, **sections.pop("slack", {}))}, **sections)
        self.slack = fake

    async def post_event(
        self,
        body: bytes,
        timestamp: int | None = None,
        secret: str | None = SIGNING_SECRET,
        content_type: str = "application/json",
        stamp: str | None = None,
    ) -> int:
        """POST an HTTP Events request as Slack would sign it; returns the status.

        ``secret=None`` sends it unsigned; ``stamp`` replaces the timestamp header after signing.
        """
        headers = {"Content-Type": content_type}
        if secret is not None:
            signed_at = str(timestamp if timestamp is not None else int(time.time()))
            digest = hmac.new(secret.encode(), f"v0:{signed_at}:".encode() + body, hashlib.sha256).hexdigest()
            headers |= {"X-Slack-Request-Timestamp": signed_at, "X-Slack-Signature": f"v0={digest}"}
        if stamp is not None:
            headers["X-Slack-Request-Timestamp"] = stamp
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.url}/slack/events", data=body, headers=headers) as response,
        ):
            return response.status


@contextlib.asynccontextmanager
async def running(
    tmp: Path, model: FakeModel, fake: FakeSlack, mode: str = "socket", **sections: dict[str, Any]
) -> AsyncIterator[SlackDaemon]:
    daemon = SlackDaemon(tmp, model, fake, mode, **sections)
    await daemon.start()
    try:
        if mode == "socket":
            await fake.wait_connected()
        yield daemon
    finally:
        await daemon.stop()


def reply_text(slack: FakeSlack, channel: str, thread_ts: str) -> str:
    """Everything the bot wrote in a thread, joined."""
    return "\n".join(str(m.get("text") or "") for m in slack.posted(channel, thread_ts))


async def wait_reply(slack: FakeSlack, channel: str, thread_ts: str, needle: str, timeout: float = 30) -> str:
    await wait_until(lambda: needle in reply_text(slack, channel, thread_ts), timeout, f"reply with {needle!r}")
    return reply_text(slack, channel, thread_ts)


async def wait_done(slack: FakeSlack, channel: str, ts: str, timeout: float = 30) -> list[str]:
    """Until the message carries the finishing reaction (✅ or ❌)."""
    await wait_until(
        lambda: bool({"white_check_mark", "x"} & set(slack.reactions(channel, ts))), timeout, "a finishing reaction"
    )
    return slack.reactions(channel, ts)


def json_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def cli_processes() -> list[psutil.Process]:
    """The Claude Code CLI processes this test process spawned."""
    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            serving = process.status() != psutil.STATUS_ZOMBIE
            if serving and (process.name() == "claude" or process.cmdline()[:1] == ["claude"]):
                found.append(process)
    return found
