"""Exactly once, across crashes: each inbound mail's recorded outcome, and the outbox its reply waits in.

A message's outcome is recorded (keyed by its Message-ID) before the message
is marked, and its reply is written to the outbox before it is sent.  A message
seen again (a rescan, a restart, a new UIDVALIDITY) is only marked if its
outcome exists, and a reply in the outbox is sent again only if it was not
confirmed sent, with the same Message-ID.  The stored JSON is read by older
and newer daemons alike: its field names and values do not change.
"""

from __future__ import annotations

import base64
import email.policy
import enum
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from email.message import EmailMessage
from typing import Any

from bot.core import Store
from bot.mail.parse import raw_body
from bot.store import keys


class MailStatus(enum.StrEnum):
    """The one outcome recorded for an inbound mail (the stored ``status`` and the metric's ``fate``)."""

    REPLIED = "replied"
    FAILED_REPLIED = "failed_replied"  # the turn failed and the sender was told so
    FAILED = "failed"
    UNDELIVERABLE = "undeliverable"
    REPLY_CAP = "reply_cap"
    OVERSIZED = "oversized"
    IGNORED = "ignored"
    REFUSED = "refused"
    RATE_LIMITED = "rate_limited"
    UNREADABLE = "unreadable"


class SendState(enum.StrEnum):
    SENDING = "sending"
    SENT = "sent"


@dataclass(frozen=True)
class OutcomeRecord:
    """What became of one inbound mail; ``body`` tells the same mail seen again from another reusing its id."""

    status: MailStatus | None
    reason: str | None = None
    conversation: str | None = None
    uid: int | None = None
    body: str | None = None  # absent from records written before it existed

    @classmethod
    def from_json(cls, raw: str) -> OutcomeRecord:
        data = json.loads(raw)
        return cls(
            _status(data.get("status")), data.get("reason"), data.get("conversation"), data.get("uid"), data.get("body")
        )

    def to_json(self) -> str:
        fields = ("status", "reason", "conversation", "uid", "body")
        return json.dumps({name: getattr(self, name) for name in fields})


@dataclass(frozen=True)
class OutboxEntry:
    """One reply, composed and stored before it is sent, and the outcome to record once it is."""

    state: SendState
    status: MailStatus
    reason: str | None
    to: str
    raw: str  # the whole message, base64: the Message-ID it is sent again with is inside

    @classmethod
    def of(cls, message: EmailMessage, to: str, status: MailStatus, reason: str | None) -> OutboxEntry:
        raw = base64.b64encode(message.as_bytes(policy=email.policy.SMTP)).decode()
        return cls(SendState.SENDING, status, reason, to, raw)

    @classmethod
    def from_json(cls, raw: str) -> OutboxEntry:
        data = json.loads(raw)
        return cls(SendState(data["state"]), MailStatus(data["status"]), data.get("reason"), data["to"], data["raw"])

    def to_json(self) -> str:
        fields = ("state", "status", "reason", "to", "raw")
        return json.dumps({name: getattr(self, name) for name in fields})


Send = Callable[[bytes, str], Awaitable[None]]
CrashPoint = Callable[[str], None]


class Outbox:
    """The outcome records and the outbox of one mailbox, in the store."""

    def __init__(self, store: Store, crash_point: CrashPoint) -> None:
        self._store, self._crash_point = store, crash_point

    async def outcome(self, message_id: str) -> OutcomeRecord | None:
        raw = await self._store.get_value(keys.mail_outcome(message_id))
        return None if raw is None else OutcomeRecord.from_json(raw)

    async def record(self, message_id: str, record: OutcomeRecord) -> None:
        await self._store.put_value(keys.mail_outcome(message_id), record.to_json(), keys.MAIL_RECORD_TTL_S)

    async def pending(self, message_id: str) -> OutboxEntry | None:
        raw = await self._store.get_value(keys.mail_outbox(message_id))
        return None if raw is None else OutboxEntry.from_json(raw)

    async def put(self, message_id: str, entry: OutboxEntry) -> None:
        await self._store.put_value(keys.mail_outbox(message_id), entry.to_json(), keys.MAIL_RECORD_TTL_S)

    async def send_once(self, message_id: str, entry: OutboxEntry, send: Send) -> None:
        """Send the entry unless it was confirmed sent, then confirm it."""
        if entry.state is SendState.SENT:
            return
        self._crash_point("before_send")
        await send(base64.b64decode(entry.raw), entry.to)
        await self.put(message_id, replace(entry, state=SendState.SENT))
        self._crash_point("after_send")


def body_digest(raw: bytes) -> str:
    """The mail's body, hashed: the same mail delivered twice (other Received lines) has the same one."""
    return hashlib.sha256(raw_body(raw) or b"").hexdigest()


def _status(value: Any) -> MailStatus | None:
    """A stored status; None for a record without one (or with one this version does not know)."""
    try:
        return MailStatus(value)
    except ValueError:
        return None
