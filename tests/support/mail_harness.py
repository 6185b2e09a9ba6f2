"""The real daemon, in-process or as ``agentd run``, against a real Dovecot and SMTP hop and the fake model."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from bot.config import EmailConfig
from bot.store import keys
from bot.store.sqlite import SqliteStore
from tests.fakes.mailserver import DOMAIN, PASSWORD, MailServer
from tests.fakes.model import FakeModel
from tests.support.helpers import wait_for
from tests.support.inproc import InProcessDaemon

AGENT = f"agent@{DOMAIN}"


def email_settings(server: MailServer, **overrides: Any) -> dict[str, Any]:
    return {
        "address": AGENT,
        "imap_host": "127.0.0.1",
        "imap_port": server.imap_port,
        "imap_security": "plain",
        "imap_user": "agent",
        "imap_password": PASSWORD,
        "smtp_host": "127.0.0.1",
        "smtp_port": server.smtp_port,
        "smtp_security": "plain",
        "smtp_user": "",
        "command_timeout_s": 10,
        "reconnect_max_s": 2,
        **overrides,
    }


def email_toml(server: MailServer, **overrides: Any) -> str:
    """The [email] section for ``agentd run`` (the password comes from IMAP_PASSWORD)."""
    values = {k: v for k, v in email_settings(server, **overrides).items() if k != "imap_password"}
    return "[email]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


class MailDaemon(InProcessDaemon):
    def __init__(self, tmp: Path, model: FakeModel, server: MailServer, **sections: dict[str, Any]) -> None:
        config = EmailConfig(**email_settings(server, **sections.pop("email", {})))
        super().__init__(tmp, model, {"email": config}, **sections)
        self.server = server

    async def outcome(self, message_id: str, timeout: float = 30) -> dict[str, Any]:
        return await read_outcome(self.settings.store.data_dir / "agentd.db", message_id, timeout)


async def read_outcome(db: Path, message_id: str, timeout: float = 30) -> dict[str, Any]:
    """Waits until the message's outcome is recorded in the daemon's embedded store."""
    found: dict[str, Any] = {}
    store = SqliteStore(db, ttl_days=1)

    async def recorded() -> bool:
        raw = await store.get_value(keys.mail_outcome(message_id))
        found.update(json.loads(raw) if raw else {})
        return raw is not None

    try:
        await wait_for(recorded, timeout, f"the outcome of {message_id}")
    finally:
        await store.close()
    return found


@contextlib.asynccontextmanager
async def running(
    tmp: Path, model: FakeModel, server: MailServer, **sections: dict[str, Any]
) -> AsyncIterator[MailDaemon]:
    daemon = MailDaemon(tmp, model, server, **sections)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def replies(server: MailServer, user: str = "alice") -> list[EmailMessage]:
    return [m for m in server.mailbox(user) if str(m.get("From", "")).endswith(AGENT)]


async def wait_replies(server: MailServer, count: int, timeout: float = 40) -> list[EmailMessage]:
    """Until alice holds ``count`` replies from the agent (read over IMAP, off the event loop)."""
    found: list[EmailMessage] = []

    async def enough() -> bool:
        found[:] = await asyncio.to_thread(replies, server)
        return len(found) >= count

    await wait_for(enough, timeout, f"{count} replies")
    return found
